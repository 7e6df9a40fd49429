"""`python -m xlm_jax.config_doc`: runs `xlm_jax/tools/config_doc.py` (keeps the command short)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("xlm_jax.tools.config_doc", run_name="__main__", alter_sys=True)
