"""Benchmark a config's training steps, decoding and data pipeline, against transformers' XLM.

  python -m xlm_jax.bench --config=configs/bench.py --torch=eager,compile --decode --pipeline \
      --out=docs/bench/cpu_6x512.json --markdown=docs/benchmarks.md

In one process, on one machine: the matmul peak measured with JAX (float32 and bfloat16), then for
each step kind (MLM, TLM, CLM) the compile time, the median step time over ``--steps`` steps after
warm-up, tokens per second (rows are full, so every position is a token), model FLOPs per token
(``model.encoder.xlm_flops_per_token``), MFU against the measured peak of the compute dtype, and
the compiled step's memory. ``--torch`` times transformers' ``XLMWithLMHeadModel`` on the same
MLM batch (``xlm_jax.tools.bench_torch``) and reports ours / theirs; ``--decode`` times greedy
and beam decoding with and without the KV cache; ``--pipeline`` times the host iterators. Beside
each step and decoder, its matrix products timed alone (``xlm_jax.tools.roofline``, ``--nofloor`` to
skip): the ceiling no change other than faster matmul kernels could pass. Batches are random token
ids of the config's shapes: the cost does not depend on the text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from xlm_jax.core import files, parallel, train_state
from xlm_jax.data import batches as batches_lib
from xlm_jax.model.encoder import XLMEncoder, xlm_flops_per_token
from xlm_jax.model.seq2seq import EncoderDecoder
from xlm_jax.tasks import nmt, pretrain
from xlm_jax.text.tokenizer import EOS_ID, N_SPECIAL
from xlm_jax.tools import roofline
from xlm_jax.tools.roofline import machine, median_seconds


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical peak the steps are measured against."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / median_seconds(lambda: f(a), repeats)


def _batch(rng: np.random.Generator, rows: int, length: int, vocab: int, pair: bool):
    tokens = rng.integers(N_SPECIAL, vocab, (rows, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    langs = np.zeros_like(tokens)
    if pair:  # second half restarts its positions and has another language, as TLM rows do
        half = length // 2
        positions[:, half:] -= half
        langs[:, half:] = 1
    return {"tokens": tokens, "positions": positions, "langs": langs}


def _memory(mem) -> dict:
    """A compiled program's memory per device: arguments + outputs + temporaries - aliased
    (donated) buffers, and those four."""
    if mem is None:  # a backend without the analysis
        return {"memory_bytes_per_device": None, "memory_breakdown": None}
    parts = {
        k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
    }
    total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    return {"memory_bytes_per_device": total, "memory_breakdown": parts}


def _timed_with_ceiling(
    run: Callable[[], object],
    calls: int,
    counts,
    rounds: int,
    sample_seconds: float,
) -> tuple[float, dict]:
    """``run``'s median seconds and its ceiling: the program and its matrix products timed in
    turns (``roofline.interleaved``). The fields: the products' median seconds and FLOPs, and the
    program's share of its ceiling (floor / program) in each round and their median."""
    t = roofline.interleaved(run, calls, counts, rounds, sample_seconds)
    shares = t["shares"]
    return float(np.median(t["program_seconds"])), {
        "matmul_floor_s": float(np.median(t["floor_seconds"])),
        "matmul_flops": t["flops"],
        "ceiling_shares": shares,
        "ceiling_share": float(np.median(shares)),
        # each turn's two timings, to tell a drifting program from a drifting ceiling
        "turns_program_s": t["program_seconds"],
        "turns_matmul_floor_s": t["floor_seconds"],
    }


def bench_steps(
    config,
    n_steps: int,
    memory_only: bool = False,
    only: tuple[str, ...] = ("mlm", "tlm", "clm"),
    floor: bool = True,
    sample_seconds: float = roofline.SAMPLE_SECONDS,  # of each product's timing (the floor)
    rounds: int = 3,
) -> dict:
    """Compiles each step kind for the config's mesh; times it unless ``memory_only``.

    Memory is the compiled program's, per device: arguments + outputs + temporaries - aliased
    (donated) buffers. ``floor`` (one device only) also times the step's matrix products alone:
    the step time no other change could go below, as tokens/s (``floor_tokens_per_s``); the step
    and its products are then timed in turns, ``rounds`` times (``n_steps`` steps each), and the
    step time is the median of the rounds' medians.
    """
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    vocab = config.tokenizer.vocab_size
    model = XLMEncoder(pretrain.model_config(config, vocab))
    tx = train_state.make_optimizer(config.optimizer)
    dp = parallel.data_parallel_size(mesh, rules)
    abstract, shardings, _ = train_state.abstract_state(model, tx, mesh, rules, dp)
    state = (
        None
        if memory_only
        else train_state.init_state(model, tx, jax.random.key(0), mesh, rules, dp)[0]
    )
    steps = pretrain.Steps(config, model, tx, mesh, rules, shardings, np.zeros(vocab))
    rng = np.random.default_rng(0)
    kinds = {
        name: (o.program, *o.rows(config), o.pairs, o.pred_fraction(config))
        for name, o in pretrain.OBJECTIVES.items()
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
            step, lam = np.int32(1), np.float32(1.0)  # the step number the key derives from
            t = time.perf_counter()
            compiled = steps.train[kind].lower(abstract, abstract_batch, step, lam).compile()
            compile_s = time.perf_counter() - t
            flops = xlm_flops_per_token(model.config, length, pred_fraction)
            results[name] = {
                "batch": [rows, length],
                "mesh": dict(mesh.shape),
                "compile_s": compile_s,
                "flops_per_token": flops,
                **_memory(compiled.memory_analysis()),
            }
            if memory_only:
                continue
            batch = parallel.global_batch(host_batch, steps.batch_sharding, rows)
            box = {"state": state}

            def run(compiled=compiled, batch=batch, step=step, lam=lam, box=box):
                box["state"], sums = compiled(box["state"], batch, step, lam)
                return sums

            fields: dict = {}
            if floor and mesh.size == 1:  # the traced shapes are the global ones
                counts = roofline.program_dot_products(
                    steps.train[kind], abstract, abstract_batch, step, lam
                )
                seconds, fields = _timed_with_ceiling(run, n_steps, counts, rounds, sample_seconds)
            else:
                seconds = median_seconds(run, n_steps)
            state = box["state"]
            tokens = rows * length
            results[name].update(
                step_s=seconds,
                tokens_per_s=tokens / seconds,
                achieved_flops=flops * tokens / seconds,
            )
            if fields:
                results[name].update(
                    fields,
                    matmul_flops_per_token=fields["matmul_flops"] / tokens,
                    floor_tokens_per_s=tokens / fields["matmul_floor_s"],
                )
    return results


def bench_decoding(
    config,
    batch: int,
    src_len: int,
    out_tokens: int,
    n_runs: int = 3,
    floor: bool = True,
    sample_seconds: float = roofline.SAMPLE_SECONDS,
    rounds: int = 3,
) -> list[dict]:
    """Sentences/s of greedy and beam-4 decoding with and without the KV cache.

    An encoder-decoder of the config's model sizes with random weights; end-of-sentence is
    disabled so every sentence has exactly ``out_tokens`` tokens after the start token and all
    variants do the same work. Median of ``n_runs`` after one warm-up (compile time separately);
    the slow variants without the cache are timed once, after the run that checks the lengths.
    ``floor``: the decoder's matrix products timed alone (the loop body's ``out_tokens`` times),
    as the sentences/s no other change could exceed, timed in turns with the decoder (``rounds``
    times ``n_runs`` runs; the median of the rounds' medians); and with operands from memory
    (``roofline.time_dot_products(cold=True)``): a step reads all the decoder's weights once, more
    than a cache holds, which products timed alone on the same operands never pay.
    """
    mcfg = pretrain.model_config(config, config.tokenizer.vocab_size)
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
            run = functools.partial(compiled, params, inputs, np.int32(1))
            fields: dict = {}
            if floor and kv:  # without the cache the floor says nothing new
                # the loop body runs once per output token (the last one a forced </s>)
                counts = roofline.program_dot_products(
                    fn, params, inputs, np.int32(1), loop_trips=out_tokens
                )
                seconds, fields = _timed_with_ceiling(run, n_runs, counts, rounds, sample_seconds)
                cold = roofline.time_dot_products(counts, sample_seconds, cold=True)["seconds"]
                fields.update(
                    floor_sentences_per_s=batch / fields["matmul_floor_s"],
                    matmul_floor_cold_s=cold,
                    floor_cold_sentences_per_s=batch / cold,
                )
            else:
                # Without the cache a run takes minutes at real sizes: one timed run after the
                # (already compiled) first one is enough to show the ratio.
                seconds = median_seconds(run, *((n_runs, 1) if kv else (1, 0)))
            results.append(
                {
                    "search": "greedy" if beam == 1 else f"beam {beam}",
                    "kv_cache": kv,
                    "compile_s": compile_s,
                    "seconds": seconds,
                    "sentences_per_s": batch / seconds,
                    "tokens_per_s": batch * out_tokens / seconds,
                    **fields,
                }
            )
    return results


def bench_pipeline(config, n_batches: int = 200, n_sentences: int = 20_000) -> dict[str, dict]:
    """Tokens/s the host pipeline delivers to the device: the training iterators (MLM windows of
    a stream, TLM pairs packed per row) plus the transfer into the step's batch sharding.

    Sentences are random token ids of 5 to 40 tokens: iteration cost does not depend on the text
    (reading and tokenizing happen once, before the first step).
    """
    rng = np.random.default_rng(0)
    vocab = config.tokenizer.vocab_size
    sents = [
        rng.integers(N_SPECIAL, vocab, rng.integers(5, 41)).astype(np.int32)
        for _ in range(n_sentences)
    ]
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    sharding = parallel.batch_sharding(mesh, rules)
    iterators = {
        "mlm": batches_lib.StreamBatches(
            batches_lib.make_stream(sents),
            lang_id=0,
            batch_size=config.batch_size,
            length=config.bptt,
            seed=0,
            name="bench_mlm",
            rows=parallel.process_rows(sharding, config.batch_size),
        ),
        "tlm": batches_lib.PairBatches(
            sents,
            sents[1:] + sents[:1],
            src_lang=0,
            tgt_lang=1,
            batch_size=config.tlm_batch_size,
            length=config.tlm_length,
            seed=0,
            name="bench_tlm",
            rows=parallel.process_rows(sharding, config.tlm_batch_size),
        ),
    }
    results = {}
    for name, it in iterators.items():
        with parallel.mesh_context(mesh, rules):
            batch = parallel.global_batch(next(it), sharding, it.batch_size)
            jax.block_until_ready(batch)
            t = time.perf_counter()
            for _ in range(n_batches):
                batch = parallel.global_batch(next(it), sharding, it.batch_size)
            jax.block_until_ready(batch)
            seconds = (time.perf_counter() - t) / n_batches
        rows, length = batch["tokens"].shape
        results[name] = {
            "batch": [rows, length],
            "batch_s": seconds,
            "tokens_per_s": rows * length / seconds,
        }
    return results


def run(
    config,
    *,
    n_steps: int = 10,
    kinds: tuple[str, ...] = ("mlm", "tlm", "clm"),
    memory_only: bool = False,
    torch_modes: tuple[str, ...] = (),
    decode_shape: tuple[int, int, int] | None = None,
    pipeline: bool = False,
    peak_size: int = 2048,
    floor: bool = True,
    sample_seconds: float = roofline.SAMPLE_SECONDS,  # of each product's timing (the floor)
    rounds: int = 3,  # of a program's timing in turns with its products' (the floor)
    xlm_original: str = "",
) -> dict:
    """Everything the benchmark measures, in one process: the report `main` prints and saves.

    ``torch_modes`` ("eager", "compile") times transformers' XLM on the MLM batch
    (``xlm_jax.tools.bench_torch``); the ratios ours/theirs come from this same run. ``floor``: the
    matrix products of each step and decoder timed alone (``xlm_jax.tools.roofline``).
    ``xlm_original``: a checkout of facebookresearch/XLM whose code is timed on the same shapes
    (``xlm_jax.tools.bench_xlm``), with the ratios ours/original.
    """
    timed = {
        "torch": torch_modes,
        "decode": decode_shape,
        "pipeline": pipeline,
        "xlm_original": xlm_original,
    }
    if memory_only and (asked := [f"--{k}" for k, v in timed.items() if v]):
        raise ValueError(f"--memory_only times nothing; {', '.join(asked)} would: drop one side")
    report: dict = {"machine": machine(), "model": config.model.to_dict()}
    report["vocab_size"] = config.tokenizer.vocab_size
    if not memory_only:
        report["peak_size"] = peak_size
        report["matmul_peak_flops"] = {
            "jax float32": matmul_peak(jnp.float32, peak_size),
            "jax bfloat16": matmul_peak(jnp.bfloat16, peak_size),
        }
    steps = bench_steps(config, n_steps, memory_only, kinds, floor, sample_seconds, rounds)
    peak = None if memory_only else report["matmul_peak_flops"][f"jax {config.model.dtype}"]
    for r in steps.values():
        if "achieved_flops" in r:
            r["mfu"] = r["achieved_flops"] / peak
    report["steps"] = steps
    if torch_modes:
        from xlm_jax.tools import bench_torch

        if (why := bench_torch.available()) is not None:
            raise RuntimeError(f"--torch needs torch and transformers ({why}); see README")
        report["matmul_peak_flops"]["torch float32"] = bench_torch.torch_matmul_peak(peak_size)
        report["reference"] = [
            bench_torch.bench_hf_step(
                config,
                rows=config.batch_size,
                length=config.bptt,
                n_steps=n_steps,
                compile=mode == "compile",
            )
            for mode in torch_modes
        ]
        if "mlm" in steps and "tokens_per_s" in steps["mlm"]:
            for ref in report["reference"]:
                ref["ours_over_theirs"] = steps["mlm"]["tokens_per_s"] / ref["tokens_per_s"]
                if "floor_tokens_per_s" in steps["mlm"]:  # the best ratio these matmuls allow
                    ref["floor_over_theirs"] = (
                        steps["mlm"]["floor_tokens_per_s"] / ref["tokens_per_s"]
                    )
    if decode_shape is not None:
        batch, src_len, out_tokens = decode_shape
        runs = bench_decoding(
            config,
            batch,
            src_len,
            out_tokens,
            floor=floor,
            sample_seconds=sample_seconds,
            rounds=rounds,
        )
        report["decoding"] = {
            "batch": batch,
            "source_tokens": src_len,
            "output_tokens": out_tokens,
            "runs": runs,
        }
    if xlm_original:
        from xlm_jax.tools import bench_xlm

        report["xlm_original"] = bench_xlm.run(
            xlm_original, config, kinds=kinds, n_steps=n_steps, decode_shape=decode_shape
        )
        _versus_original(report)
    if pipeline:
        report["pipeline"] = bench_pipeline(config)
        for kind, r in report["pipeline"].items():
            if kind in steps and "tokens_per_s" in steps[kind]:
                r["over_step"] = r["tokens_per_s"] / steps[kind]["tokens_per_s"]
    return report


def _versus_original(report: dict) -> None:
    """Adds to each of the original code's steps and decoding runs our rate on the same program
    (``ours``) and ``ours_over_original``, where ours was timed."""
    orig = report["xlm_original"]
    ours_dec = {r["search"]: r for r in report.get("decoding", {}).get("runs", []) if r["kv_cache"]}
    pairs = [
        (r, report["steps"].get(k, {}).get("tokens_per_s"), r["tokens_per_s"])
        for k, r in orig["steps"].items()
    ]
    pairs += [
        (r, ours_dec.get(r["search"], {}).get("sentences_per_s"), r["sentences_per_s"])
        for r in orig.get("decoding", [])
    ]
    for r, ours, theirs in pairs:
        if ours is not None:
            r["ours"], r["ours_over_original"] = ours, ours / theirs


def _original_markdown(report: dict) -> list[str]:
    """The table of ours against the original XLM code, program by program."""
    orig = report["xlm_original"]
    lines = [
        "",
        f"The original XLM code ({orig['source']}, commit {orig['revision']}; {orig['framework']}, "
        f"{orig['threads']} threads) on the same shapes (`xlm_jax/tools/bench_xlm.py`):",
        "",
        "| program | unit | xlm_jax | original XLM code | xlm_jax / original |",
        "|---|---|---|---|---|",
    ]
    rows = [(f"{k.upper()} step", "tokens/s", r) for k, r in orig["steps"].items()]
    rows += [(r["search"], "sentences/s", r) for r in orig.get("decoding", [])]
    for name, unit, r in rows:
        theirs = r.get("tokens_per_s", r.get("sentences_per_s"))
        ratio = f"**{r['ours_over_original']:.2f}×**" if "ours_over_original" in r else "-"
        ours = f"{r['ours']:.1f}" if "ours" in r else "-"
        lines.append(f"| {name} | {unit} | {ours} | {theirs:.1f} | {ratio} |")
    return lines


def _share(r: dict) -> str:
    """A program's share of its ceiling: the median over the rounds and their range."""
    lo, hi = min(r["ceiling_shares"]), max(r["ceiling_shares"])
    return f"{r['ceiling_share']:.0%} ({lo:.0%}–{hi:.0%})"


def _decoding_markdown(dec: dict) -> list[str]:
    """The decoding table: rates, and each ceiling with the rate's share of it."""
    lines = [
        "",
        f"Decoding {dec['batch']} sentences of {dec['source_tokens']} source tokens into "
        f"{dec['output_tokens']} tokens each (end-of-sentence disabled, so every variant "
        "does the same work):",
        "",
        "| search | KV cache | compile s | sentences/s | tokens/s | matmuls alone s "
        "| ceiling sentences/s | % of ceiling | matmuls from memory s | % of that ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in dec["runs"]:
        floor = "- | - | - | - | -"
        if "matmul_floor_s" in r:
            floor = (
                f"{r['matmul_floor_s']:.2f} | {r['floor_sentences_per_s']:.1f} | {_share(r)} | "
                f"{r['matmul_floor_cold_s']:.2f} | "
                f"{r['sentences_per_s'] / r['floor_cold_sentences_per_s']:.0%}"
            )
        lines.append(
            f"| {r['search']} | {'yes' if r['kv_cache'] else 'no'} | {r['compile_s']:.1f} | "
            f"{r['sentences_per_s']:.1f} | {r['tokens_per_s']:.0f} | {floor} |"
        )
    return lines


def _steps_markdown(steps: dict) -> list[str]:
    """The training steps' table (none when no step kind was asked for)."""
    if not steps:
        return []
    lines = [
        "",
        "| step | batch | compile s | step ms | tokens/s | GFLOP/token | MFU | MB/device "
        "| matmuls alone ms | ceiling tokens/s | % of ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in steps.items():
        mem = r["memory_bytes_per_device"]
        mem = "n/a" if mem is None else f"{mem / 2**20:.0f}"
        timed = "step_s" in r
        floor = (
            f"{r['matmul_floor_s'] * 1e3:.0f} | {r['floor_tokens_per_s']:.0f} | {_share(r)}"
            if "matmul_floor_s" in r
            else "- | - | -"
        )
        lines.append(
            f"| {name} | {r['batch'][0]}x{r['batch'][1]} | {r['compile_s']:.1f} | "
            + (f"{r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f}" if timed else "- | -")
            + f" | {r['flops_per_token'] / 1e9:.4f} | "
            + (f"{r['mfu']:.1%}" if timed else "-")
            + f" | {mem} | {floor} |"
        )
    return lines


def markdown(report: dict, command: str = "") -> str:
    """The report as the markdown of docs/benchmarks.md."""
    m = report["machine"]
    model = report["model"]
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}; "
        f"devices {', '.join(m['devices'])}; JAX {m['jax']}.",
        f"Model: {model['n_layers']} layers x {model['emb_dim']}, {model['n_heads']} heads, "
        f"vocabulary {report['vocab_size']}, compute {model['dtype']}.",
    ]
    if command:
        lines += ["", "```sh", command, "```"]
    if peaks := report.get("matmul_peak_flops"):
        lines += [
            "",
            f"Measured matmul peak ({report['peak_size']} x {report['peak_size']}): "
            + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
            + ".",
        ]
    lines += [
        "",
        "Ceiling: the rate the program's matrix products allow, timed alone with the same "
        "backend (as if every other operation were free), in turns with the program; % of "
        "ceiling: the median over the turns (their range in brackets).",
    ]
    lines += _steps_markdown(report["steps"])
    if refs := report.get("reference"):
        lines += [
            "",
            "Reference, same model and MLM batch: transformers' `XLMWithLMHeadModel` training "
            "step (output layer at every position):",
            "",
            "| framework | mode | threads | compile s | step ms | tokens/s | ours / theirs "
            "| ceiling / theirs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in refs:
            compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
            ratio = f"{r['ours_over_theirs']:.2f}x" if "ours_over_theirs" in r else "-"
            bound = f"{r['floor_over_theirs']:.2f}x" if "floor_over_theirs" in r else "-"
            lines.append(
                f"| {r['framework']} | {r['mode']} | {r['threads']} | {compile_s} | "
                f"{r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | {ratio} | {bound} |"
            )
    if dec := report.get("decoding"):
        lines += _decoding_markdown(dec)
    if "xlm_original" in report:
        lines += _original_markdown(report)
    if pipe := report.get("pipeline"):
        lines += [
            "",
            "Host data pipeline (iterator + transfer to the batch sharding):",
            "",
            "| batches | batch | ms/batch | tokens/s | x the step's consumption |",
            "|---|---|---|---|---|",
        ]
        for name, r in pipe.items():
            over = f"{r['over_step']:.0f}x" if "over_step" in r else "-"
            lines.append(
                f"| {name} | {r['batch'][0]}x{r['batch'][1]} | {r['batch_s'] * 1e3:.2f} | "
                f"{r['tokens_per_s']:.0f} | {over} |"
            )
    return "\n".join(lines) + "\n"


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per kind (after 2 warm-up steps).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_MARKDOWN = flags.DEFINE_string("markdown", "", "Write the results as a markdown table here.")
_KINDS = flags.DEFINE_list("kinds", ["mlm", "tlm", "clm"], "Step kinds to compile (and time).")
_MEMORY_ONLY = flags.DEFINE_bool(
    "memory_only", False, "Only compile against abstract state: per-device memory, no timing."
)
_TORCH = flags.DEFINE_list(
    "torch",
    [],
    "Also time transformers' XLM on the MLM batch: 'eager' and/or 'compile' (torch.compile).",
)
_DECODE = flags.DEFINE_bool(
    "decode", False, "Also time translation decoding (greedy / beam 4, with / without KV cache)."
)
_DECODE_SHAPE = flags.DEFINE_list(
    "decode_shape", ["32", "20", "50"], "Decoding: sentences, source tokens, output tokens."
)
_PIPELINE = flags.DEFINE_bool("pipeline", False, "Also time the host data pipeline.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Square matmul size of the peak measurement.")
_XLM_ORIGINAL = flags.DEFINE_string(
    "xlm_original",
    "",
    "A checkout of facebookresearch/XLM: also time its training steps and decoding, same shapes.",
)
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    3,
    "Each step and decoder is timed in this many turns with its matrix products (the ceiling); "
    "its share of the ceiling is the median of the turns' ratios.",
)
_FLOOR = flags.DEFINE_bool(
    "floor", True, "Also time each step's and decoder's matrix products alone (one device)."
)


def main(argv: list[str]) -> None:
    del argv
    for mode in _TORCH.value:
        if mode not in ("eager", "compile"):
            raise app.UsageError(f"--torch={mode}: expected eager and/or compile")
    report = run(
        _CONFIG.value,
        n_steps=_STEPS.value,
        kinds=tuple(_KINDS.value),
        memory_only=_MEMORY_ONLY.value,
        torch_modes=tuple(_TORCH.value),
        decode_shape=tuple(int(x) for x in _DECODE_SHAPE.value) if _DECODE.value else None,
        pipeline=_PIPELINE.value,
        peak_size=_PEAK_SIZE.value,
        floor=_FLOOR.value,
        rounds=_ROUNDS.value,
        xlm_original=_XLM_ORIGINAL.value,
    )
    command = "python -m xlm_jax.bench " + " ".join(sys.argv[1:])
    text = markdown(report, command)
    print(text)
    report["command"] = command
    if _OUT.value:
        files.write_atomic(_OUT.value, (json.dumps(report, indent=2) + "\n").encode())
    if _MARKDOWN.value:
        files.write_atomic(_MARKDOWN.value, text.encode())


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
