"""`python -m xlm_jax.aot`: runs `xlm_jax/tools/aot.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.aot", run_name="__main__", alter_sys=True)
