"""The shared SentencePiece BPE vocabulary of all languages, with XLM's fixed special ids.

XLM learns one BPE vocabulary on a sample of the monolingual corpora in which language l is drawn
with probability p_l ∝ (n_l / N)^α (α = 0.5), so that low-resource languages are not split into
characters. The ids of the special symbols are fixed (they are baked into the model and data code;
defined in `specials`, imported from here):

    <s>=0  </s>=1 (sentence separator)  <pad>=2  <unk>=3  <special0..9>=4..13, <special1> = mask

`<special*>` are SentencePiece *control* symbols: they own an id but are never produced by
`encode`, so a literal "<special1>" in a corpus is ordinary text, not a mask token.

Models imported from XLM / HuggingFace keep XLM's own tokenization (Moses + fastBPE, same special
ids): `xlm_bpe.XLMBPETokenizer`, which `Tokenizer.from_bytes` / `load` return for its bytes. It
has the same interface, but is no subclass: this module imports `xlm_bpe` to dispatch to it, so
`xlm_bpe` must not import this module back.
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from xlm_jax.core.files import write_atomic
from xlm_jax.text.specials import (  # the special ids: callers import them from this module
    BOS_ID,
    BOS_PIECE,
    EOS_ID,
    EOS_PIECE,
    N_SPECIAL,
    PAD_ID,
    PAD_PIECE,
    SPECIAL_PIECES,
    UNK_ID,
    UNK_PIECE,
    XLM_BPE_MAGIC,
    Serialized,
)
from xlm_jax.text.specials import MASK_ID as MASK_ID  # re-exported, unused here
from xlm_jax.text.xlm_bpe import XLMBPETokenizer

_log = logging.getLogger(__name__)


# --- the vocabulary -----------------------------------------------------------------------------


class Tokenizer(Serialized):
    """A loaded SentencePiece model whose special ids were checked against the constants above."""

    def __init__(self, serialized: bytes) -> None:
        if not isinstance(serialized, bytes):
            raise TypeError(f"expected the serialized model as bytes, got {type(serialized)}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(serialized)
        except RuntimeError as e:
            raise ValueError(f"not a valid SentencePiece model: {e}") from e
        _check_special_ids(sp)
        self._sp = sp
        self._serialized = serialized

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer | XLMBPETokenizer:
        data = Path(path).read_bytes()
        try:
            return cls.from_bytes(data)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    @classmethod
    def from_bytes(cls, serialized: bytes) -> Tokenizer | XLMBPETokenizer:
        """The tokenizer of `serialized`: a SentencePiece model, or (by its header) an imported
        XLM model's fastBPE tokenizer (`xlm_bpe.XLMBPETokenizer`, same interface)."""
        if isinstance(serialized, bytes) and serialized.startswith(XLM_BPE_MAGIC):
            return XLMBPETokenizer.from_bytes(serialized)
        return cls(serialized)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, text: str, lang: str | None = None) -> np.ndarray:
        """int32 ids of the pieces of `text`; no <s>/</s> added (the data pipeline frames).

        `lang` is for tokenizers with per-language rules (XLM's Moses); SentencePiece ignores it.
        """
        return self._sp.Encode(text, add_bos=False, add_eos=False, return_type="numpy")

    def encode_many(
        self, texts: Sequence[str], lang: str | None = None, *, threads: int = -1
    ) -> list[np.ndarray]:
        """Batch `encode`: one call into SentencePiece, which encodes on `threads` threads (-1:
        its default, all cores; a pool of worker processes gives each one)."""
        if isinstance(texts, str):
            raise TypeError("encode_many takes a sequence of strings; use encode for one string")
        return self._sp.Encode(
            list(texts), add_bos=False, add_eos=False, return_type="numpy", num_threads=threads
        )

    def decode(self, ids: Iterable[int] | np.ndarray, lang: str | None = None) -> str:
        """Text of `ids`; special ids (< N_SPECIAL, including <unk>) are dropped, not rendered."""
        arr = self.checked_ids(ids)
        return self._sp.Decode(arr[arr >= N_SPECIAL].tolist())

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`, or UNK_ID if it is not in the vocabulary."""
        return self._sp.PieceToId(piece)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def _check_special_ids(sp: spm.SentencePieceProcessor) -> None:
    """Rejects models (e.g. a foreign spm file) whose special ids differ from the constants."""
    problems = []
    for name, got, want in (
        ("bos", sp.bos_id(), BOS_ID),
        ("eos", sp.eos_id(), EOS_ID),
        ("pad", sp.pad_id(), PAD_ID),
        ("unk", sp.unk_id(), UNK_ID),
    ):
        if got != want:
            problems.append(f"{name}_id is {got}, expected {want}")
    n = sp.GetPieceSize()
    if n <= N_SPECIAL:
        problems.append(f"only {n} pieces, need more than the {N_SPECIAL} special ones")
    for i, want in enumerate(SPECIAL_PIECES[: min(n, N_SPECIAL)]):
        piece = sp.IdToPiece(i)
        if piece != want:
            problems.append(f"id {i} is {piece!r}, expected {want!r}")
        elif i != UNK_ID and not sp.IsControl(i):
            # A user-defined (non-control) <special1> would be produced from literal corpus text.
            problems.append(f"id {i} ({piece!r}) is not a control symbol")
    if problems:
        raise ValueError(
            "SentencePiece model does not use xlm_jax's special ids: " + "; ".join(problems)
        )


# --- training -----------------------------------------------------------------------------------


def sample_sentences(
    texts: Mapping[str, Sequence[str]], n_sentences: int, alpha: float, seed: int
) -> tuple[list[str], dict[str, float]]:
    """XLM's smoothed multinomial sample of the corpora for learning BPE: the sentences of
    `sample_indices` (languages in sorted order) and {lang: p_l} (sorted by language)."""
    if not texts:
        raise ValueError("sample_sentences needs at least one language")
    picks, probs = sample_indices(
        {lang: len(t) for lang, t in texts.items()}, n_sentences, alpha, seed
    )
    sample = [texts[lang][i] for lang, idx in picks.items() for i in idx.tolist()]
    return sample, probs


def sample_indices(
    sizes: Mapping[str, int], n_sentences: int, alpha: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Which sentences (indices, in sample order) each language gives to the BPE sample.

    p_l = (n_l/N)^alpha / sum_k (n_k/N)^alpha; language l contributes round(n_sentences * p_l)
    sentences (Python's round: half to even). They are drawn in whole passes over the language's
    sentences, each pass without replacement, so no sentence repeats before all have been used.
    The draw of language l depends only on (seed, l, n_l), through a numpy Generator seeded with
    (seed, crc32(l)) (Python's `hash` of a str changes per process). Only the sizes are needed, so
    a corpus too large for memory is sampled while streamed (`data/prepare.py`).
    """
    if not sizes:
        raise ValueError("sample_sentences needs at least one language")
    if n_sentences < 1:
        raise ValueError(f"n_sentences must be >= 1, got {n_sentences}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    langs = sorted(sizes)  # the sample must not depend on the mapping's order
    empty = [lang for lang in langs if sizes[lang] == 0]
    if empty:
        raise ValueError(f"no sentences for language(s) {empty}")
    counts = np.array([sizes[lang] for lang in langs], dtype=np.float64)
    weights = (counts / counts.sum()) ** alpha
    probs = weights / weights.sum()
    picks = {}
    for lang, p in zip(langs, probs, strict=True):
        n = sizes[lang]
        rng = np.random.default_rng([seed, zlib.crc32(lang.encode("utf-8"))])
        passes, rest = divmod(round(n_sentences * float(p)), n)
        order = [rng.permutation(n) for _ in range(passes)]
        order.append(rng.choice(n, size=rest, replace=False))
        picks[lang] = np.concatenate(order)
    return picks, {lang: float(p) for lang, p in zip(langs, probs, strict=True)}


def _trainer_options(vocab_size: int, character_coverage: float) -> dict[str, Any]:
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_piece=BOS_PIECE,
        eos_piece=EOS_PIECE,
        pad_piece=PAD_PIECE,
        unk_piece=UNK_PIECE,
        control_symbols=list(SPECIAL_PIECES[4:]),  # ids 4..13, in order, after the meta pieces
        hard_vocab_limit=False,  # a tiny corpus may not support vocab_size merges
        byte_fallback=False,
        # (train_extremely_large_corpus is deprecated and ignored by sentencepiece 0.2.x: not set)
        # Determinism: we pass exactly the (already sampled) sentences to use, so SentencePiece
        # must neither subsample (input_sentence_size=0 = all) nor shuffle them — those are its
        # only uses of its process-global RNG for BPE; one thread fixes the order of merges.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=1,  # keep warnings, drop the per-merge info log
    )


def train_tokenizer(
    texts: Mapping[str, Sequence[str]],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    alpha: float = 0.5,
    n_sentences: int = 1_000_000,
    seed: int = 0,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Learns the shared BPE model on an alpha-smoothed sample of `texts` ({lang: sentences}) and
    writes it to `model_path`. Same inputs and seed → byte-identical model file.

    The vocabulary may end up smaller than `vocab_size` when the corpus is too small for that many
    merges (`Tokenizer.vocab_size` tells the actual size).
    """
    sample, probs = sample_sentences(texts, n_sentences, alpha, seed)
    return train_on_sample(
        sample, probs, model_path, vocab_size=vocab_size, character_coverage=character_coverage
    )


def train_on_sample(
    sample: Sequence[str],
    probs: Mapping[str, float],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Learns the BPE model on `sample` (from `sample_sentences` / `sample_indices`; `probs` is
    logged) and writes it atomically to `model_path`."""
    if vocab_size <= N_SPECIAL:
        raise ValueError(f"vocab_size must be > {N_SPECIAL} (the specials), got {vocab_size}")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=writer,
        **_trainer_options(vocab_size, character_coverage),
    )
    tokenizer = Tokenizer(writer.getvalue())  # a SentencePiece model proto
    path = Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, tokenizer.serialized)
    _log.info(
        "trained BPE vocabulary: %d pieces (requested %d) from %d sentences, p_l=%s -> %s",
        tokenizer.vocab_size,
        vocab_size,
        len(sample),
        {k: round(v, 4) for k, v in probs.items()},
        path,
    )
    return tokenizer


def load_or_train(
    model_path: str | os.PathLike,
    texts_fn: Callable[[], Mapping[str, Sequence[str]]],
    **train_kwargs: Any,
) -> Tokenizer | XLMBPETokenizer:
    """The model at `model_path` if it exists (a resumed run must keep its vocabulary, even if the
    training options changed); otherwise `train_tokenizer(texts_fn(), model_path, **train_kwargs)`.
    `texts_fn` is only called when training, so corpora are not read needlessly."""
    if Path(model_path).exists():
        return Tokenizer.load(model_path)
    return train_tokenizer(texts_fn(), model_path, **train_kwargs)
