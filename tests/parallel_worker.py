"""Runs tiny pretraining jobs in a fresh process (so the parent can choose the device count).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.parallel_worker JOBS.json

JOBS.json: a list of {"workdir", "out", "overrides": {dotted.key: value}, "mode"}. For each job,
trains with ``tests.conftest.tiny_config(**overrides)`` (``mode`` "pretrain", the default) or
``tiny_nmt(**overrides)`` (``mode`` "nmt") and writes ``out`` (.npz): the final parameters
(flattened by path), plus ``__specs__`` (the sharding spec of every parameter and Adam moment)
and ``__compiled__`` (number of compiled programs).
"""

import json
import sys

import jax
import numpy as np

from tests.conftest import tiny_config, tiny_nmt
from xlm_jax.tasks import nmt, pretrain


def _flat(tree, prefix=""):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + jax.tree_util.keystr(path)] = leaf
    return out


def run(job: dict) -> None:
    nmt_mode = job.get("mode", "pretrain") == "nmt"
    config = (tiny_nmt if nmt_mode else tiny_config)(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in job["overrides"].items()}
    )
    final = {}

    def on_step(step, state):
        if step == config.max_steps:
            final["params"] = _flat(state.params)
            final["specs"] = {
                **{k: list(v.sharding.spec) for k, v in _flat(state.params, "params").items()},
                **{
                    k: list(v.sharding.spec)
                    for k, v in _flat(state.opt_state, "opt").items()
                    if hasattr(v, "sharding") and v.ndim
                },
            }
            final["params"] = {k: np.asarray(jax.device_get(v)) for k, v in final["params"].items()}

    run_fn = nmt.train_and_evaluate if nmt_mode else pretrain.train_and_evaluate
    out = run_fn(config, job["workdir"], on_step=on_step)
    if jax.process_index() == 0:
        np.savez(
            job["out"],
            __specs__=json.dumps(final["specs"]),
            __compiled__=out["compiled_programs"],
            **final["params"],
        )


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        run(job)
