"""`python -m xlm_jax.prepare`: runs `xlm_jax/tools/prepare.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.prepare", run_name="__main__", alter_sys=True)
