"""`python -m xlm_jax.bench`: runs `xlm_jax/tools/bench.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.bench", run_name="__main__", alter_sys=True)
