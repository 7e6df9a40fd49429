"""Benchmark the compiled training steps of a config: tokens/s, FLOPs/token, MFU, memory.

  python -m xlm_jax.bench --config=configs/multi30k_mlm_tlm.py --out=/tmp/bench.json
  # and translation decoding (greedy / beam 4, KV cache or not) at the config's model sizes:
  python -m xlm_jax.bench --config=configs/multi30k_mlm_tlm.py --decode --kinds=

In one process: the machine's float32 matmul peak measured with JAX, then for each step kind
(MLM, TLM, CLM) the compile time, the median step time over ``--steps`` steps after warm-up, tokens
per second (rows are full, so every position is a token), model FLOPs per token
(``model.encoder.xlm_flops_per_token``), MFU against the measured peak, and the compiled step's
memory. Batches are random token ids of the config's shapes: the step's cost does not depend on
the text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from xlm_jax import nmt, parallel, train
from xlm_jax.model.encoder import XLMEncoder, xlm_flops_per_token
from xlm_jax.model.seq2seq import EncoderDecoder
from xlm_jax.tokenizer import EOS_ID, N_SPECIAL

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per kind (after 2 warm-up steps).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_KINDS = flags.DEFINE_list("kinds", ["mlm", "tlm", "clm"], "Step kinds to compile (and time).")
_MEMORY_ONLY = flags.DEFINE_bool(
    "memory_only", False, "Only compile against abstract state: per-device memory, no timing."
)
_DECODE = flags.DEFINE_bool(
    "decode", False, "Also time translation decoding (greedy / beam 4, with / without KV cache)."
)
_DECODE_SHAPE = flags.DEFINE_list(
    "decode_shape", ["32", "20", "50"], "Decoding: sentences, source tokens, output tokens."
)


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


def bench_steps(
    config, n_steps: int, memory_only: bool = False, only: tuple[str, ...] = ("mlm", "tlm", "clm")
) -> dict:
    """Compiles each step kind for the config's mesh; times it unless ``memory_only``.

    Memory is the compiled program's, per device: arguments + outputs + temporaries - aliased
    (donated) buffers.
    """
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    vocab = config.tokenizer.vocab_size
    model = XLMEncoder(train.model_config(config, vocab))
    tx = train.make_optimizer(config.optimizer)
    dp = parallel.data_parallel_size(mesh, rules)
    abstract, shardings, _ = train.abstract_state(model, tx, mesh, rules, dp)
    state = (
        None if memory_only else train.init_state(model, tx, jax.random.key(0), mesh, rules, dp)[0]
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
            if name not in only:
                continue
            host_batch = _batch(rng, rows, length, vocab, pair)
            abstract_batch = {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=steps.batch_sharding)
                for k, v in host_batch.items()
            }
            key, lam = jax.random.key(1), np.float32(1.0)
            t = time.perf_counter()
            compiled = steps.train[kind].lower(abstract, abstract_batch, key, lam).compile()
            compile_s = time.perf_counter() - t
            mem = compiled.memory_analysis()
            flops = xlm_flops_per_token(model.config, length, pred_fraction)
            results[name] = {
                "batch": [rows, length],
                "mesh": dict(mesh.shape),
                "compile_s": compile_s,
                "flops_per_token": flops,
                "memory_bytes_per_device": None
                if mem is None
                else int(
                    mem.argument_size_in_bytes
                    + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes
                    - mem.alias_size_in_bytes
                ),
                "memory_breakdown": None
                if mem is None
                else {
                    k: int(getattr(mem, f"{k}_size_in_bytes"))
                    for k in ("argument", "output", "temp", "alias")
                },
            }
            if memory_only:
                continue
            batch = parallel.global_batch(host_batch, steps.batch_sharding, rows)
            box = {"state": state}

            def run(compiled=compiled, batch=batch, key=key, lam=lam, box=box):
                box["state"], sums = compiled(box["state"], batch, key, lam)
                return sums

            seconds = _median_seconds(run, n_steps)
            state = box["state"]
            tokens = rows * length
            results[name].update(
                step_s=seconds,
                tokens_per_s=tokens / seconds,
                achieved_flops=flops * tokens / seconds,
            )
    return results


def bench_decoding(
    config, batch: int, src_len: int, out_tokens: int, n_runs: int = 3
) -> list[dict]:
    """Sentences/s of greedy and beam-4 decoding with and without the KV cache.

    An encoder-decoder of the config's model sizes with random weights; end-of-sentence is
    disabled so every sentence has exactly ``out_tokens`` tokens after the start token and all
    variants do the same work. Median of ``n_runs`` after one warm-up (compile time separately).
    """
    mcfg = train.model_config(config, config.tokenizer.vocab_size)
    mcfg = dataclasses.replace(mcfg, dropout=0.0, attention_dropout=0.0)
    model = EncoderDecoder(mcfg, mcfg)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, *nmt.example_batch(1))["params"]))(
        jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    src = rng.integers(N_SPECIAL, mcfg.vocab_size, (batch, src_len)).astype(np.int32)
    src[:, 0] = src[:, -1] = EOS_ID
    inputs = {
        "src_tokens": src,
        "src_positions": np.broadcast_to(np.arange(src_len, dtype=np.int32), src.shape).copy(),
        "src_langs": np.zeros_like(src),
    }
    # int(0 * src_len + out_tokens + 1) tokens: start token + out_tokens (the last a forced </s>)
    max_len = (0.0, float(out_tokens + 1))
    results = []
    for beam in (1, 4):
        for kv in (True, False):
            fn = jax.jit(
                functools.partial(
                    nmt.generate,
                    model,
                    max_len=max_len,
                    beam_size=beam,
                    eos_allowed=False,
                    kv_cache=kv,
                )
            )
            t = time.perf_counter()
            compiled = fn.lower(params, inputs, np.int32(1)).compile()
            compile_s = time.perf_counter() - t
            tokens, lengths = compiled(params, inputs, np.int32(1))
            assert int(np.min(lengths)) == out_tokens + 1, "every sentence must be full length"
            seconds = _median_seconds(lambda c=compiled: c(params, inputs, np.int32(1)), n_runs, 1)
            results.append(
                {
                    "search": "greedy" if beam == 1 else f"beam {beam}",
                    "kv_cache": kv,
                    "compile_s": compile_s,
                    "seconds": seconds,
                    "sentences_per_s": batch / seconds,
                    "tokens_per_s": batch * out_tokens / seconds,
                }
            )
    return results


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    peak = None if _MEMORY_ONLY.value else matmul_peak()
    results = bench_steps(config, _STEPS.value, _MEMORY_ONLY.value, tuple(_KINDS.value))
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
        },
        "model": config.model.to_dict(),
        "matmul_peak_flops_float32": peak,
        "steps": results,
    }
    if peak:
        print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    if results:  # --kinds= (empty) times decoding only
        print(f"mesh {dict(next(iter(results.values()))['mesh'])}, {jax.device_count()} devices")
        print("| step | batch | compile s | step ms | tokens/s | GFLOP/token | MFU | MB/device |")
        print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        mem = r["memory_bytes_per_device"]
        mem = "n/a" if mem is None else f"{mem / 2**20:.0f}"
        if "step_s" in r:
            r["mfu"] = r["achieved_flops"] / peak
            timing = f"{r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f}"
            mfu = f"{r['mfu']:.1%}"
        else:
            timing, mfu = "- | -", "-"
        print(
            f"| {name} | {r['batch'][0]}x{r['batch'][1]} | {r['compile_s']:.1f} | {timing} | "
            f"{r['flops_per_token'] / 1e9:.4f} | {mfu} | {mem} |"
        )
    if _DECODE.value:
        batch, src_len, out_tokens = (int(x) for x in _DECODE_SHAPE.value)
        report["decoding"] = {
            "batch": batch,
            "source_tokens": src_len,
            "output_tokens": out_tokens,
            "runs": bench_decoding(config, batch, src_len, out_tokens),
        }
        print(
            f"decoding {batch} sentences, {src_len} source tokens, {out_tokens} output tokens "
            "(end-of-sentence disabled):"
        )
        print("| search | KV cache | compile s | sentences/s | tokens/s |")
        print("|---|---|---|---|---|")
        for r in report["decoding"]["runs"]:
            print(
                f"| {r['search']} | {'yes' if r['kv_cache'] else 'no'} | {r['compile_s']:.1f} | "
                f"{r['sentences_per_s']:.1f} | {r['tokens_per_s']:.0f} |"
            )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
