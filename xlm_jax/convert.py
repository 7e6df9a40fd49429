"""`python -m xlm_jax.convert`: runs `xlm_jax/tools/convert.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.convert", run_name="__main__", alter_sys=True)
