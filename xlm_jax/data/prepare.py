"""Prepare once: every source of a config checked, tokenized in parallel and written as shards.

The work, in order (``prepare``):

1. **Plan** (this process, streaming): each source file is read once in blocks to count its lines,
   hash it and find the byte offsets of every ``shard_lines``-th line of its range; parallel
   sources must have equal line counts. A shard is one line range of one source (both sides for a
   pair), so its errors name the file's own line numbers.
2. **Tokenizer**: the given one, or SentencePiece trained on XLM's α-sampled sample, whose line
   indices are drawn from the line counts alone (``tokenizer.sample_indices``) and read while
   streaming: the same model as training on the corpus in memory, without holding it.
3. **Shards**, in ``workers`` processes (spawned: the parent may run JAX, which must not fork):
   decode and check the lines (``text_files.decode_lines``), drop empty ones (counted by reason),
   tokenize on one thread each, write the arrays of ``prepared.py`` and then the shard's record.
   A shard whose record matches its plan and whose files verify is never redone: an interrupted
   prepare resumes where it stopped, and ``part=(i, n)`` lets n independent jobs (a SLURM array,
   ``launch/prepare_array.sbatch``) each write their shards.
4. **Manifest**, written last, when every shard is done.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from xlm_jax.core import parallel
from xlm_jax.core.files import write_atomic
from xlm_jax.data import corpus, nli, prepared, sources, toy
from xlm_jax.data.text_files import DataError, check_aligned, decode_lines, reading
from xlm_jax.text import tokenizer as tokenizer_lib
from xlm_jax.text.specials import EOS_ID
from xlm_jax.text.xlm_bpe import moses_detokenize

_log = logging.getLogger(__name__)

BLOCK = 1 << 24  # bytes read at a time while scanning
# Below this much text, this process tokenizes on `workers` SentencePiece threads (about as fast:
# 1.7x on 2 cores) instead of spawning workers, whose start (imports) costs seconds each.
INLINE_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class Side:
    """One source of a shard: a file's byte range (``path``), or a whole tfds: source."""

    spec: str
    lang: str
    path: str = ""  # absolute; "" for a tfds: source
    start: int = 0  # bytes
    end: int = 0
    sha256: str = ""  # the whole file's: any change to it redoes its shards
    detokenize: bool = False  # Moses-tokenized text, detokenized when read (data.detokenize)


@dataclasses.dataclass(frozen=True)
class Shard:
    split: str  # "train" / "valid"
    key: str  # "en" or "en-fr"
    item: int  # which source of the key
    index: int  # which line range of it
    first_line: int  # 0-based line of the file where it starts
    n_lines: int
    sides: tuple[Side, ...]
    # "text": a sentence per line (per side); "nli": premise<TAB>hypothesis<TAB>label lines, the
    # premises and hypotheses tokenized as two sides of one file, the labels kept beside them
    records: str = "text"

    @property
    def name(self) -> str:
        return f"{self.split}/{self.key}/{self.item:03d}-{self.index:05d}"

    @property
    def n_bytes(self) -> int:
        return sum(s.end - s.start for s in self.sides)

    def plan(self) -> dict[str, Any]:
        plan = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back
        if self.records == "text":  # as recorded before NLI shards existed: those stay finished
            del plan["records"]
        for side in plan["sides"]:  # the same for shards prepared before data.detokenize
            if not side["detokenize"]:
                del side["detokenize"]
        return plan


@dataclasses.dataclass
class Plan:
    shards: list[Shard]
    sources: dict[str, dict[str, Any]]  # absolute path -> size, mtime_ns, sha256


# --- 1. plan ------------------------------------------------------------------------------------


def scan(path: Path) -> dict[str, Any]:
    """Size, mtime, sha256 and line count of a file, read once in blocks."""
    digest, n_newlines, last = hashlib.sha256(), 0, b""
    with reading(path), open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        while block := f.read(BLOCK):
            digest.update(block)
            n_newlines += block.count(b"\n")
            last = block[-1:]
    if stat.st_size == 0:
        raise DataError(f"{path}: empty file; expected at least one line")
    n_lines = n_newlines + (last != b"\n")
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": digest.hexdigest(),
        "lines": n_lines,
    }


def line_starts(path: Path, lines: Sequence[int], size: int) -> list[int]:
    """Byte offset where each of the (increasing, 0-based) ``lines`` starts; the line count is the
    file's end."""
    want, out, seen, at = list(lines), [], 0, 0
    with open(path, "rb") as f:
        while want and want[0] == 0:
            out.append(0)
            want.pop(0)
        while want and (block := f.read(BLOCK)):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
            while want and want[0] <= seen + len(newlines):
                out.append(at + int(newlines[want[0] - seen - 1]) + 1)
                want.pop(0)
            seen, at = seen + len(newlines), at + len(block)
    return out + [size] * len(want)  # a last line without its newline ends at the file's end


def _item_sides(key: str, spec: str, parsed, where: str) -> list[tuple[str, str]]:
    """(spec, lang) of each side of one source item."""
    langs = [parsed] if isinstance(parsed, str) else list(parsed)
    specs = spec.split("|")
    if len(specs) != len(langs):
        raise DataError(
            f"{where}.{key}: {spec!r} must be 'SRC_SPEC|TGT_SPEC' (two line-aligned sources)"
            if len(langs) == 2
            else f"{where}.{key}: {spec!r}: '|' pairs sources, but {key!r} is one language"
        )
    return [(s.strip(), lang) for s, lang in zip(specs, langs, strict=True)]


def records_of(config: ml_collections.ConfigDict, *, expected: str | None = None) -> str:
    """``data.records``, checked (and to be ``expected`` when a task reads only that kind)."""
    records = config.data.get("records", "text")
    if records not in ("text", "nli") or expected not in (None, records):
        want = f"{expected!r} for this task" if expected else "'text' or 'nli'"
        raise DataError(f"data.records={records!r}: expected {want}")
    return records


def _sides(
    config: ml_collections.ConfigDict, split: str, key: str, item: str, where: str
) -> list[tuple[str, str]]:
    """(spec, lang) of each side of a source item. An NLI file is read as two sides, premises
    and hypotheses, in the language of its text (English in a translate-test set)."""
    if records_of(config) == "text":
        parsed = corpus.parse_key(key, corpus.checked_langs(config), where)
        return _item_sides(key, item, parsed, where)
    if not key.isalnum() or "|" in item:
        raise DataError(f"{where}.{key}: NLI sets are 'LANG: FILE.tsv[@A:B], ...' (one language)")
    lang = "en" if split == "translate_test" else key
    return [(item, lang), (item, lang)]


def plan_item(
    split: str,
    key: str,
    item: int,
    sides: list[tuple[str, str]],
    root: str,
    shard_lines: int,
    data_dir: str | None,
    found: dict[str, dict[str, Any]],
    manual_dir: str | None = None,
    records: str = "text",
    detokenize: Collection[str] = (),
) -> list[Shard]:
    """The shards of one source item: ``shard_lines`` lines of every side each; a side whose
    source (without its line range) is in ``detokenize`` is Moses-detokenized when read."""
    parsed = [sources.parse_spec(spec) for spec, _ in sides]
    detok = [_unranged(spec) in detokenize for spec, _ in sides]
    if any(p.kind == "tfds" for p in parsed):  # read whole by one worker (TFDS has no byte ranges)
        for p in (p for p in parsed if p.kind == "tfds"):  # a local builder is prepared first
            sources.prepared_builder(p, data_dir=data_dir, manual_dir=manual_dir)
        n = [sources.line_count(p, root, data_dir=data_dir) for p in parsed]
        check_aligned([str(p) for p in parsed], n)
        side = tuple(
            Side(spec, lang, detokenize=d) for (spec, lang), d in zip(sides, detok, strict=True)
        )
        first = sources.first_line(parsed[0], root)
        return [Shard(split, key, item, 0, first, n[0], side, records)]
    paths = [Path(os.path.abspath(sources.resolve_path(p, root))) for p in parsed]
    for path in paths:
        if str(path) not in found:
            found[str(path)] = scan(path)
    bounds = [
        sources.line_bounds(p, found[str(path)]["lines"], str(path))
        for p, path in zip(parsed, paths, strict=True)
    ]
    names = [f"{path}{p.range_suffix}" for p, path in zip(parsed, paths, strict=True)]
    check_aligned(names, [end - start for start, end in bounds])
    cuts = [list(range(start, end, shard_lines)) + [end] for start, end in bounds]
    offsets = [
        line_starts(path, cut, found[str(path)]["size"])
        for path, cut in zip(paths, cuts, strict=True)
    ]
    return [
        Shard(
            split,
            key,
            item,
            i,
            cuts[0][i],
            cuts[0][i + 1] - cuts[0][i],
            tuple(
                Side(spec, lang, str(path), off[i], off[i + 1], found[str(path)]["sha256"], d)
                for (spec, lang), path, off, d in zip(sides, paths, offsets, detok, strict=True)
            ),
            records,
        )
        for i in range(len(cuts[0]) - 1)
    ]


def root_or_toy(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """``data.root`` or, when empty, the generated toy corpus (so the demo needs no data)."""
    if config.data.root:
        return config.data.root
    _log.info("data.root is empty: using the generated toy corpus (synthetic text)")
    langs = tuple(corpus.lang_list(config))
    return str(toy.write_toy_corpus(Path(workdir) / "toy_corpus", langs=langs))


def splits_of(config: ml_collections.ConfigDict) -> list[str]:
    """The splits to prepare (``data.prepare_splits``): those read as batches, not as text."""
    named = corpus.codes(config.data.prepare_splits)
    known = ("train", "valid", "test", "translate_test")
    if not named or any(s not in known or s not in config.data for s in named):
        raise DataError(f"data.prepare_splits={config.data.prepare_splits!r}: name data.* splits")
    return [s for s in named if config.data[s].strip()]  # an empty split has nothing to prepare


def make_plan(config: ml_collections.ConfigDict, root: str) -> Plan:
    """Every shard of the splits to prepare, with the sources scanned and checked."""
    records = records_of(config)
    detokenize = set(corpus.codes(config.data.get("detokenize", "")))
    shards: list[Shard] = []
    found: dict[str, dict[str, Any]] = {}
    for split in splits_of(config):
        where = f"data.{split}"
        for key, items in corpus.source_items(config.data[split], where).items():
            for i, item in enumerate(items):
                sides = _sides(config, split, key, item, where)
                shards += plan_item(
                    split,
                    key,
                    i,
                    sides,
                    root,
                    config.data.shard_lines,
                    config.data.tfds_data_dir or None,
                    found,
                    config.data.get("tfds_manual_dir") or None,
                    records,
                    detokenize,
                )
    named = {_unranged(side.spec) for shard in shards for side in shard.sides}
    if unknown := sorted(detokenize - named):
        raise DataError(
            f"data.detokenize names {unknown}, not a source of the prepared splits "
            f"({', '.join(splits_of(config))}); give sources as in those, without line ranges"
        )
    sources_ = {path: {k: v for k, v in f.items() if k != "lines"} for path, f in found.items()}
    return Plan(shards, sources_)


def _unranged(spec: str) -> str:
    """A source spec without its ``@START:END`` line range."""
    return spec.partition("@")[0].strip()


# --- reading a shard's lines --------------------------------------------------------------------


def shard_lines(shard: Shard, side: Side, read_kw: Mapping[str, Any], root: str) -> list[str]:
    """The checked lines of one side of a shard."""
    if not side.path:
        return sources.read_lines(side.spec, root, **read_kw)
    with open(side.path, "rb") as f:
        f.seek(side.start)
        data = f.read(side.end - side.start)
    lines = decode_lines(
        data,
        Path(side.path),
        first_line=shard.first_line,
        max_chars=read_kw["max_chars"],
        on_invalid_utf8=read_kw["on_invalid_utf8"],
    )
    if len(lines) != shard.n_lines:  # the file changed since it was scanned
        raise DataError(
            f"{side.path}: lines {shard.first_line + 1}..{shard.first_line + shard.n_lines} now "
            f"read as {len(lines)} lines; the file changed while being prepared"
        )
    return lines


def nli_columns(
    shard: Shard, read_kw: Mapping[str, Any], root: str
) -> tuple[list[str], list[str], np.ndarray]:
    """Premises, hypotheses and label ids of an NLI shard, every line checked (``nli``)."""
    side = shard.sides[0]
    if side.path:
        lines = shard_lines(shard, side, read_kw, root)
        at = shard.first_line + 1
        examples = [nli.parse_line(line, f"{side.path}:{at + i}") for i, line in enumerate(lines)]
    else:
        examples = nli.read_nli(side.spec, root, **read_kw)
    labels = np.array([ex.label for ex in examples], np.int8)
    return [ex.premise for ex in examples], [ex.hypothesis for ex in examples], labels


def shard_texts(
    shard: Shard, read_kw: Mapping[str, Any], root: str
) -> tuple[list[list[str]], np.ndarray | None]:
    """The text of each side of a shard, one string per line (Moses-detokenized where the side
    says so), and an NLI shard's label ids."""
    labels = None
    if shard.records == "nli":  # every line checked: none is empty
        *lines, labels = nli_columns(shard, read_kw, root)
    else:
        lines = [shard_lines(shard, side, read_kw, root) for side in shard.sides]
    lines = [
        [moses_detokenize(t, side.lang) for t in text] if side.detokenize else text
        for side, text in zip(shard.sides, lines, strict=True)
    ]
    return lines, labels


def side_texts(shard: Shard, j: int, read_kw: Mapping[str, Any], root: str) -> list[str]:
    """The text of side ``j`` of a shard, one string per line."""
    return shard_texts(shard, read_kw, root)[0][j]


# --- 2. tokenizer -------------------------------------------------------------------------------


def tokenizer_segments(plan: Plan) -> dict[str, list[tuple[Shard, int]]]:
    """Each language's training text as (shard, side) in order: its monolingual text, else its
    pair sides (``corpus.tokenizer_texts``)."""
    train = [s for s in plan.shards if s.split == "train"]
    out: dict[str, list[tuple[Shard, int]]] = {}
    for shard in (s for s in train if len(s.sides) == 1):
        out.setdefault(shard.sides[0].lang, []).append((shard, 0))
    mono = set(out)
    for shard in (s for s in train if len(s.sides) == 2):
        for j, side in enumerate(shard.sides):
            if side.lang not in mono:
                out.setdefault(side.lang, []).append((shard, j))
    return out


def sample_for_tokenizer(
    plan: Plan, config: ml_collections.ConfigDict, read_kw: Mapping[str, Any], root: str
) -> tuple[list[str], dict[str, float]]:
    """XLM's α-sampled BPE training sentences, read while streaming the shards."""
    segments = tokenizer_segments(plan)
    sizes = {lang: sum(s.n_lines for s, _ in segs) for lang, segs in segments.items()}
    tok = config.tokenizer
    picks, probs = tokenizer_lib.sample_indices(sizes, tok.n_sentences, tok.alpha, config.seed)
    sample: list[str] = []
    for lang, idx in picks.items():
        wanted = np.unique(idx)
        text: dict[int, str] = {}
        first = 0
        for shard, j in segments[lang]:
            local = wanted[(wanted >= first) & (wanted < first + shard.n_lines)] - first
            if len(local):
                lines = side_texts(shard, j, read_kw, root)
                text.update((first + int(i), lines[i]) for i in local)
            first += shard.n_lines
        sample += [text[i] for i in idx.tolist()]
    return sample, probs


def tokenizer_for(
    plan: Plan, config: ml_collections.ConfigDict, path: Path, read_kw: Mapping[str, Any], root: str
):
    """The tokenizer at ``path``, trained there first if it does not exist."""
    if path.exists():
        return tokenizer_lib.Tokenizer.load(path)
    t0 = time.perf_counter()
    sample, probs = sample_for_tokenizer(plan, config, read_kw, root)
    tok = config.tokenizer
    out = tokenizer_lib.train_on_sample(
        sample, probs, path, vocab_size=tok.vocab_size, character_coverage=tok.character_coverage
    )
    _log.info(
        "tokenizer trained in %.1f s on %d sampled lines", time.perf_counter() - t0, len(sample)
    )
    return out


# --- 3. shards ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(serialized: bytes):
    return tokenizer_lib.Tokenizer.from_bytes(serialized)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def side_arrays(ids: Sequence[np.ndarray], dtype: np.dtype, vocab: int) -> dict[str, np.ndarray]:
    """tokens (each sentence then </s>), offsets (n + 1) and id counts of one side."""
    lengths = np.fromiter((len(a) + 1 for a in ids), np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.full(int(offsets[-1]), EOS_ID, dtype)
    if len(ids):
        words = np.ones(len(tokens), bool)
        words[offsets[1:] - 1] = False
        tokens[words] = np.concatenate(ids)
    return {"tokens": tokens, "offsets": offsets, "counts": np.bincount(tokens, minlength=vocab)}


def _write_npy(out: Path, name: str, array: np.ndarray, files: dict[str, dict[str, int]]) -> None:
    """Writes ``out/shards/name`` and records its size and CRC32 in ``files``."""
    data = _npy(array)
    write_atomic(out / "shards" / name, data)
    files[name] = {"size": len(data), "crc32": zlib.crc32(data)}


@dataclasses.dataclass(frozen=True)
class Job:
    shard: Shard
    out: str
    tokenizer: bytes
    read_kw: dict[str, Any]
    root: str
    threads: int = 1  # SentencePiece's; a worker process uses one


def tokenize_shard(job: Job) -> dict[str, Any]:
    """Reads, checks and tokenizes one shard; writes its arrays, then its record (last)."""
    t0 = time.perf_counter()
    shard, out = job.shard, Path(job.out)
    tok = _tokenizer(job.tokenizer)
    lines, labels = shard_texts(shard, job.read_kw, job.root)
    keep = [i for i in range(shard.n_lines) if all(side[i] for side in lines)]
    dtype = prepared.token_dtype(tok.vocab_size)
    files: dict[str, dict[str, int]] = {}
    n_tokens = []
    for j, (side, text) in enumerate(zip(shard.sides, lines, strict=True)):
        ids = tok.encode_many([text[i] for i in keep], side.lang, threads=job.threads)
        arrays = side_arrays(ids, dtype, tok.vocab_size)
        n_tokens.append(int(arrays["offsets"][-1]) - len(keep))  # without the </s>
        for what, array in arrays.items():
            _write_npy(out, f"{shard.name}.{j}.{what}.npy", array, files)
    if labels is not None:
        _write_npy(out, f"{shard.name}.labels.npy", labels, files)
    reason = "an empty line" if len(shard.sides) == 1 else "an empty side"
    # kept, but counted: with on_invalid_utf8="replace" a bad byte became U+FFFD
    replaced = sum("\ufffd" in line for side in lines for line in side)
    record = {
        "format": prepared.FORMAT,
        "plan": shard.plan(),
        "tokenizer": tok.sha256,
        "sentences": len(keep),
        "tokens": n_tokens,
        "dropped": {reason: shard.n_lines - len(keep)} if len(keep) < shard.n_lines else {},
        "replaced": {"lines with U+FFFD (invalid UTF-8 replaced)": replaced} if replaced else {},
        **({"labels": _label_counts(labels)} if labels is not None else {}),
        "files": files,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_atomic(out / "shards" / f"{shard.name}.json", json.dumps(record, indent=1).encode())
    return record


def _label_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(nli.LABELS))
    return {name: int(n) for name, n in zip(nli.LABELS, counts, strict=True)}


def finished(shard: Shard, out: Path, tokenizer_sha: str) -> dict[str, Any] | None:
    """The shard's record if it was finished for this plan and tokenizer and its files verify."""
    try:
        record = json.loads((out / "shards" / f"{shard.name}.json").read_text())
    except (OSError, ValueError):
        return None
    same = (record.get("format"), record.get("plan"), record.get("tokenizer"))
    if same != (prepared.FORMAT, shard.plan(), tokenizer_sha):
        return None
    try:
        for name, want in record["files"].items():
            prepared.check_file(out / "shards" / name, want, shard.name)
    except DataError as e:
        _log.warning("redoing shard %s: %s", shard.name, str(e).split(";")[0])
        return None
    return record


def run_jobs(jobs: list[Job], workers: int) -> dict[str, dict[str, Any]]:
    """Each job's record, in ``workers`` spawned processes (here when little text is left)."""
    if not jobs:
        return {}
    t0, total = time.perf_counter(), sum(j.shard.n_bytes for j in jobs)
    inline = workers == 1 or len(jobs) == 1 or total < INLINE_BYTES
    if inline:
        records = {
            j.shard.name: tokenize_shard(dataclasses.replace(j, threads=workers)) for j in jobs
        }
    else:
        records = _pool(jobs, workers)
    dt = time.perf_counter() - t0
    _log.info(
        "tokenized %d shards (%.1f MB of text) in %.1f s: %.1f MB/s, %s",
        len(jobs),
        total / 1e6,
        dt,
        total / 1e6 / max(dt, 1e-9),
        f"in this process, {workers} threads" if inline else f"{workers} worker processes",
    )
    return records


def _pool(jobs: list[Job], workers: int) -> dict[str, dict[str, Any]]:
    records, done_bytes = {}, 0
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        # largest first, so the last shards to finish are short ones
        by_size = sorted(jobs, key=lambda j: -j.shard.n_bytes)
        futures = {pool.submit(tokenize_shard, j): j for j in by_size}
        try:
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                records[job.shard.name] = future.result()
                done_bytes += job.shard.n_bytes
                _log.info("shard %s done (%d/%d)", job.shard.name, len(records), len(jobs))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # finished shards stay on disk
            raise
    return records


# --- 4. manifest --------------------------------------------------------------------------------


def manifest_of(
    plan: Plan, records: Mapping[str, dict], config: ml_collections.ConfigDict, root: str, tok
) -> dict[str, Any]:
    splits: dict[str, dict[str, Any]] = {}
    for shard in plan.shards:
        record = records[shard.name]
        entry = splits.setdefault(shard.split, {}).setdefault(
            shard.key,
            {
                "langs": [s.lang for s in shard.sides],
                "shards": [],
                "lines": 0,
                "sentences": 0,
                "tokens": [0] * len(shard.sides),
                "dropped": {},
                "replaced": {},
            },
        )
        entry["shards"].append(shard.name)
        entry["lines"] += shard.n_lines
        entry["sentences"] += record["sentences"]
        entry["tokens"] = [a + b for a, b in zip(entry["tokens"], record["tokens"], strict=True)]
        for what in ("dropped", "replaced", "labels"):  # labels: NLI shards only
            for reason, n in record.get(what, {}).items():
                counts = entry.setdefault(what, {})
                counts[reason] = counts.get(reason, 0) + n
    return {
        "format": prepared.FORMAT,
        "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size},
        "dtype": prepared.token_dtype(tok.vocab_size).name,
        "config": settings_of(config, root),
        "sources": plan.sources,
        "splits": splits,
        "shards": {name: {"files": r["files"]} for name, r in records.items()},
    }


def add_settings(c: ml_collections.ConfigDict) -> None:
    """The preparation settings of a config's ``data`` section."""
    # Training reads token shards prepared once (xlm_jax/data/prepare.py), never the raw text:
    # "" = prepare into WORKDIR/prepared at the first start (a restart reuses it while the
    # sources and the tokenizer are unchanged); or a directory written by
    # `python -m xlm_jax.prepare --config=THIS_CONFIG --out=DIR` (same sources)
    c.data.prepared = ""
    c.data.prepare_splits = "train,valid"  # the splits prepared; the others are read as text
    c.data.prepare_workers = 0  # tokenizing processes; 0 = every core of this machine
    c.data.shard_lines = 100_000  # lines of a source per shard (the unit of work and of resume)
    # What a line is: "text" (a sentence; pairs as 'SRC|TGT' files) or "nli"
    # (premise<TAB>hypothesis<TAB>label, as XNLI's TSV files or tfds:multi_nli / tfds:xnli)
    c.data.records = "text"
    # Sources of the prepared splits whose text is Moses-tokenized ("a cat , sleeping ."), as
    # written in them without line ranges, comma-separated: detokenized by their language's
    # rules before tokenizing, so they read like the other sources (e.g. SNLI beside XNLI)
    c.data.detokenize = ""


def settings_of(config: ml_collections.ConfigDict, root: str) -> dict[str, Any]:
    """What the prepared tokens depend on besides the sources' bytes and the tokenizer."""
    d = config.data
    return {
        "root": str(Path(root).absolute()),
        **{split: d[split] for split in splits_of(config)},
        "max_chars": d.max_chars,
        "on_invalid_utf8": d.on_invalid_utf8,
        "shard_lines": d.shard_lines,
        "records": records_of(config),
        # only when set: manifests written before the setting existed stay valid
        **({"detokenize": d.detokenize} if d.get("detokenize") else {}),
    }


def read_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        **corpus.read_options(config.data),
        "manual_dir": config.data.get("tfds_manual_dir") or None,
    }


def prepare(
    config: ml_collections.ConfigDict,
    out: str | os.PathLike,
    *,
    root: str,
    tokenizer_path: str | os.PathLike | None = None,
    workers: int = 0,
    part: tuple[int, int] | None = None,
) -> dict[str, Any] | None:
    """Prepares ``config``'s data.train and data.valid into ``out``; returns the manifest (None
    for a ``part`` of the shards: the run without ``part`` writes it)."""
    out = Path(out)
    t0 = time.perf_counter()
    if part is not None and not (Path(tokenizer_path or out / prepared.TOKENIZER)).exists():
        raise DataError(
            f"{tokenizer_path or out / prepared.TOKENIZER}: no tokenizer; the parts of a prepare "
            "share one: train it first (python -m xlm_jax.prepare --tokenizer_only) or give "
            "--tokenizer"
        )
    plan, tok, read_kw = prepare_tokenizer(config, out, root=root, tokenizer_path=tokenizer_path)
    records = {}
    jobs = []
    for n, shard in enumerate(plan.shards):
        record = finished(shard, out, tok.sha256)
        if record is not None:
            records[shard.name] = record
        elif part is None or n % part[1] == part[0]:
            jobs.append(Job(shard, str(out), tok.serialized, read_kw, root))
    _log.info("%d shards: %d already done, %d to do", len(plan.shards), len(records), len(jobs))
    records.update(run_jobs(jobs, workers if workers > 0 else available_cores()))
    if part is not None:
        return None
    manifest = manifest_of(plan, records, config, root, tok)
    write_atomic(out / prepared.MANIFEST, json.dumps(manifest, indent=1).encode())
    remove_unlisted(out, manifest)
    _log.info("prepared %s in %.1f s", out, time.perf_counter() - t0)
    return manifest


def remove_unlisted(out: Path, manifest: Mapping[str, Any]) -> None:
    """Deletes what the manifest does not list under ``out/shards``: shards of an earlier plan,
    temporary files of writes that were killed."""
    listed = {f"{name}.json" for name in manifest["shards"]}
    listed |= {file for record in manifest["shards"].values() for file in record["files"]}
    for path in sorted((out / "shards").rglob("*")):
        if path.is_file() and path.relative_to(out / "shards").as_posix() not in listed:
            path.unlink()


def prepare_tokenizer(
    config: ml_collections.ConfigDict,
    out: Path,
    *,
    root: str,
    tokenizer_path: str | os.PathLike | None = None,
):
    """The plan (sources scanned and checked), and the tokenizer: ``tokenizer_path``'s, else
    ``out``'s, else trained into ``out``; it is also ``out/tokenizer.model``."""
    plan = make_plan(config, root)
    read_kw = read_options(config)
    path = Path(tokenizer_path) if tokenizer_path else Path(out) / prepared.TOKENIZER
    tok = tokenizer_for(plan, config, path, read_kw, root)
    if path != Path(out) / prepared.TOKENIZER:
        write_atomic(Path(out) / prepared.TOKENIZER, tok.serialized)
    return plan, tok, read_kw


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- is a prepared set the one a config asks for? -----------------------------------------------


def differences(
    manifest: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    root: str,
    tokenizer_sha: str | None,
    *,
    hash_file: Callable[[Path], str] = lambda path: scan(path)["sha256"],
) -> list[str]:
    """Why ``manifest`` is not the preparation of ``config``'s data (empty: it is). A source
    whose size and mtime are as recorded is taken as unchanged; one with another mtime is hashed."""
    diffs = []
    now = settings_of(config, root)
    for k, v in manifest["config"].items():
        if now.get(k) != v:
            diffs.append(f"data.{k} is {now.get(k)!r}, prepared with {v!r}")
    if tokenizer_sha is not None and manifest["tokenizer"]["sha256"] != tokenizer_sha:
        diffs.append(
            f"tokenizer sha256 {tokenizer_sha[:12]}, prepared with "
            f"{manifest['tokenizer']['sha256'][:12]}"
        )
    for path, was in manifest["sources"].items():
        try:
            stat = os.stat(path)
        except OSError:
            diffs.append(f"{path} is missing")
            continue
        if stat.st_size != was["size"]:
            diffs.append(f"{path}: {stat.st_size} bytes, prepared from {was['size']}")
        elif stat.st_mtime_ns != was["mtime_ns"] and hash_file(Path(path)) != was["sha256"]:
            diffs.append(f"{path}: its content changed since it was prepared")
    return diffs


def ensure(
    config: ml_collections.ConfigDict,
    out: Path,
    *,
    root: str,
    tokenizer_path: Path,
    workers: int,
) -> None:
    """``out`` holds the preparation of ``config``'s data with the tokenizer at
    ``tokenizer_path`` (trained if missing): kept if it does, (re)prepared if not."""
    try:
        manifest = prepared.read_manifest(out)
    except DataError:
        manifest = None
    if manifest is not None and tokenizer_path.exists():
        sha = tokenizer_lib.Tokenizer.load(tokenizer_path).sha256
        diffs = differences(manifest, config, root, sha)
        if not diffs:
            _log.info("%s is the preparation of this config's data: reused", out)
            return
        _log.info("preparing %s again: %s", out, "; ".join(diffs))
    prepare(config, out, root=root, tokenizer_path=tokenizer_path, workers=workers)


def check_same_text(prepared_set: prepared.PreparedSet, config: ml_collections.ConfigDict) -> None:
    """A directory given as ``data.prepared`` was prepared from this config's data.train and
    data.valid (its root may be elsewhere: prepared on another machine)."""
    was = prepared_set.manifest["config"]
    for split in splits_of(config):
        if config.data[split] != was.get(split):
            raise DataError(
                f"data.prepared={prepared_set.path} was prepared from data.{split}="
                f"{was.get(split)!r}, but this config has {config.data[split]!r}; give the same "
                "sources or prepare them"
            )


def open_for_model(
    config: ml_collections.ConfigDict, workdir: Path, tokenizer: tokenizer_lib.Tokenizer
) -> prepared.PreparedSet:
    """The data tokenized with a given model's tokenizer (fine-tuning): ``data.prepared``, or
    prepared into WORKDIR/prepared by process 0 (reused while the sources and the tokenizer are
    unchanged)."""
    if config.data.prepared:
        prepared_set = prepared.PreparedSet.open(config.data.prepared)
        check_same_text(prepared_set, config)
        if prepared_set.tokenizer_sha256 != tokenizer.sha256:
            raise DataError(
                f"data.prepared={prepared_set.path} was prepared with tokenizer sha256 "
                f"{prepared_set.tokenizer_sha256[:12]}, the model's is {tokenizer.sha256[:12]}: "
                "prepare it with --tokenizer=<the model's tokenizer.model>"
            )
        return prepared_set
    out = workdir / "prepared"
    tokenizer_path = out / prepared.TOKENIZER

    def make() -> None:
        if not tokenizer_path.exists() or tokenizer_path.read_bytes() != tokenizer.serialized:
            write_atomic(tokenizer_path, tokenizer.serialized)
        ensure(
            config,
            out,
            root=config.data.root or "",
            tokenizer_path=tokenizer_path,
            workers=config.data.prepare_workers,
        )

    parallel.on_first_process(make, "xlm_jax: data prepared")
    return prepared.PreparedSet.open(out)


def streamed_tokenizer(
    config: ml_collections.ConfigDict, workdir: Path
) -> Callable[[Path], tokenizer_lib.Tokenizer]:
    """``train(path)``: a tokenizer trained at ``path`` on XLM's α-sample of data.train, read while
    streaming (a randomly initialised model's, ``pretrained.random_source``)."""

    def train(path: Path) -> tokenizer_lib.Tokenizer:
        out = Path(workdir) / "prepared"
        return prepare_tokenizer(config, out, root=config.data.root or "", tokenizer_path=path)[1]

    return train
