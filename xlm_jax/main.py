"""Entry point: ``python -m xlm_jax.main --config=configs/demo.py --workdir=/tmp/xlm_demo``.

All logic lives in importable modules; this file only parses flags, joins the other processes of
a multi-host run, and dispatches on --mode. Multi-host (see launch/README.md): ``--multihost``
auto-detects the cluster on Cloud TPU and SLURM; elsewhere give --coordinator_address,
--num_processes and --process_id (or the env variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID that launch/local.sh sets).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from xlm_jax.core import parallel
from xlm_jax.core.preemption import EXIT_PREEMPTED, Preempted
from xlm_jax.tasks.registry import MODES

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the tokenizer go.")
_MODE = flags.DEFINE_enum(
    "mode", "pretrain", list(MODES), "What to run (xlm_jax/tasks/registry.py)."
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-process run through jax.distributed.initialize."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
    "Number of processes.",
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
    "This process's index.",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "CPU only: devices per process (jax_num_cpu_devices); 0 = JAX's default."
)
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", "", "CPU only: cross-process collectives, e.g. 'gloo' (local multi-process)."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # Orbax reports every save step by step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
    )
    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if _MULTIHOST.value:
        parallel.initialize_distributed(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            cpu_collectives=_CPU_COLLECTIVES.value or None,
        )
    logging.info(
        "process %d of %d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    try:
        MODES[_MODE.value].run(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        logging.warning("%s", e)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
