"""What checkpoint integrity costs: saving and restoring a config's train state, and the part of
each that computes the fingerprints and finite flags (``core/integrity.py``).

  python -m xlm_jax.tools.bench_checkpoint --config=configs/bench.py \\
      --workdir=/tmp/bench_ckpt --out=docs/bench/checkpoint_integrity.json

A save here is synchronous (it returns once the step is on disk) so its time is the whole write;
a training run saves asynchronously, and only the fingerprints and the copy off the devices hold
up its steps. Save and restore include the fingerprints; the overhead is their share.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from xlm_jax.core import integrity, parallel, train_state
from xlm_jax.core.checkpoint import Checkpointer, abstract_of
from xlm_jax.model.encoder import XLMEncoder
from xlm_jax.tasks import pretrain
from xlm_jax.tools.roofline import machine


def _times(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def bench(config, workdir: Path, repeats: int) -> dict:
    """Median seconds of: the fingerprints alone, a save, a restore (both with them)."""
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    model = XLMEncoder(pretrain.model_config(config, config.tokenizer.vocab_size))
    tx = train_state.make_optimizer(config.optimizer)
    dp = parallel.data_parallel_size(mesh, rules)
    state = train_state.init_state(model, tx, jax.random.key(0), mesh, rules, dp)[0]
    abstract = abstract_of(state)
    integrity.record(state)  # compiles the fingerprint program once, as a run does
    record = _times(lambda: integrity.record(state), repeats)
    shutil.rmtree(workdir, ignore_errors=True)
    ckpt = Checkpointer(workdir, keep_last=repeats + 1, async_save=False)
    steps = iter(range(1, repeats + 1))
    save = _times(lambda: ckpt.save(next(steps), state, data_state={}, meta={}), repeats)
    restore = _times(lambda: ckpt.restore(1, abstract_state=abstract)[0], repeats)
    ckpt.close()
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    med = {
        k: float(np.median(v))
        for k, v in (("record", record), ("save", save), ("restore", restore))
    }
    return {
        "state_bytes": n_bytes,
        "seconds": med,
        "integrity_share_of_save": med["record"] / (med["save"] - med["record"]),
        "integrity_share_of_restore": med["record"] / (med["restore"] - med["record"]),
        "repeats": repeats,
        "machine": machine(),
    }


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_checkpoint", "Scratch directory (emptied).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Saves and restores timed.")


def main(argv: list[str]) -> None:
    del argv
    report = bench(_CONFIG.value, Path(_WORKDIR.value), _REPEATS.value)
    text = json.dumps(report, indent=2)
    print(text)
    if _OUT.value:
        Path(_OUT.value).write_text(text + "\n")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
