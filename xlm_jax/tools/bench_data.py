"""The data path at growing corpus sizes (issue 15): prepare, training start-up and memory, host
pipeline rate, TLM padding.

  python -m xlm_jax.tools.bench_data --sizes=60,250,1000 --work=/tmp/bench_data \\
      --out=docs/bench/data_pipeline.json

For each size (MB of text) a corpus is made by repeating Multi30k's train.{en,fr,de} (``--source``)
until those three files hold about that many bytes (each file counted once, although the en-fr
and en-de pairs of ``configs/demo.py`` read them again); val.* is Multi30k's own. Then, in one run:

1. **prepare**: the tokenizer is trained once into the scratch dir, then ``prepare.prepare`` runs
   with it (``tokenizer_path``) for each ``--workers`` count into a fresh directory, so the times
   are planning (scanning and hashing the sources) plus tokenizing and writing. MB/s counts every
   byte tokenized (a file read by three keys counts three times). SentencePiece's own rate is
   ``Tokenizer.encode_many(lines, threads=1)`` on the lines of the first train shard of each
   language, timed in the same run: per-worker throughput is given as a share of it.
2. **start-up and peak RSS**: ``python -m xlm_jax.main --config=configs/demo.py`` trains
   ``--train_steps`` steps on the prepared set as a child process (evaluation off). A small wrapper
   (``_CHILD``) records when the loop fetches its first batch and the JAX compile time before it
   (the union of JAX's trace, lowering and backend-compile spans, ``jax.monitoring``); start-up is
   child spawn → first batch, minus that compile time. Peak RSS is the child's own
   ``ru_maxrss`` (``os.wait4``); the resident MB at exit are also split into anonymous and
   file-backed (``/proc/self/status``): shards are read by ``pread``, so the file-backed part is
   the libraries' and stays flat with the corpus.
3. **host pipeline**: tokens/s that ``batches.StreamBatches`` (MLM windows of the ``en`` stream) and
   ``batches.PairBatches`` (TLM pairs of ``en-fr``) deliver from the prepared set at
   ``configs/bench.py``'s batch shapes (``next()`` alone, no transfer to devices), over the MLM
   step's tokens/s of ``configs/bench.py`` measured in the same run (``xlm_jax.tools.bench``), or
   ``--step_tokens_per_s``.

Once per run: the TLM padding share of ``configs/demo.py``'s TLM batches (rows of its
``tlm_length``, then 128 and 256) over one epoch of the source's en-fr pairs (Multi30k prepared as
it is, not repeated), one pair per row and packed. The machine (CPU model) goes into the JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import logging as std_logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging

from xlm_jax.core import files
from xlm_jax.data import batches, nli, prepare, prepared, sentences
from xlm_jax.tasks import pretrain, xnli
from xlm_jax.text.tokenizer import PAD_ID, Tokenizer

REPO = Path(__file__).resolve().parents[2]
LANGS = ("en", "fr", "de")
MB = 1e6
# issue 15's targets
TARGETS = {
    "startup_s": 10.0,
    "peak_rss_mb": 1500.0,
    "growth": 0.20,  # of start-up and peak RSS, smallest to largest size
    "per_worker_of_spm": 0.80,
    "speedup_2_workers": 1.7,
    "pipeline_over_step": 20.0,
}


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/NAME.py``'s ``get_config()`` from the repository."""
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_data_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def default_source() -> Path:
    """Multi30k where the tutorials look for data: ``$XLM_DATA/multi30k``, else next to the
    repository (``../shared/data/multi30k``)."""
    return Path(os.environ.get("XLM_DATA") or REPO.parent / "shared" / "data") / "multi30k"


# --- 1. the corpus ------------------------------------------------------------------------------


def _text(path: Path) -> bytes:
    data = path.read_bytes()
    return data if data.endswith(b"\n") else data + b"\n"  # repeats must not join two lines


def build_corpus(source: Path, dest: Path, target_bytes: float) -> dict[str, Any]:
    """``dest/train.{en,fr,de}``: ``source``'s, repeated until the three hold about
    ``target_bytes``; ``dest/val.*``: ``source``'s. Files already of the right size are kept."""
    train = {lang: _text(source / f"train.{lang}") for lang in LANGS}
    once = sum(len(t) for t in train.values())
    repeats = max(1, round(target_bytes / once))
    dest.mkdir(parents=True, exist_ok=True)
    for lang, data in train.items():
        path = dest / f"train.{lang}"
        if not (path.exists() and path.stat().st_size == repeats * len(data)):
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "wb") as f:
                for _ in range(repeats):
                    f.write(data)
            os.replace(tmp, path)
        val = _text(source / f"val.{lang}")
        path = dest / f"val.{lang}"
        if not (path.exists() and path.read_bytes() == val):
            files.write_atomic(path, val)
    return {
        "dir": str(dest),
        "repeats": repeats,
        "text_bytes": repeats * once,
        "train_lines": repeats * train["en"].count(b"\n"),
    }


def corpus_config(root: Path, shard_lines: int = 0) -> ml_collections.ConfigDict:
    """``configs/demo.py`` reading ``root`` (en, fr, de and the en-fr, en-de pairs)."""
    config = load_config("demo")
    config.data.root = str(root)
    if shard_lines:
        config.data.shard_lines = shard_lines
    return config


# --- 2. prepare and SentencePiece's own rate ---------------------------------------------------


@contextlib.contextmanager
def _timed(module, name: str, seconds: list[float]) -> Iterator[None]:
    """Adds the time of each call of ``module.name`` to ``seconds`` while inside."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t)

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, original)


def train_tokenizer(config, root: Path, out: Path) -> tuple[Path, float]:
    """The tokenizer ``prepare`` would train, trained into ``out`` (not part of the timings)."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    prepare.prepare_tokenizer(config, out, root=str(root))
    return out / prepared.TOKENIZER, time.perf_counter() - t


def time_prepare(config, root: Path, out: Path, tokenizer: Path, workers: int) -> dict[str, Any]:
    """One ``prepare`` into a fresh ``out``: wall time, the tokenizing part of it, throughput."""
    shutil.rmtree(out, ignore_errors=True)
    tokenizing: list[float] = []
    with _timed(prepare, "run_jobs", tokenizing):
        t = time.perf_counter()
        manifest = prepare.prepare(
            config, out, root=str(root), tokenizer_path=tokenizer, workers=workers
        )
        wall = time.perf_counter() - t
    records = [json.loads(p.read_text()) for p in sorted((out / "shards").rglob("*.json"))]
    n_bytes = sum(sum(s["end"] - s["start"] for s in r["plan"]["sides"]) for r in records)
    splits = manifest["splits"]
    return {
        "workers": workers,
        "dir": str(out),
        "shards": len(records),
        "tokenized_bytes": n_bytes,
        "wall_s": wall,
        "tokenize_s": sum(tokenizing),
        "mb_per_s": n_bytes / MB / wall,
        "per_worker_mb_per_s": n_bytes / MB / wall / workers,
        "tokenize_mb_per_s": n_bytes / MB / sum(tokenizing),
        # each shard's own time in its worker (read, check, encode, write): a worker's busy rate
        "in_shard_mb_per_s": n_bytes / MB / sum(r["seconds"] for r in records),
        "sentences": {k: e["sentences"] for k, e in splits["train"].items()},
        "tokens": {k: e["tokens"] for k, e in splits["train"].items()},
    }


def spm_rate(config, root: Path, tokenizer: Path) -> dict[str, Any]:
    """SentencePiece's encode rate (one thread) on the lines of the first train shard of each
    language, the lines prepare tokenizes; bytes counted as prepare counts them."""
    plan = prepare.make_plan(config, str(root))
    tok = Tokenizer.load(tokenizer)
    read_kw = prepare.read_options(config)
    n_bytes = n_lines = 0
    seconds = 0.0
    for lang in LANGS:
        shard = next(s for s in plan.shards if s.split == "train" and s.key == lang)
        lines = prepare.shard_lines(shard, shard.sides[0], read_kw, str(root))
        t = time.perf_counter()
        tok.encode_many(lines, lang, threads=1)
        seconds += time.perf_counter() - t
        n_bytes, n_lines = n_bytes + shard.n_bytes, n_lines + len(lines)
    return {
        "bytes": n_bytes,
        "lines": n_lines,
        "seconds": seconds,
        "mb_per_s": n_bytes / MB / seconds,
    }


# --- 3. a training run's start-up and peak RSS -------------------------------------------------

# Runs the module named after ``-c`` (``xlm_jax.main``) with the arguments after it, and writes to
# $XLM_BENCH_DATA_TIMES when the loop's first batch was fetched and the JAX compile time until
# then (the union of the trace, lowering and backend-compile spans: nested ones counted once).
_CHILD = r"""
import atexit, dataclasses, json, os, runpy, sys, time
started = time.time()

def rss_mb():  # resident MB: all, anonymous, file-backed (mapped shards, libraries)
    with open("/proc/self/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
              if k in ("VmRSS", "RssAnon", "RssFile")}
    return {k: kb[k] * 1024 / 1e6 for k in ("VmRSS", "RssAnon", "RssFile")}

def at_exit():
    times["rss_exit"] = rss_mb()
    with open(os.environ["XLM_BENCH_DATA_TIMES"], "w") as f:
        json.dump(times, f)
atexit.register(at_exit)
import jax.monitoring
spans = []
jax.monitoring.register_event_time_span_listener(
    lambda event, start, end, **kw: spans.append((start, end))
    if event.startswith("/jax/core/compile/") else None
)
from xlm_jax.core import loop
from xlm_jax.tasks import pretrain
times = {"wrapper_started": started}

def union(intervals):
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total

build_data = pretrain.build_data
def timed_build_data(*args, **kwargs):
    t, times["rss_before_data"] = time.time(), rss_mb()
    out = build_data(*args, **kwargs)
    times["build_data_s"], times["rss_after_data"] = time.time() - t, rss_mb()
    return out
pretrain.build_data = timed_build_data

one_update = loop.one_update
def first_fetch(plan, *args, **kwargs):
    if not getattr(plan, "_bench_data", False):
        plan._bench_data, update = True, plan.update
        def timed_update(step):
            u = update(step)
            def fetch():
                batch = u.fetch()
                if "first_batch" not in times:
                    times["first_batch"] = time.time()
                    times["compile_s"] = union(s for s in spans if s[1] <= times["first_batch"])
                    times["compile_spans"] = len(spans)
                    times["rss_first_batch"] = rss_mb()
                return batch
            return dataclasses.replace(u, fetch=fetch)
        plan.update = timed_update
    return one_update(plan, *args, **kwargs)
loop.one_update = first_fetch

module, sys.argv = sys.argv[1], sys.argv[1:]  # the module to run, then its arguments
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def training_args(config, root: Path, prepared_dir: Path, workdir: Path, steps: int) -> list[str]:
    return [
        f"--config={REPO / 'configs' / 'demo.py'}",
        f"--workdir={workdir}",
        f"--config.data.root={root}",
        f"--config.data.train={config.data.train}",
        f"--config.data.valid={config.data.valid}",
        f"--config.data.prepared={prepared_dir}",
        f"--config.max_steps={steps}",
        f"--config.log_every={steps}",
        "--config.eval_every=0",
        "--config.checkpoint_every=0",
    ]


def time_training(
    config, root: Path, prepared_dir: Path, workdir: Path, steps: int, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """A ``steps``-step pretraining as a child process: start-up (compile excluded), its parts,
    the whole run's time and the child's peak RSS."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    times_file, log = workdir / "bench_times.json", workdir / "bench_log.txt"
    args = [*training_args(config, root, prepared_dir, workdir, steps), *extra]
    env = {**os.environ, "XLM_BENCH_DATA_TIMES": str(times_file)}
    env.setdefault("JAX_PLATFORMS", "cpu")
    with open(log, "wb") as out:
        spawned = time.time()
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, "xlm_jax.main", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
        ended = time.time()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0 or not times_file.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training exited with {child.returncode}; end of {log}:\n{tail}")
    t = json.loads(times_file.read_text())
    to_first = t["first_batch"] - spawned
    return {
        "steps": steps,
        "startup_s": to_first - t["compile_s"],
        "to_first_batch_s": to_first,
        "compile_s": t["compile_s"],
        "interpreter_s": t["wrapper_started"] - spawned,  # spawn until the first line runs
        "build_data_s": t["build_data_s"],  # open + verify the prepared set, the iterators
        # resident MB (all, anonymous, file-backed) before and after build_data, at the first
        # batch and at the end
        "rss_mb": {k: t[f"rss_{k}"] for k in ("before_data", "after_data", "first_batch", "exit")},
        "run_s": ended - spawned,
        "peak_rss_mb": usage.ru_maxrss * 1024 / MB,  # Linux: KiB
        "log": str(log),
    }


# --- 4. the host pipeline ------------------------------------------------------------------------


def _rate(it, n_batches: int) -> dict[str, Any]:
    batch = next(it)  # the first epoch's order is drawn here
    t = time.perf_counter()
    for _ in range(n_batches):
        batch = next(it)
    seconds = (time.perf_counter() - t) / n_batches
    rows, length = batch["tokens"].shape
    return {"batch": [rows, length], "batch_s": seconds, "tokens_per_s": rows * length / seconds}


def pipeline_rate(prepared_dir: Path, rows: int, length: int, n_batches: int) -> dict[str, Any]:
    """Tokens/s of the MLM stream windows (en) and the TLM pairs (en-fr) of a prepared set:
    ``next()`` alone, at ``rows`` x ``length``; the iterators' construction timed apart."""
    data = prepared.PreparedSet.open(prepared_dir, verify=False)
    out = {}
    t = time.perf_counter()
    mlm = batches.StreamBatches(
        data.stream("train", "en"), lang_id=0, batch_size=rows, length=length, seed=0, name="mlm_en"
    )
    out["mlm"] = {"setup_s": time.perf_counter() - t, "stream_tokens": len(mlm.stream)}
    out["mlm"].update(_rate(mlm, n_batches))
    t = time.perf_counter()
    src, tgt = data.sentences("train", "en-fr")
    tlm = batches.PairBatches(
        src, tgt, src_lang=0, tgt_lang=1, batch_size=rows, length=length, seed=0, name="tlm_en-fr"
    )
    out["tlm"] = {"setup_s": time.perf_counter() - t, "pairs": len(tlm)}
    out["tlm"].update(_rate(tlm, n_batches))
    return out


def step_rate(n_steps: int, scratch: Path) -> float:
    """Tokens/s of ``configs/bench.py``'s MLM step on this machine: ``python -m xlm_jax.bench``
    in a child process (its flags are its own; its memory is not this process's)."""
    out = scratch / "bench_step.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "xlm_jax.bench",
            f"--config={REPO / 'configs' / 'bench.py'}",
            "--kinds=mlm",
            f"--steps={n_steps}",
            "--nofloor",
            "--peak_size=256",  # the matmul peak is not used here
            f"--out={out}",
        ],
        cwd=REPO,
        env={"JAX_PLATFORMS": "cpu", **os.environ},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())["steps"]["mlm"]["tokens_per_s"]


# --- 5. TLM padding ------------------------------------------------------------------------------


def source_prepared(work: Path, source: Path) -> Path:
    """``source`` itself (not repeated) prepared as ``configs/demo.py`` reads it, into
    ``work/source_prepared`` (its own tokenizer); once."""
    out = work / "source_prepared"
    config = corpus_config(source)
    prepare.ensure(
        config, out, root=str(source), tokenizer_path=out / prepared.TOKENIZER, workers=1
    )
    return out


def tlm_padding(
    prepared_dir: Path, rows: int, length: int, key: str = "en-fr", packed: bool = False
) -> dict[str, Any]:
    """Share of PAD positions in TLM batches of ``rows`` x ``length`` over one epoch of the
    ``key`` pairs, one pair per row or packed (``PackedPairBatches``); the last batch completed
    from the next epoch, as training does."""
    src, tgt = prepared.PreparedSet.open(prepared_dir, verify=False).sentences("train", key)
    kind = batches.PackedPairBatches if packed else batches.PairBatches
    it = kind(src, tgt, src_lang=0, tgt_lang=1, batch_size=rows, length=length, seed=0, name="tlm")
    n_rows = it.epoch_rows() if packed else len(it)
    n_batches = -(-n_rows // rows)
    return {
        "key": key,
        "batch": [rows, length],
        "packed": packed,
        "pairs": len(it),
        "dropped": it.n_dropped,
        "rows": n_rows,
        "batches": n_batches,
        "pad_share": batches.padding_share(it, n_batches),
        "pair_tokens": it.tokens,  # </s> src </s></s> tgt </s> of the kept pairs
    }


def tlm_rows_padding(
    prepared_dir: Path, config: ml_collections.ConfigDict, key: str = "en-fr"
) -> dict[str, Any]:
    """PAD share (``batches_padding``) of one epoch of the TLM training batches that
    ``pretrain.tlm_batches`` makes of the ``key`` pairs with ``config``'s ``tlm_*`` settings;
    one pair per ``tlm_length`` row: the last batch completed from the next epoch."""
    src, tgt = prepared.PreparedSet.open(prepared_dir, verify=False).sentences("train", key)
    it = pretrain.tlm_batches(config, src, tgt, name="tlm", src_lang=0, tgt_lang=1)
    if isinstance(it, sentences.BucketedPairBatches):
        n_batches = it.epoch_batches()
    else:
        n_batches = -(-len(it) // it.batch_size)
    budget = config.tlm_tokens_per_batch
    return {
        "key": key,
        "buckets": list(pretrain.tlm_buckets(config)),
        "batch_size": config.tlm_batch_size if budget <= 0 else None,
        "tokens_per_batch": budget if budget > 0 else None,
        "sentences": len(it),  # pairs kept
        "dropped": it.n_dropped,
        **batches_padding(it, n_batches),
    }


TLM_BUCKETS = "32,48,64,128"  # Multi30k's TLM rows: about 50 tokens (the demo's tokenizer)


def tlm_buckets_report(
    work: Path, source: Path | None = None, keys: Sequence[str] = ("en-fr", "en-de")
) -> list[dict]:
    """Multi30k's pairs as the TLM padding table above (``configs/demo.py``'s tokenizer and 32
    rows, ``tlm_length=128``): one pair per row, then ``TLM_BUCKETS`` with 32 rows and with a
    ``tlm_tokens_per_batch`` giving the same mean positions per batch."""
    where = source_prepared(Path(work), source or default_source())
    config = load_config("demo")
    config.tlm_length = 128
    out = []
    for key in keys:
        config.tlm_buckets, config.tlm_tokens_per_batch = "", -1
        out.append(tlm_rows_padding(where, config, key))
        config.tlm_buckets = TLM_BUCKETS
        out += matched_budget(functools.partial(_with_budget, where, config, key))
    return out


def _with_budget(where: Path, config: ml_collections.ConfigDict, key: str, budget: int) -> dict:
    config.tlm_tokens_per_batch = budget
    return tlm_rows_padding(where, config, key)


# --- 6. translation batches: batch_size rows or a token budget ------------------------------------


def nmt_padding(
    prepared_dir: Path, key: str, buckets: Sequence[int], batch_size: int, tokens_per_batch: int
) -> dict[str, Any]:
    """PAD share of one epoch of translation training batches of ``key`` (a language: AE/BT
    rows; a pair: MT's two sides), ``batch_size`` rows or a ``tokens_per_batch`` budget (> 0).
    Positions are counted over all sides (a pair's two), all-PAD rows included."""
    data = prepared.PreparedSet.open(prepared_dir, verify=False)
    kw = {"buckets": buckets, "batch_size": batch_size, "seed": 0, "name": f"nmt_{key}"}
    kw["tokens_per_batch"] = tokens_per_batch
    if "-" in key:
        src, tgt = data.sentences("train", key)
        it = sentences.ParallelBatches(src, tgt, src_lang=0, tgt_lang=1, **kw)
    else:
        it = sentences.SentenceBatches(data.sentences("train", key)[0], lang_id=0, **kw)
    return {
        "key": key,
        "buckets": list(buckets),
        "batch_size": batch_size if tokens_per_batch <= 0 else None,
        "tokens_per_batch": tokens_per_batch if tokens_per_batch > 0 else None,
        "sentences": len(it),
        **batches_padding(it, it.epoch_batches()),
    }


def batches_padding(it: Iterator[batches.Batch], n_batches: int) -> dict[str, Any]:
    """PAD share, mean rows, positions and real tokens per batch, shapes and the largest batch
    of the next ``n_batches`` batches; positions of all sides (``*tokens``), all-PAD rows too."""
    pad, positions, rows, shapes = 0, 0, 0, set()
    for _ in range(n_batches):
        sides = [v for k, v in next(it).items() if k.endswith("tokens")]
        pad += sum(int(np.count_nonzero(v == PAD_ID)) for v in sides)
        positions += sum(v.size for v in sides)
        rows += len(sides[0])
        shapes.add(tuple(v.shape for v in sides))
    largest = max(sum(rows * length for rows, length in shape) for shape in shapes)
    return {
        "batches": n_batches,
        "rows_per_batch": rows / n_batches,
        "positions_per_batch": positions / n_batches,
        "tokens_per_batch_real": (positions - pad) / n_batches,
        "pad_share": pad / positions,
        "shapes": len(shapes),
        "largest_batch_positions": largest,  # what a step's memory must hold
    }


def matched_budget(measure: Callable[[int], dict[str, Any]], sides: int = 1) -> list[dict]:
    """``measure(-1)`` (fixed rows) and ``measure(budget)``, the budget giving the same mean
    positions per batch: set from the fixed run's, then corrected once by its own run's mean."""
    fixed = measure(-1)
    budget = round(fixed["positions_per_batch"] / sides)
    first = measure(budget)
    budget = round(budget * fixed["positions_per_batch"] / first["positions_per_batch"])
    return [fixed, measure(budget)]


FINE_BUCKETS = (12, 16, 20, 24, 28, 32, 40, 48, 64, 96)


def nmt_padding_report(work: Path, source: Path | None = None) -> list[dict[str, Any]]:
    """Padding of Multi30k translation batches, each config's batch_size rows against a token
    budget giving the same mean positions per batch (set from the fixed run's, then corrected
    once by the budget run's own mean): MT pairs of ``multi30k_mt_ende`` and AE/BT sentences of
    ``multi30k_unmt_enfr:random``, each with its own tokenizer, prepared into ``work``; at the
    config's length buckets and at ``FINE_BUCKETS``."""
    source = source or default_source()
    out = []
    for name, arg in (("multi30k_mt_ende", None), ("multi30k_unmt_enfr", "random")):
        config = load_config(name, arg)
        config.data.root = str(source)
        where = Path(work) / name
        tokenizer = where / prepared.TOKENIZER
        prepare.ensure(config, where, root=str(source), tokenizer_path=tokenizer, workers=2)
        keys = prepared.PreparedSet.open(where, verify=False).keys("train")
        configured = tuple(sorted(int(b) for b in config.length_buckets.split(",")))
        for buckets, key in ((b, k) for b in (configured, FINE_BUCKETS) for k in keys):
            measure = functools.partial(nmt_padding, where, key, buckets, config.batch_size)
            out += matched_budget(measure, 2 if "-" in key else 1)
    return out


def nmt_padding_markdown(report: Sequence[dict[str, Any]]) -> str:
    """``nmt_padding_report``'s (or ``tlm_buckets_report``'s) rows as a table."""
    lines = [
        "| data | buckets | batches of | PAD share | positions / batch (largest) "
        "| real tokens / batch | rows / batch | shapes |",
        "|" + "---|" * 8,
    ]
    for r in report:
        size = f"{r['batch_size']} rows" if r["batch_size"] else f"{r['tokens_per_batch']} tokens"
        b = r["buckets"]
        buckets = f"{len(b)} ({b[0]}–{b[-1]})" if len(b) > 1 else f"one ({b[0]})"
        lines.append(
            f"| {r['key']} | {buckets} | {size} "
            f"| {r['pad_share']:.1%} | {r['positions_per_batch']:,.0f} "
            f"({r['largest_batch_positions']:,}) | {r['tokens_per_batch_real']:,.0f} "
            f"| {r['rows_per_batch']:.1f} | {r['shapes']} |"
        )
    return "\n".join(lines)


# --- 7. XNLI rows: one padded length or length buckets -------------------------------------------


def xnli_padding(work: Path, root: Path | None = None, buckets: str = "32,48,64") -> list[dict]:
    """PAD share of XNLI fine-tuning rows: one epoch of SNLI's 19,666 English training pairs at
    batches of 8 (XLM's) and 32, and the 15 XNLI validation sets at 32, every row padded to the
    longest row of the data (one shape) or each batch to the first of ``buckets`` holding its
    longest row. Prepared as XNLI prepares (``data.records = "nli"``), the tokenizer trained on
    SNLI (8,000 pieces)."""
    root = root or default_source().parent
    config = xnli.default_config()
    config.data.root, config.epoch_size = str(root), -1
    config.data.train = "en: nli/snli_dev.tsv, nli/snli_test.tsv"
    config.data.valid = nli.xnli_dev_sources()[1]
    out = Path(work) / "xnli_padding"
    prepare.ensure(config, out, root=str(root), tokenizer_path=out / prepared.TOKENIZER, workers=2)
    data = prepared.PreparedSet.open(out, verify=False)
    sets = {
        split: [nli.Pairs(*data.sentences(split, k), data.labels(split, k), 0) for k in keys]
        for split, keys in (("train", ["en"]), ("valid", list(data.keys("valid"))))
    }
    longest = max(int(p.lengths(config.max_len).max()) for ps in sets.values() for p in ps)
    length = -(-longest // 8) * 8  # xnli.row_length with seq_len = 0
    report = []
    for split, size, spec in [
        (s, n, b) for s, n in (("train", 8), ("train", 32), ("valid", 32)) for b in ("", buckets)
    ]:
        config.length_buckets, config.batch_size = spec, size
        shapes, pad, positions = set(), 0, 0
        for pairs in sets[split]:
            epochs = xnli.Epochs(config, [pairs], xnli.buckets_of(config, length))
            for step in range(epochs.steps):
                tokens = epochs.batch(step, (0, size))["tokens"]
                pad, positions = pad + int((tokens == PAD_ID).sum()), positions + tokens.size
                shapes.add(tokens.shape)
        report.append(
            {
                "split": split,
                "batch_size": size,
                "buckets": spec or str(length),
                "pad_share": pad / positions,
                "shapes": len(shapes),
                "positions": positions,
            }
        )
    return report


# --- the report ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    source: Path
    work: Path
    workers: tuple[int, ...] = (1, 2)
    steps: int = 20
    n_batches: int = 500
    shard_lines: int = 0  # 0 = the config's
    train: bool = True  # run the training child
    extra_training_args: tuple[str, ...] = ()


def run_size(size_mb: float, s: Settings, rows: int, length: int) -> dict[str, Any]:
    """Everything measured at one corpus size."""
    dest = s.work / f"{size_mb:g}MB"
    corpus = build_corpus(s.source, dest / "corpus", size_mb * MB)
    root = Path(corpus["dir"])
    config = corpus_config(root, s.shard_lines)
    logging.info("%g MB: %d repeats of %s", size_mb, corpus["repeats"], s.source)
    tokenizer, tokenizer_s = train_tokenizer(config, root, dest / "tokenizer")
    out: dict[str, Any] = {"size_mb": size_mb, "corpus": corpus, "tokenizer_s": tokenizer_s}
    out["spm"] = spm_rate(config, root, tokenizer)
    out["prepare"] = {
        str(w): time_prepare(config, root, dest / f"prepared_w{w}", tokenizer, w) for w in s.workers
    }
    for r in out["prepare"].values():
        r["per_worker_of_spm"] = r["per_worker_mb_per_s"] / out["spm"]["mb_per_s"]
    if "1" in out["prepare"] and "2" in out["prepare"]:
        one, two = out["prepare"]["1"], out["prepare"]["2"]
        out["speedup_2_workers"] = one["wall_s"] / two["wall_s"]
        out["speedup_2_workers_tokenizing"] = one["tokenize_s"] / two["tokenize_s"]
    prepared_dir = dest / f"prepared_w{s.workers[-1]}"
    if s.train:
        out["training"] = time_training(
            config, root, prepared_dir, dest / "train", s.steps, s.extra_training_args
        )
    out["pipeline"] = pipeline_rate(prepared_dir, rows, length, s.n_batches)
    return out


def run(
    sizes: Sequence[float], s: Settings, step_tokens_per_s: float = 0.0, step_steps: int = 3
) -> dict[str, Any]:
    """The whole benchmark: the report ``main`` prints and saves."""
    from xlm_jax.tools.roofline import machine  # imports JAX: not in prepare's spawned workers

    bench_config = load_config("bench")
    rows, length = bench_config.batch_size, bench_config.bptt
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "source": str(s.source),
        "config": "configs/demo.py",
        "settings": {**dataclasses.asdict(s), "source": str(s.source), "work": str(s.work)},
        "targets": TARGETS,
    }
    report["sizes"] = [run_size(size, s, rows, length) for size in sizes]
    if step_tokens_per_s:
        report["step"] = {"tokens_per_s": step_tokens_per_s, "source": "--step_tokens_per_s"}
    else:
        rate = step_rate(step_steps, s.work)
        report["step"] = {"tokens_per_s": rate, "source": "measured (xlm_jax.bench)"}
    report["step"]["batch"] = [rows, length]
    for size in report["sizes"]:
        for r in size["pipeline"].values():
            r["over_step"] = r["tokens_per_s"] / report["step"]["tokens_per_s"]
    # TLM padding of the demo's TLM batches on the source itself (not repeated)
    demo = load_config("demo")
    m30k = source_prepared(s.work, s.source)
    report["tlm_padding"] = [
        tlm_padding(m30k, demo.tlm_batch_size, length, packed=packed)
        for length in (demo.tlm_length, 128, 256)
        for packed in (False, True)
    ]
    report["met"] = targets_met(report)
    return report


def targets_met(report: dict[str, Any]) -> dict[str, bool]:
    sizes = report["sizes"]
    met = {
        "per_worker_of_spm": all(
            r["per_worker_of_spm"] >= TARGETS["per_worker_of_spm"]
            for s in sizes
            for r in s["prepare"].values()
        ),
        "pipeline_over_step": all(
            r["over_step"] >= TARGETS["pipeline_over_step"]
            for s in sizes
            for r in s["pipeline"].values()
        ),
    }
    if all("speedup_2_workers" in s for s in sizes):
        met["speedup_2_workers"] = all(
            s["speedup_2_workers"] >= TARGETS["speedup_2_workers"] for s in sizes
        )
    if all("training" in s for s in sizes):
        for what, limit in (("startup_s", "startup_s"), ("peak_rss_mb", "peak_rss_mb")):
            values = [s["training"][what] for s in sizes]
            met[what] = all(v <= TARGETS[limit] for v in values)
            met[f"{what}_growth"] = values[-1] <= values[0] * (1 + TARGETS["growth"])
    return met


def markdown(report: dict[str, Any]) -> str:
    step = report["step"]
    lines = [
        "| text MB | repeats | SentencePiece MB/s | prepare, 1 worker | prepare, 2 workers "
        "| per worker / spm | 2 vs 1 worker | start-up s | compile s | peak RSS MB (file-backed) "
        "| MLM host tokens/s (× step) | TLM host tokens/s (× step) |",
        "|" + "---|" * 12,
    ]

    def prep(size, w):
        r = size["prepare"].get(w)
        return f"{r['wall_s']:.1f} s, {r['mb_per_s']:.1f} MB/s" if r else "-"

    for size in report["sizes"]:
        per_worker = " / ".join(f"{r['per_worker_of_spm']:.0%}" for r in size["prepare"].values())
        speedup = size.get("speedup_2_workers")
        tr = size.get("training")
        p = size["pipeline"]
        lines.append(
            f"| {size['corpus']['text_bytes'] / MB:.0f} | {size['corpus']['repeats']} "
            f"| {size['spm']['mb_per_s']:.1f} | {prep(size, '1')} | {prep(size, '2')} "
            f"| {per_worker} | {f'{speedup:.2f}×' if speedup else '-'} "
            + (
                f"| {tr['startup_s']:.1f} | {tr['compile_s']:.1f} | {tr['peak_rss_mb']:.0f} "
                f"({tr['rss_mb']['exit']['RssFile']:.0f}) "
                if tr
                else "| - | - | - "
            )
            + f"| {p['mlm']['tokens_per_s'] / 1e6:.2f} M ({p['mlm']['over_step']:,.0f}×) "
            f"| {p['tlm']['tokens_per_s'] / 1e6:.2f} M ({p['tlm']['over_step']:,.0f}×) |"
        )
    pads = report["tlm_padding"]
    rows, length = step["batch"]
    lines += [
        "",
        f"Step consumption: configs/bench.py's MLM step, {rows}x{length}, "
        f"{step['tokens_per_s']:.0f} tokens/s ({step['source']}). "
        f"TLM padding share on the source's {pads[0]['key']} pairs over one epoch, "
        f"{pads[0]['batch'][0]} rows a batch: "
        + ", ".join(
            f"{p['batch'][1]} tokens {'packed' if p['packed'] else 'one pair'} "
            f"{p['pad_share']:.1%} ({p['dropped']} pairs too long)"
            for p in pads
        )
        + ".",
        "",
        "Targets met: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in report["met"].items())
        + f". Machine: {report['machine']['processor']}, {report['date']}.",
    ]
    return "\n".join(lines)


def define_flags() -> dict[str, Any]:
    """The command's flags, defined when it runs (tests import this module beside others that
    define --out)."""
    return {
        "sizes": flags.DEFINE_list("sizes", ["60", "250", "1000"], "Corpus sizes, MB of text."),
        "work": flags.DEFINE_string(
            "work", "/tmp/bench_data", "Scratch dir: corpora (kept, reused), prepared sets, runs."
        ),
        "steps": flags.DEFINE_integer("train_steps", 20, "Steps of the timed training run."),
        "out": flags.DEFINE_string("out", "", "Write the report as JSON here."),
        "workers": flags.DEFINE_list("workers", ["1", "2"], "Prepare with each worker count."),
        "source": flags.DEFINE_string(
            "source", "", "Dir of train.{en,fr,de} and val.{en,fr,de}; default $XLM_DATA/multi30k."
        ),
        "shard_lines": flags.DEFINE_integer("shard_lines", 0, "data.shard_lines; 0 = config's."),
        "batches": flags.DEFINE_integer("batches", 500, "Host pipeline: batches per iterator."),
        "step_tokens": flags.DEFINE_float(
            "step_tokens_per_s",
            0.0,
            "Tokens/s of configs/bench.py's MLM step to compare the host pipeline with; 0 = "
            "measure it here (about half a minute on a CPU).",
        ),
        "train": flags.DEFINE_bool("train", True, "Run the training child (start-up, peak RSS)."),
    }


def main(argv: list[str], defined: dict[str, Any]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("xlm_jax").setLevel(std_logging.INFO)
    f = {k: v.value for k, v in defined.items()}
    settings = Settings(
        source=Path(f["source"]) if f["source"] else default_source(),
        work=Path(f["work"]),
        workers=tuple(int(w) for w in f["workers"]),
        steps=f["steps"],
        n_batches=f["batches"],
        shard_lines=f["shard_lines"],
        train=f["train"],
    )
    report = run([float(x) for x in f["sizes"]], settings, f["step_tokens"])
    report["command"] = "python -m xlm_jax.tools.bench_data " + " ".join(sys.argv[1:])
    text = markdown(report)
    print(text)
    if f["out"]:
        files.write_atomic(f["out"], (json.dumps(report, indent=2) + "\n").encode())


if __name__ == "__main__":
    defined = define_flags()
    app.run(lambda argv: main(argv, defined))
