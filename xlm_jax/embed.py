"""`python -m xlm_jax.embed`: runs `xlm_jax/tools/embed.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.embed", run_name="__main__", alter_sys=True)
