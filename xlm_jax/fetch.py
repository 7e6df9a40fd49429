"""`python -m xlm_jax.fetch`: runs `xlm_jax/tools/fetch.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.fetch", run_name="__main__", alter_sys=True)
