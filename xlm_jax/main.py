"""Entry point: ``python -m xlm_jax.main --config=configs/demo.py --workdir=/tmp/xlm_demo``.

All logic lives in importable modules; this file only parses flags and dispatches on --mode.
"""

from __future__ import annotations

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from xlm_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the tokenizer go.")
_MODE = flags.DEFINE_enum("mode", "pretrain", ["pretrain"], "What to run.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # Orbax reports every save step by step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
    )
    if _MODE.value == "pretrain":
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
