"""NLI data on the host: reading and checking labelled premise/hypothesis pairs, and packing them
into fixed-length rows and batches (numpy; nothing here touches a device).

Sources: XNLI TSV files (``premise<TAB>hypothesis<TAB>label``, XTREME's format, with an optional
``@START:END`` line range) or a prepared TFDS MultiNLI / XNLI split. Any bad row raises
``DataError`` naming the file and line (or the example). A pair becomes XLM's row
``</s> premise </s> hypothesis </s>`` (``src/evaluation/xnli.py``); a training epoch is a fresh
permutation of the rows, and evaluation visits every row once in order.

Fine-tuning never holds the text: ``data/prepare.py`` (``data.records = "nli"``) checks each line
with ``parse_line`` and tokenizes premises and hypotheses once; ``Pairs`` reads them back per row.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data import presets, sources
from xlm_jax.data.batches import lengths_of
from xlm_jax.data.sources import DataError
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

# XLM's label ids (src/evaluation/xnli.py: label2id).
LABELS = ("contradiction", "neutral", "entailment")
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}
# The 15 XNLI languages in the paper's column order (Table 1): en fr es de el bg ru tr ar vi th
# zh hi sw ur.
PAPER_LANGS: tuple[str, ...] = presets.XNLI15
XNLI_DEV_TRAIN_ROWS = 1990  # ../shared/data protocol: en rows 0..1989 train, 1990.. validate

Batch = dict[str, np.ndarray]
# A packed row: tokens, positions, langs, each (length,) int32.
Packed = tuple[np.ndarray, np.ndarray, np.ndarray]


class Example(NamedTuple):
    premise: str
    hypothesis: str
    label: int  # index into LABELS


def xnli_dev_sources(
    langs: Sequence[str] = PAPER_LANGS,
    directory: str = "xnli",
    n_train: int = XNLI_DEV_TRAIN_ROWS,
    train_langs: Sequence[str] = ("en",),
) -> tuple[str, str]:
    """(train, valid) source strings for the XNLI dev files laid out as in ../shared/data.

    Rows 0..n_train-1 of each training language's file fine-tune (the protocol: English only),
    rows n_train.. of every language validate. Since the files are row-parallel, translate-train
    on the same rows is ``train_langs=('en', 'fr', ...)`` (human translations, an upper bound).
    """
    train = "; ".join(f"{lang}: {directory}/{lang}.tsv@0:{n_train}" for lang in train_langs)
    valid = "; ".join(f"{lang}: {directory}/{lang}.tsv@{n_train}:" for lang in langs)
    return train, valid


# --- reading -------------------------------------------------------------------------------------


def read_xnli_tsv(
    path: str | os.PathLike,
    rows: slice | None = None,
    *,
    root: str | os.PathLike = "",
    **read_kw: Any,
) -> list[Example]:
    """Reads ``premise<TAB>hypothesis<TAB>label`` lines (XTREME's XNLI format, no header).

    ``path`` may carry a line range (``xnli/en.tsv@0:1990``), or ``rows`` gives one. Labels are
    ``entailment`` / ``neutral`` / ``contradiction``. Any malformed line raises ``DataError`` naming
    the file and its 1-based line.
    """
    spec = sources.parse_spec(os.fspath(path))
    if spec.kind != "file":
        raise DataError(f"{path}: read_xnli_tsv reads files; use read_nli for tfds: sources")
    if rows is not None:
        if spec.start is not None or spec.end is not None:
            raise DataError(f"{path}: give either a @START:END range or rows, not both")
        if rows.step not in (None, 1) or any(
            x is not None and x < 0 for x in (rows.start, rows.stop)
        ):
            raise DataError(f"{path}: rows {rows} must be a contiguous, non-negative slice")
        spec = dataclasses.replace(spec, start=rows.start, end=rows.stop)
    lines = sources.read_lines(spec, root, **read_kw)
    file = sources.resolve_path(spec, root)
    first = sources.first_line(spec, root)
    return [parse_line(line, f"{file}:{first + i + 1}") for i, line in enumerate(lines)]


def parse_line(line: str, where: str) -> Example:
    """One ``premise<TAB>hypothesis<TAB>label`` line; ``where`` (file:line) names it in errors."""
    cols = line.split("\t")
    if len(cols) != 3:
        raise DataError(
            f"{where}: {len(cols)} tab-separated column(s); expected 3: "
            "premise<TAB>hypothesis<TAB>label"
        )
    premise, hypothesis, label = (col.strip() for col in cols)
    if label not in LABEL_IDS:
        hint = " (a header line? the format has none)" if label.lower() == "label" else ""
        raise DataError(
            f"{where}: unknown label {label!r}{hint}; expected one of {', '.join(LABELS)}"
        )
    for name, text in (("premise", premise), ("hypothesis", hypothesis)):
        if not text:
            raise DataError(f"{where}: empty {name}; expected text")
    return Example(premise, hypothesis, LABEL_IDS[label])


def _text(value: Any, where: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 ({e.reason})") from None
    return str(value)


def read_tfds_nli(
    spec: str | sources.Spec, *, data_dir: str | os.PathLike | None = None
) -> list[Example]:
    """Pairs from a prepared TFDS NLI dataset: ``tfds:multi_nli:SPLIT:en[@A:B]`` (English
    MultiNLI) or ``tfds:xnli:SPLIT:LANG[@A:B]``. Never downloads: an unprepared dataset is an
    immediate ``DataError`` with the command that prepares it.
    """
    s = sources.parse_spec(spec) if isinstance(spec, str) else spec
    base = s.name.partition("/")[0]
    if s.kind != "tfds" or base not in ("multi_nli", "xnli"):
        raise DataError(f"{s}: expected tfds:multi_nli:SPLIT:en or tfds:xnli:SPLIT:LANG")
    if base == "multi_nli" and s.field != "en":
        raise DataError(f"{s}: MultiNLI is English; expected tfds:multi_nli:{s.split}:en")
    # The project's TFDS plumbing: builder lookup without download, prepared check, split check.
    builder = sources.prepared_builder(s, data_dir=data_dir, manual_dir=None)
    n = builder.info.splits[s.split].num_examples
    start, end = sources.line_bounds(s, n, str(s), "examples")
    fmt = builder.info.file_format.value if builder.info.file_format else "tfrecord"
    if fmt not in sources.RANDOM_ACCESS_FORMATS:
        raise DataError(
            f"{s}: stored as {fmt}, which needs TensorFlow to read; re-prepare it with "
            "--file_format=array_record"
        )
    label_names = builder.info.features["label"].names
    examples = builder.as_data_source(split=s.split).__getitems__(range(start, end))
    out = []
    for i, ex in zip(range(start, end), examples, strict=True):
        where = f"{s} example {i}"
        if base == "multi_nli":
            premise, hypothesis = _text(ex["premise"], where), _text(ex["hypothesis"], where)
        else:
            premise = _text(ex["premise"][s.field], where)
            hyp = ex["hypothesis"]
            langs = [_text(x, where) for x in hyp["language"]]
            if s.field not in langs:
                raise DataError(f"{where}: no hypothesis in {s.field!r} (has {langs})")
            hypothesis = _text(hyp["translation"][langs.index(s.field)], where)
        label = int(ex["label"])
        if not 0 <= label < len(label_names) or label_names[label] not in LABEL_IDS:
            raise DataError(f"{where}: label {label}; expected one of {label_names}")
        if not premise.strip() or not hypothesis.strip():
            raise DataError(f"{where}: empty premise or hypothesis")
        out.append(Example(premise.strip(), hypothesis.strip(), LABEL_IDS[label_names[label]]))
    return out


def read_nli(spec: str, root: str | os.PathLike = "", **read_kw: Any) -> list[Example]:
    """One NLI source: a TSV file (with an optional line range) or a tfds: spec."""
    s = sources.parse_spec(spec)
    if s.kind == "tfds":
        return read_tfds_nli(s, data_dir=read_kw.get("data_dir"))
    return read_xnli_tsv(spec, root=root, **read_kw)


def read_sets(text: str, where: str, *, root: str, **read_kw: Any) -> dict[str, list[Example]]:
    """``"en: a.tsv@0:10, b.tsv; fr: c.tsv"`` → {language: examples}, sources concatenated."""
    out = {}
    for lang, items in corpus_lib.source_items(text, where).items():
        if not lang.isalnum():
            raise DataError(f"{where}: {lang!r} is not a language code (expected e.g. 'en')")
        out[lang] = [ex for item in items for ex in read_nli(item, root, **read_kw)]
    return out


def check_three_classes(labels: Sequence[int] | np.ndarray, where: str) -> None:
    present = {int(x) for x in np.unique(np.asarray(labels))}
    if present != set(range(len(LABELS))):
        raise DataError(
            f"{where}: the training set has only the labels "
            f"{', '.join(LABELS[i] for i in sorted(present))}; expected all of {', '.join(LABELS)}"
        )


# --- rows and batches ----------------------------------------------------------------------------


def _cut(ids: np.ndarray, max_len: int) -> int:
    """Tokens kept of a sentence framed ``</s> ids </s>`` and cut to max_len (XLM's truncate)."""
    return min(len(ids), max_len - 2)


def sentence_length(ids: np.ndarray, max_len: int) -> int:
    """Tokens of the sentence's row before padding (``pack_sentence`` with room enough)."""
    return _cut(ids, max_len) + 2


def pack_pair(
    premise: np.ndarray, hypothesis: np.ndarray, lang_id: int, *, max_len: int, length: int
) -> Packed:
    """``</s> premise </s> hypothesis </s>`` padded to ``length`` (XLM's concat_batches with
    reset_positions=False): positions 0..n-1 over the row, ``lang_id`` everywhere.

    Each sentence first keeps at most ``max_len - 2`` tokens (XLM's truncate); a row still longer
    than ``length`` loses tokens from its longer sentence, one at a time.
    """
    n1, n2 = _cut(premise, max_len), _cut(hypothesis, max_len)
    excess = n1 + n2 + 3 - length
    if excess > 0:  # the longer sentence shrinks to the other's length, then both alternately
        first = min(excess, abs(n1 - n2))
        n1, n2 = (n1 - first, n2) if n1 >= n2 else (n1, n2 - first)
        rest = excess - first
        n1, n2 = n1 - (rest + 1) // 2, n2 - rest // 2
        if min(n1, n2) < 0:
            raise ValueError(f"length={length} cannot hold a pair row (at least 3 tokens)")
    n = n1 + n2 + 3
    tokens = np.full(length, PAD_ID, np.int32)
    tokens[:n] = np.concatenate([[EOS_ID], premise[:n1], [EOS_ID], hypothesis[:n2], [EOS_ID]])
    positions = np.zeros(length, np.int32)
    positions[:n] = np.arange(n)
    return tokens, positions, np.full(length, lang_id, np.int32)


def pack_sentence(ids: np.ndarray, lang_id: int, *, max_len: int, length: int) -> Packed:
    """``</s> sentence </s>`` padded to ``length`` (for sentence embeddings)."""
    n1 = min(_cut(ids, max_len), length - 2)
    tokens = np.full(length, PAD_ID, np.int32)
    tokens[: n1 + 2] = np.concatenate([[EOS_ID], ids[:n1], [EOS_ID]])
    positions = np.zeros(length, np.int32)
    positions[: n1 + 2] = np.arange(n1 + 2)
    return tokens, positions, np.full(length, lang_id, np.int32)


@dataclasses.dataclass
class Rows:
    """Encoded rows of one set: ``(n, length)`` tokens/positions/langs and ``(n,)`` labels."""

    tokens: np.ndarray
    positions: np.ndarray
    langs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def stack(packed: Sequence[Packed], labels: np.ndarray) -> Rows:
        """Rows from ``pack_pair`` / ``pack_sentence`` outputs and their labels."""
        return Rows(*(np.stack([row[k] for row in packed]) for k in range(3)), labels=labels)

    def batch(self, index: np.ndarray, batch_size: int) -> Batch:
        """Rows ``index`` (fewer than batch_size: the rest all-pad rows with weight 0)."""
        n, length = len(index), self.tokens.shape[1]
        pad = batch_size - n
        tokens = np.concatenate([self.tokens[index], np.full((pad, length), PAD_ID, np.int32)])
        zeros = np.zeros((pad, length), np.int32)
        return {
            "tokens": tokens,
            "positions": np.concatenate([self.positions[index], zeros]),
            "langs": np.concatenate([self.langs[index], zeros]),
            # (batch, 1): the same (batch, length) sharding as the token arrays
            "labels": np.concatenate([self.labels[index], np.zeros(pad, np.int32)])[:, None],
            "weights": (np.arange(batch_size) < n).astype(np.float32)[:, None],
        }


@dataclasses.dataclass
class Pairs:
    """One NLI set as prepared (``data.records = "nli"``): premises and hypotheses as id
    sequences read when a row needs them (``prepared.Sentences``, or lists), their label ids and
    the rows' language id."""

    premises: Sequence[np.ndarray]
    hypotheses: Sequence[np.ndarray]
    labels: np.ndarray
    lang_id: int

    def __len__(self) -> int:
        return len(self.labels)

    _sides: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def lengths(self, max_len: int) -> np.ndarray:
        """Each pair's row length before padding (``pack_pair`` with room enough), from the
        lengths alone: the offsets are read once, not at every epoch's evaluation."""
        if self._sides is None:
            self._sides = (lengths_of(self.premises), lengths_of(self.hypotheses))
        n1, n2 = self._sides
        return np.minimum(n1, max_len - 2) + np.minimum(n2, max_len - 2) + 3


def batch_of(sets: Sequence[Pairs], index: np.ndarray, *, max_len: int, length: int) -> Batch:
    """Rows ``index`` of ``sets`` laid end to end (``pack_pair``), labels and weights; an index
    of -1 is an all-pad row of weight 0. Only the pairs of these rows are read."""
    starts = np.cumsum([0] + [len(s) for s in sets])
    n = len(index)
    tokens = np.full((n, length), PAD_ID, np.int32)
    positions, langs = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
    labels, weights = np.zeros((n, 1), np.int32), np.zeros((n, 1), np.float32)
    for r, i in enumerate(np.asarray(index).tolist()):
        if i < 0:
            continue
        k = int(np.searchsorted(starts, i, side="right")) - 1
        s, j = sets[k], i - int(starts[k])
        premise, hypothesis = (np.asarray(x[j], np.int32) for x in (s.premises, s.hypotheses))
        row = pack_pair(premise, hypothesis, s.lang_id, max_len=max_len, length=length)
        tokens[r], positions[r], langs[r] = row
        labels[r, 0], weights[r, 0] = s.labels[j], 1.0
    # labels and weights are (batch, 1): the same (batch, length) sharding as the token arrays
    return {
        "tokens": tokens,
        "positions": positions,
        "langs": langs,
        "labels": labels,
        "weights": weights,
    }


def padded(index: np.ndarray, batch_size: int) -> np.ndarray:
    """``index`` topped up to ``batch_size`` with -1 (all-pad rows)."""
    out = np.full(batch_size, -1, np.int64)
    out[: len(index)] = index
    return out


def epoch_order(n: int, epoch: int, seed: int, epoch_size: int) -> np.ndarray:
    """The training rows of ``epoch``: a fresh permutation (a function of seed and epoch), cut at
    ``epoch_size`` (-1 = all), as XLM's new shuffled iterator per epoch."""
    rng = np.random.default_rng([seed, zlib.crc32(b"xnli-train"), epoch])
    order = rng.permutation(n)
    return order if epoch_size < 0 else order[: min(epoch_size, n)]


def eval_batches(rows: Rows, batch_size: int) -> list[Batch]:
    """Every row once, in order; the last batch topped up with all-pad rows of weight 0."""
    return [
        rows.batch(np.arange(i, min(i + batch_size, len(rows))), batch_size)
        for i in range(0, len(rows), batch_size)
    ]
