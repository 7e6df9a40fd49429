"""`python -m xlm_jax.metrics`: runs `xlm_jax/core/metrics.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.core.metrics", run_name="__main__", alter_sys=True)
