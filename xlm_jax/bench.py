"""Benchmark the compiled training steps of a config: tokens/s, FLOPs/token, MFU, memory.

  python -m xlm_jax.bench --config=configs/multi30k_mlm_tlm.py --out=/tmp/bench.json

In one process: the machine's float32 matmul peak measured with JAX, then for each step kind
(MLM, TLM, CLM) the compile time, the median step time over ``--steps`` steps after warm-up, tokens
per second (rows are full, so every position is a token), model FLOPs per token
(``model.encoder.xlm_flops_per_token``), MFU against the measured peak, and the compiled step's
memory. Batches are random token ids of the config's shapes: the step's cost does not depend on
the text.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from xlm_jax import parallel, train
from xlm_jax.model.encoder import XLMEncoder, xlm_flops_per_token
from xlm_jax.tokenizer import N_SPECIAL

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per kind (after 2 warm-up steps).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


def _median_seconds(fn: Callable[[], object], n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical peak the steps are measured against."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / _median_seconds(lambda: f(a), repeats)


def _batch(rng: np.random.Generator, rows: int, length: int, vocab: int, pair: bool):
    tokens = rng.integers(N_SPECIAL, vocab, (rows, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    langs = np.zeros_like(tokens)
    if pair:  # second half restarts its positions and has another language, as TLM rows do
        half = length // 2
        positions[:, half:] -= half
        langs[:, half:] = 1
    return {"tokens": tokens, "positions": positions, "langs": langs}


def bench_steps(config, n_steps: int) -> dict:
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    vocab = config.tokenizer.vocab_size
    model = XLMEncoder(train.model_config(config, vocab))
    tx = train.make_optimizer(config.optimizer)
    state, shardings = train.init_state(
        model, tx, jax.random.key(0), mesh, rules, parallel.data_parallel_size(mesh, rules)
    )
    steps = train.Steps(config, model, tx, mesh, rules, shardings, np.zeros(vocab))
    rng = np.random.default_rng(0)
    kinds = {
        "mlm": ("masked", config.batch_size, config.bptt, False, config.word_pred),
        "tlm": ("masked", config.tlm_batch_size, config.tlm_length, True, config.word_pred),
        "clm": ("clm", config.batch_size, config.bptt, False, 1.0),
    }
    results = {}
    with parallel.mesh_context(mesh, rules):
        for name, (kind, rows, length, pair, pred_fraction) in kinds.items():
            batch = parallel.global_batch(
                _batch(rng, rows, length, vocab, pair), steps.batch_sharding
            )
            key, lam = jax.random.key(1), np.float32(1.0)
            t = time.perf_counter()
            compiled = steps.train[kind].lower(state, batch, key, lam).compile()
            compile_s = time.perf_counter() - t
            box = {"state": state}

            def run(compiled=compiled, batch=batch, key=key, lam=lam, box=box):
                box["state"], sums = compiled(box["state"], batch, key, lam)
                return sums

            seconds = _median_seconds(run, n_steps)
            state = box["state"]
            tokens = rows * length
            flops = xlm_flops_per_token(model.config, length, pred_fraction)
            mem = compiled.memory_analysis()
            results[name] = {
                "batch": [rows, length],
                "compile_s": compile_s,
                "step_s": seconds,
                "tokens_per_s": tokens / seconds,
                "flops_per_token": flops,
                "achieved_flops": flops * tokens / seconds,
                "memory_bytes": None
                if mem is None
                else int(
                    mem.argument_size_in_bytes
                    + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes
                    - mem.alias_size_in_bytes
                ),
            }
    return results


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    peak = matmul_peak()
    results = bench_steps(config, _STEPS.value)
    for r in results.values():
        r["mfu"] = r["achieved_flops"] / peak
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
        },
        "config": _CONFIG.value.to_dict().get("model"),
        "matmul_peak_flops_float32": peak,
        "steps": results,
    }
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print("| step | batch | compile s | step ms | tokens/s | GFLOP/token | MFU | memory MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        mem = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f}"
        print(
            f"| {name} | {r['batch'][0]}x{r['batch'][1]} | {r['compile_s']:.1f} | "
            f"{r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | "
            f"{r['flops_per_token'] / 1e9:.4f} | {r['mfu']:.1%} | {mem} |"
        )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
