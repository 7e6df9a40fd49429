"""The pretraining settings, re-exported for configs written as `from xlm_jax.config import ...`;
they live in `xlm_jax/tasks/pretrain_config.py`."""

from xlm_jax.tasks.pretrain_config import default_config

__all__ = ["default_config"]
