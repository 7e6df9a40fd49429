"""`python -m xlm_jax.plots`: runs `xlm_jax/tools/plots.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.plots", run_name="__main__", alter_sys=True)
