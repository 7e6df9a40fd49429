"""XLM's fixed special ids and pieces, shared by both tokenizations of the package.

`tokenizer` (SentencePiece, and the loader of either kind) and `xlm_bpe` (XLM's Moses + fastBPE,
for imported models) both need them, and both are `Serialized`: they live here, below both, so
that `tokenizer` can import `xlm_bpe` without `xlm_bpe` importing it back. Callers import them
from `tokenizer`.

    <s>=0  </s>=1 (sentence separator)  <pad>=2  <unk>=3  <special0..9>=4..13, <special1> = mask
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from xlm_jax.core.files import write_atomic

BOS_ID = 0
EOS_ID = 1
PAD_ID = 2
UNK_ID = 3
N_SPECIAL_SYMBOLS = 10
MASK_ID = 5  # <special1>, as in XLM's dictionary
N_SPECIAL = 14  # first ordinary piece id

# First bytes of a serialized `xlm_bpe.XLMBPETokenizer` (XLM's fastBPE tokenization of imported
# models): `Tokenizer.from_bytes` tells it from a SentencePiece model proto by this header.
XLM_BPE_MAGIC = b"xlm_jax:xlm-fastbpe\n"

BOS_PIECE, EOS_PIECE, PAD_PIECE, UNK_PIECE = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_PIECES: tuple[str, ...] = (
    BOS_PIECE,
    EOS_PIECE,
    PAD_PIECE,
    UNK_PIECE,
    *(f"<special{i}>" for i in range(N_SPECIAL_SYMBOLS)),
)


class Serialized:
    """What both tokenizers share: their model as bytes (embedded in every checkpoint), its hash
    (a resumed run must use the same vocabulary) and the atomic save of those bytes."""

    _serialized: bytes
    vocab_size: int

    def checked_ids(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """``ids`` to decode, as a 1-D int64 array, each a piece of this vocabulary."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of ids, got shape {arr.shape}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:5].tolist()}")
        return arr

    @property
    def serialized(self) -> bytes:
        """The model, byte for byte as loaded (checkpoints embed it)."""
        return self._serialized

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._serialized).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model file atomically (a resumed run restores it from its checkpoint)."""
        write_atomic(Path(path), self._serialized)
