"""Host-side batches of whole sentences (numpy) for translation: MT, denoising AE, back-translation.

A row is XLM's ``</s> w1 ... wn </s>`` followed by ``PAD_ID``; positions are ``0..n+1`` and 0 at
the pads; langs is the sentence's language id at every position, pads included.

Rows are padded to a *bucket* length (the smallest of ``buckets`` that fits the longest sentence
of the global batch) so a run sees only ``len(buckets)`` shapes, i.e. that many XLA compilations.
Training batches group sentences of similar length, as XLM's ``group_by_size``: each epoch's
random order is cut into pools of ``50 * batch_size`` sentences, each pool is sorted by length and
cut into batches, and the batches are visited in random order.

Epoch rule: every batch has exactly ``batch_size`` rows. When ``batch_size`` does not divide the
number of sentences, the epoch's random order is topped up, before pooling, with its own first
sentences (cyclically if there are fewer sentences than a batch), so every sentence is seen at least
once per epoch and ``-n % batch_size`` random ones twice. Nothing carries over between epochs, so
the state ``(epoch, cursor)`` (cursor = batches taken in the epoch) resumes exactly.

Token budget (XLM's ``--tokens_per_batch``, ``tokens_per_batch > 0``): a batch whose rows are
padded to bucket ``L`` has ``budget_rows(tokens_per_batch, L, row_multiple)`` rows, one row count
per bucket, so the shapes stay one per bucket. The epoch's random order is cut into pools of about
50 batches (``50 * tokens_per_batch`` tokens at the mean row length), each pool sorted by length,
and the sorted epoch is cut greedily: a batch takes sentences while their count stays within the
rows of the bucket of its longest one (for pairs: the longer side's bucket, so each side's
``rows x length`` stays within the budget). Each batch is completed to its rows with all-PAD rows
(no loss, no tokens), batches are visited in random order, and every kept sentence is seen exactly
once per epoch: no top-up. The state is ``(epoch, cursor)`` as above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xlm_jax.data.batches import (
    Batch,
    EpochIterator,
    _check_rows,
    _rng,
    kept_pairs,
    lengths_of,
    pair_rows,
    permutation,
)
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

_log = logging.getLogger(__name__)

POOL_BATCHES = 50  # a pool sorted by length holds this many batches

RowsOf = Callable[[int], tuple[int, int]]  # a global batch's rows -> this process's [start, stop)


def bucket_length(n_tokens: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n_tokens`` (a row's tokens, both ``</s>`` included)."""
    fitting = [b for b in buckets if b >= n_tokens]
    if not fitting:
        raise ValueError(f"{n_tokens} tokens do not fit in any bucket of {sorted(buckets)}")
    return min(fitting)


def budget_rows(tokens_per_batch: int, length: int, row_multiple: int = 1) -> int:
    """Rows of a token-budget batch padded to ``length``: as many as ``tokens_per_batch`` holds,
    rounded down to a multiple of ``row_multiple`` (the batch's data-parallel split)."""
    return (tokens_per_batch // length) // row_multiple * row_multiple


def check_budget(
    tokens_per_batch: int,
    buckets: Sequence[int],
    row_multiple: int = 1,
    *,
    setting: str = "tokens_per_batch",
    or_else: str = "shorter length_buckets",
) -> None:
    """A budget must give the longest bucket at least ``row_multiple`` rows (one per shard).
    The error names the task's ``setting`` and its other way out (``or_else``)."""
    longest = max(buckets)
    if budget_rows(tokens_per_batch, longest, row_multiple) < row_multiple:
        raise ValueError(
            f"{setting}={tokens_per_batch} gives {tokens_per_batch // longest} rows of the "
            f"longest bucket ({longest} tokens), fewer than the {row_multiple}-way batch split: "
            f"it needs at least {row_multiple * longest} (or {or_else})"
        )


def greedy_cut(caps: np.ndarray) -> np.ndarray:
    """Bounds of batches over items taken in order: a batch grows while its size stays within
    the smallest ``caps`` entry among its items (every cap >= 1). A Python loop: about a second
    per 5M items, once per epoch."""
    bounds, count, cap = [0], 0, 0
    for i, c in enumerate(caps.tolist()):
        cap = c if count == 0 else min(cap, c)
        if count >= cap:  # this item would overfill the batch: it opens the next one
            bounds.append(i)
            count, cap = 0, c
        count += 1
    bounds.append(len(caps))
    return np.asarray(bounds, np.int64)


def shuffled_batches(
    rng: np.random.Generator, order: np.ndarray, bounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The batches ``order[bounds[k]:bounds[k+1]]`` in ``rng.permutation``'s order."""
    perm = rng.permutation(len(bounds) - 1)
    sizes = np.diff(bounds)[perm]
    new = np.zeros(len(perm) + 1, np.int64)
    np.cumsum(sizes, out=new[1:])
    # item j of new batch k comes from old position bounds[perm[k]] + j
    gather = np.repeat(bounds[:-1][perm] - new[:-1], sizes) + np.arange(len(order))
    return order[gather], new


def _rows(sents: Sequence[np.ndarray | None], length: int, lang_id: int, prefix: str = "") -> Batch:
    """``</s> s </s>`` rows padded to ``length``; ``None`` entries become all-pad rows."""
    tokens = np.full((len(sents), length), PAD_ID, np.int32)
    positions = np.zeros((len(sents), length), np.int32)
    for r, s in enumerate(sents):
        if s is not None:
            tokens[r, : len(s) + 2] = np.concatenate([[EOS_ID], s, [EOS_ID]])
            positions[r, : len(s) + 2] = np.arange(len(s) + 2)
    langs = np.full((len(sents), length), lang_id, np.int32)
    return {f"{prefix}tokens": tokens, f"{prefix}positions": positions, f"{prefix}langs": langs}


class _BucketedBatches(EpochIterator):
    """Epoch plans of length-homogeneous batches of sentence indices; subclasses build rows.

    Settings (keyword arguments of the subclasses): ``batch_size``, ``seed``, ``name``,
    ``shuffle`` (True), this process's rows as a fixed slice ``rows=(start, stop)`` of
    ``batch_size`` rows or as ``rows_of(global rows) -> (start, stop)`` (default: all rows), and
    ``tokens_per_batch`` (-1: ``batch_size`` rows) with ``row_multiple`` (rows split evenly in
    that many shards).
    """

    def _setup(
        self,
        keys: np.ndarray,
        row_tokens: np.ndarray,
        buckets: Sequence[int],
        *,
        batch_size: int,
        seed: int,
        name: str,
        shuffle: bool = True,
        rows: tuple[int, int] | None = None,
        rows_of: RowsOf | None = None,
        tokens_per_batch: int = -1,
        row_multiple: int = 1,
    ) -> None:
        """``keys`` sort a pool; ``row_tokens`` (the longest side's tokens, ``</s>`` included)
        decide each item's bucket and thus, with a token budget, the rows it allows."""
        self._keys, self.batch_size, self.seed, self.name = keys, batch_size, seed, name
        self.shuffle, self.buckets = shuffle, tuple(buckets)
        self.tokens_per_batch, self.row_multiple = int(tokens_per_batch), int(row_multiple)
        if rows is not None and (rows_of is not None or self.tokens_per_batch > 0):
            raise ValueError(f"{name}: rows=(start, stop) is for fixed batches alone; use rows_of")
        self._rows_of: RowsOf = rows_of or (lambda n: (0, n))
        if self.tokens_per_batch > 0:
            self._plan_budget(row_tokens)
        else:
            self.rows = _check_rows(rows or self._rows_of(batch_size), batch_size, name)
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None
        self._bounds = np.zeros(1, np.int64)

    def _plan_budget(self, row_tokens: np.ndarray) -> None:
        """Each bucket's rows (``bucket_rows``), each item's (its bucket's) and the pool size."""
        check_budget(self.tokens_per_batch, self.buckets, self.row_multiple)
        sizes = np.array(sorted(self.buckets))
        per_bucket = [budget_rows(self.tokens_per_batch, int(b), self.row_multiple) for b in sizes]
        self.bucket_rows = dict(zip(sizes.tolist(), per_bucket, strict=True))
        self._caps = np.array(per_bucket, np.int64)[np.searchsorted(sizes, row_tokens)]
        # about POOL_BATCHES batches of rows of the mean length
        self._pool = max(1, POOL_BATCHES * self.tokens_per_batch // int(row_tokens.mean()))
        self._row_tokens = row_tokens
        # pools sorted by the longer side first (pairs), so a batch's rows are rarely cut short
        self._budget_keys = row_tokens.astype(np.int64) * (int(self._keys.max()) + 1) + self._keys
        self.shapes: set[tuple[int, int]] = set()  # (rows, bucket) served: one compile each

    def __len__(self) -> int:
        return len(self._keys)

    def plan_key(self) -> dict[str, Any] | None:
        """None for ``batch_size`` batches, as saved before token budgets (``EpochIterator``)."""
        return None if self.tokens_per_batch <= 0 else self._plan()

    def _plan(self) -> dict[str, Any]:
        plan = {"batch_size": self.batch_size, "buckets": list(self.buckets)}
        if self.tokens_per_batch > 0:  # rows per bucket: the budget and the batch split
            plan |= {"tokens_per_batch": self.tokens_per_batch, "row_multiple": self.row_multiple}
        return plan

    @staticmethod
    def _sorted_pools(order: np.ndarray, pool: int, keys: np.ndarray) -> np.ndarray:
        for i in range(0, len(order), pool):
            chunk = order[i : i + pool]
            order[i : i + pool] = chunk[np.argsort(keys[chunk], kind="stable")]
        return order

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's sentence order and its batch bounds (``_order`` = None: derive again)."""
        if self._order is None:
            n, bs = len(self._keys), self.batch_size
            rng = _rng(self.seed, self.name, self.epoch)
            order = permutation(rng, n) if self.shuffle else np.arange(n)
            if self.tokens_per_batch > 0:
                order = self._sorted_pools(order, self._pool, self._budget_keys)
                bounds = greedy_cut(self._caps[order])
            else:
                order = np.resize(order, -(-n // bs) * bs)  # top up with its own first sentences
                order = self._sorted_pools(order, POOL_BATCHES * bs, self._keys)
                bounds = np.arange(0, len(order) + 1, bs)
            if self.shuffle:
                order, bounds = shuffled_batches(rng, order, bounds)
            self._order, self._bounds = order, bounds
        return self._order, self._bounds

    def epoch_batches(self) -> int:
        """Batches of the current epoch."""
        return len(self._epoch_plan()[1]) - 1

    def _peek(self) -> np.ndarray:
        """The next global batch's sentence indices (kept-sentence numbers)."""
        order, bounds = self._epoch_plan()
        return order[bounds[self.cursor] : bounds[self.cursor + 1]]

    def next_rows(self) -> int:
        """Rows of the global batch the next ``next()`` returns; the state does not move."""
        if self.tokens_per_batch <= 0:
            return self.batch_size
        return int(self._caps[self._peek()].min())  # the rows of its longest sentence's bucket

    def _note_shape(self, rows: int, length: int) -> None:
        if (rows, length) not in self.shapes:  # a new shape: the steps compile for it
            self.shapes.add((rows, length))
            _log.info("%s: batch of %d rows at bucket %d (first seen)", self.name, rows, length)

    def _read(self, sentences: Sequence[np.ndarray], i: int) -> np.ndarray:
        """Kept sentence ``i``: read only now, for a row this process builds."""
        return np.asarray(sentences[int(self.keep[i])], np.int32)

    def _next_indices(self) -> tuple[np.ndarray, list[int | None]]:
        """The global batch's sentence indices, and this process's rows of it (``None``: an
        all-PAD row completing a token-budget batch); advances the state."""
        idx, n_rows = self._peek(), self.next_rows()
        self.cursor += 1
        if self.cursor == len(self._bounds) - 1:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        if self.tokens_per_batch <= 0:
            return idx, list(idx[self.rows[0] : self.rows[1]])
        self._note_shape(n_rows, bucket_length(int(self._row_tokens[idx].max()), self.buckets))
        start, stop = _check_rows(self._rows_of(n_rows), n_rows, self.name)
        padded = [*idx.tolist(), *[None] * (n_rows - len(idx))]
        return idx, padded[start:stop]


class SentenceBatches(_BucketedBatches):
    """Monolingual batches of whole sentences, length-bucketed (denoising AE, back-translation)."""

    def __init__(
        self,
        sentences: Sequence[np.ndarray],
        *,
        lang_id: int,
        buckets: Sequence[int],
        **settings: Any,
    ) -> None:
        max_len = max(buckets) - 2
        name = settings["name"]
        # Empty sentences teach nothing and long ones do not fit: dropped, counted.
        lengths = lengths_of(sentences)
        self.keep = np.flatnonzero((lengths > 0) & (lengths <= max_len))
        self.n_dropped = len(sentences) - len(self.keep)
        if not len(self.keep):
            raise ValueError(f"{name}: no sentence is non-empty and at most {max_len} tokens")
        self.sentences, self.lang_id = sentences, lang_id
        self._setup(lengths[self.keep], lengths[self.keep] + 2, buckets, **settings)

    def __next__(self) -> Batch:
        idx, mine = self._next_indices()
        length = bucket_length(int(self._keys[idx].max()) + 2, self.buckets)
        rows = [None if i is None else self._read(self.sentences, i) for i in mine]
        return _rows(rows, length, self.lang_id)


class ParallelBatches(_BucketedBatches):
    """Batches of aligned pairs, pools sorted by (target, source) length (MT)."""

    def __init__(
        self,
        src: Sequence[np.ndarray],
        tgt: Sequence[np.ndarray],
        *,
        src_lang: int,
        tgt_lang: int,
        buckets: Sequence[int],
        **settings: Any,
    ) -> None:
        name = settings["name"]
        _check_aligned(src, tgt, name)
        max_len = max(buckets) - 2
        n_src, n_tgt = lengths_of(src), lengths_of(tgt)
        fits = (n_src > 0) & (n_src <= max_len) & (n_tgt > 0) & (n_tgt <= max_len)
        self.keep = np.flatnonzero(fits)
        self.n_dropped = len(src) - len(self.keep)
        if not len(self.keep):
            raise ValueError(f"{name}: no pair has both sides non-empty and <= {max_len} tokens")
        self.src, self.tgt = src, tgt
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self._src_len, self._tgt_len = n_src[self.keep], n_tgt[self.keep]
        keys = self._tgt_len * (max_len + 1) + self._src_len
        longer = np.maximum(self._src_len, self._tgt_len) + 2
        self._setup(keys, longer, buckets, **settings)

    def __next__(self) -> Batch:
        idx, mine = self._next_indices()
        src_len = bucket_length(int(self._src_len[idx].max()) + 2, self.buckets)
        tgt_len = bucket_length(int(self._tgt_len[idx].max()) + 2, self.buckets)
        src = [None if i is None else self._read(self.src, i) for i in mine]
        tgt = [None if i is None else self._read(self.tgt, i) for i in mine]
        return {
            **_rows(src, src_len, self.src_lang, "src_"),
            **_rows(tgt, tgt_len, self.tgt_lang, "tgt_"),
        }


class BucketedPairBatches(_BucketedBatches):
    """TLM rows ``</s> src </s></s> tgt </s>`` (``batches.pack_pair``), one pair each, every
    batch padded to the smallest of ``buckets`` holding its longest row: ``batch_size`` rows or,
    with ``tokens_per_batch``, that bucket's rows. Batches are formed as translation's
    (this module's: pools sorted by length, every kept pair once per epoch with a budget,
    state ``(epoch, cursor)``, ``next_rows()``, this process's rows only via ``rows_of``).
    The pairs kept are ``batches.PairBatches``' for rows of ``max(buckets)`` tokens."""

    def __init__(
        self,
        src: Sequence[np.ndarray],
        tgt: Sequence[np.ndarray],
        *,
        src_lang: int,
        tgt_lang: int,
        buckets: Sequence[int],
        **settings: Any,
    ) -> None:
        keep, row_tokens = kept_pairs(src, tgt, max(buckets), settings["name"])
        self.keep, self.n_dropped = keep, len(src) - len(keep)
        self.tokens = int(row_tokens[keep].sum())  # of its rows, padding aside
        self.src, self.tgt, self.src_lang, self.tgt_lang = src, tgt, src_lang, tgt_lang
        # pools sorted by row length: a batch's rows are about as long as its bucket
        self._setup(row_tokens[keep], row_tokens[keep], buckets, **settings)

    def plan_key(self) -> dict[str, Any]:
        """Always kept: a TLM entry's batches were ``PairBatches``' before buckets existed."""
        return self._plan()

    def __next__(self) -> Batch:
        idx, mine = self._next_indices()
        length = bucket_length(int(self._keys[idx].max()), self.buckets)
        pairs = [
            None if i is None else (self._read(self.src, i), self._read(self.tgt, i)) for i in mine
        ]
        return pair_rows(pairs, self.src_lang, self.tgt_lang, length)


def _check_aligned(src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], name: str) -> None:
    if len(src) != len(tgt):
        raise ValueError(f"{name}: {len(src)} source but {len(tgt)} target sentences")


class EvalBatches(list[tuple[Batch, np.ndarray]]):
    """``[(batch, indices), ...]``; ``n_truncated`` counts sentences (pairs) cut to fit."""

    n_truncated: int = 0


def _eval(
    sides: list[tuple[Sequence[np.ndarray], int, str]],
    batch_size: int,
    buckets: Sequence[int],
    what: str,
) -> EvalBatches:
    """Every sentence (pair) once: evaluation must cover the whole corpus.

    Sorted by length (the last side's first) so batches pad little; each batch has ``batch_size``
    rows, the missing ones all-PAD, and comes with the original index of each row (-1 for pad rows)
    to put outputs back in corpus order. Sentences longer than ``max(buckets) - 2`` are truncated,
    not dropped: counted in the result's ``n_truncated`` and logged.
    """
    max_len = max(buckets) - 2
    n = len(sides[0][0])
    long = np.zeros(n, bool)
    for sents, _, _ in sides:
        long |= np.array([len(s) > max_len for s in sents], bool)
    cut = [[np.asarray(s, np.int32)[:max_len] for s in sents] for sents, _, _ in sides]
    # Sorted by the last side's length first (the target, which dominates decoding), then others.
    order = np.lexsort([np.array([len(s) for s in c], np.int64) for c in cut])
    out = EvalBatches()
    out.n_truncated = int(long.sum())
    if out.n_truncated:
        _log.warning("%s: %d of %d truncated to %d tokens", what, out.n_truncated, n, max_len)
    for i in range(0, n, batch_size):
        idx = np.full(batch_size, -1, np.int64)
        idx[: len(order[i : i + batch_size])] = order[i : i + batch_size]
        batch: Batch = {}
        for c, (_, lang, prefix) in zip(cut, sides, strict=True):
            rows = [c[j] if j >= 0 else None for j in idx]
            length = bucket_length(max(len(r) for r in rows if r is not None) + 2, buckets)
            batch.update(_rows(rows, length, lang, prefix))
        out.append((batch, idx))
    return out


def eval_sentence_batches(
    sentences: Sequence[np.ndarray], *, lang_id: int, batch_size: int, buckets: Sequence[int]
) -> EvalBatches:
    """All sentences, each once (empty ones too), for evaluation; see :func:`_eval`."""
    return _eval([(sentences, lang_id, "")], batch_size, buckets, "sentences")


def eval_parallel_batches(
    src: Sequence[np.ndarray],
    tgt: Sequence[np.ndarray],
    *,
    src_lang: int,
    tgt_lang: int,
    batch_size: int,
    buckets: Sequence[int],
) -> EvalBatches:
    """All pairs, each once (empty sides too), keyed ``src_*``/``tgt_*``; see :func:`_eval`."""
    _check_aligned(src, tgt, "eval")
    return _eval([(src, src_lang, "src_"), (tgt, tgt_lang, "tgt_")], batch_size, buckets, "pairs")
