"""`python -m xlm_jax.translate`: runs `xlm_jax/tools/translate.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.translate", run_name="__main__", alter_sys=True)
