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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from xlm_jax.data.batches import (
    Batch,
    EpochIterator,
    _check_rows,
    _rng,
    lengths_of,
    permutation,
)
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

_log = logging.getLogger(__name__)

POOL_BATCHES = 50  # a pool sorted by length holds this many batches


def bucket_length(n_tokens: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n_tokens`` (a row's tokens, both ``</s>`` included)."""
    fitting = [b for b in buckets if b >= n_tokens]
    if not fitting:
        raise ValueError(f"{n_tokens} tokens do not fit in any bucket of {sorted(buckets)}")
    return min(fitting)


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
    """Epoch orders of length-homogeneous batches of sentence indices; subclasses build rows."""

    def _setup(
        self,
        keys: np.ndarray,
        batch_size: int,
        seed: int,
        name: str,
        shuffle: bool,
        rows: tuple[int, int] | None,
    ) -> None:
        self._keys, self.batch_size, self.seed, self.name = keys, batch_size, seed, name
        self.shuffle = shuffle
        self.rows = _check_rows(rows, batch_size, name)
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def _epoch_batches(self) -> np.ndarray:
        """``(n_batches, batch_size)`` sentence indices of the current epoch."""
        if self._order is None:
            n, bs = len(self._keys), self.batch_size
            rng = _rng(self.seed, self.name, self.epoch)
            order = permutation(rng, n) if self.shuffle else np.arange(n)
            order = np.resize(order, -(-n // bs) * bs)  # top up with its own first sentences
            pool = POOL_BATCHES * bs
            for i in range(0, len(order), pool):
                chunk = order[i : i + pool]
                order[i : i + pool] = chunk[np.argsort(self._keys[chunk], kind="stable")]
            batches = order.reshape(-1, bs)
            self._order = batches[rng.permutation(len(batches))] if self.shuffle else batches
        return self._order

    def _read(self, sentences: Sequence[np.ndarray], i: int) -> np.ndarray:
        """Kept sentence ``i``: read only now, for a row this process builds."""
        return np.asarray(sentences[int(self.keep[i])], np.int32)

    def _next_indices(self) -> np.ndarray:
        """The global batch's sentence indices; advances the state."""
        batches = self._epoch_batches()
        idx = batches[self.cursor]
        self.cursor += 1
        if self.cursor == len(batches):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return idx


class SentenceBatches(_BucketedBatches):
    """Monolingual batches of whole sentences, length-bucketed (denoising AE, back-translation)."""

    def __init__(
        self,
        sentences: Sequence[np.ndarray],
        *,
        lang_id: int,
        batch_size: int,
        buckets: Sequence[int],
        seed: int,
        name: str,
        shuffle: bool = True,
        rows: tuple[int, int] | None = None,
    ) -> None:
        max_len = max(buckets) - 2
        # Empty sentences teach nothing and long ones do not fit: dropped, counted.
        lengths = lengths_of(sentences)
        self.keep = np.flatnonzero((lengths > 0) & (lengths <= max_len))
        self.n_dropped = len(sentences) - len(self.keep)
        if not len(self.keep):
            raise ValueError(f"{name}: no sentence is non-empty and at most {max_len} tokens")
        self.sentences, self.lang_id, self.buckets = sentences, lang_id, tuple(buckets)
        self._setup(lengths[self.keep], batch_size, seed, name, shuffle, rows)

    def __next__(self) -> Batch:
        idx = self._next_indices()
        length = bucket_length(int(self._keys[idx].max()) + 2, self.buckets)
        mine = [self._read(self.sentences, i) for i in idx[self.rows[0] : self.rows[1]]]
        return _rows(mine, length, self.lang_id)


class ParallelBatches(_BucketedBatches):
    """Batches of aligned pairs, pools sorted by (target, source) length (MT)."""

    def __init__(
        self,
        src: Sequence[np.ndarray],
        tgt: Sequence[np.ndarray],
        *,
        src_lang: int,
        tgt_lang: int,
        batch_size: int,
        buckets: Sequence[int],
        seed: int,
        name: str,
        shuffle: bool = True,
        rows: tuple[int, int] | None = None,
    ) -> None:
        _check_aligned(src, tgt, name)
        max_len = max(buckets) - 2
        n_src, n_tgt = lengths_of(src), lengths_of(tgt)
        fits = (n_src > 0) & (n_src <= max_len) & (n_tgt > 0) & (n_tgt <= max_len)
        self.keep = np.flatnonzero(fits)
        self.n_dropped = len(src) - len(self.keep)
        if not len(self.keep):
            raise ValueError(f"{name}: no pair has both sides non-empty and <= {max_len} tokens")
        self.src, self.tgt = src, tgt
        self.src_lang, self.tgt_lang, self.buckets = src_lang, tgt_lang, tuple(buckets)
        self._src_len, self._tgt_len = n_src[self.keep], n_tgt[self.keep]
        keys = self._tgt_len * (max_len + 1) + self._src_len
        self._setup(keys, batch_size, seed, name, shuffle, rows)

    def __next__(self) -> Batch:
        idx = self._next_indices()
        mine = idx[self.rows[0] : self.rows[1]]
        src_len = bucket_length(int(self._src_len[idx].max()) + 2, self.buckets)
        tgt_len = bucket_length(int(self._tgt_len[idx].max()) + 2, self.buckets)
        return {
            **_rows([self._read(self.src, i) for i in mine], src_len, self.src_lang, "src_"),
            **_rows([self._read(self.tgt, i) for i in mine], tgt_len, self.tgt_lang, "tgt_"),
        }


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
