"""Denoising auto-encoder noise of XLM's unsupervised MT, as pure functions run on device.

XLM (``Trainer.add_noise``) corrupts the input of the auto-encoding step with, in this order,
a local shuffle (``word_shuffle``), word dropout (``word_dropout``) and word blanking
(``word_blank``). XLM does this on the host, one sentence at a time; here each is a vectorised
function of a fixed-shape batch, so it can be jitted into the training step.

Layout: each row is ``</s> w1 ... wn </s> <pad> ... <pad>``. The *body* is positions ``1..n``:
from 1 up to the first EOS or PAD after position 0. Every function keeps this layout and the
shape: the first EOS stays at 0, the closing EOS moves right after the last word and the space
freed by removed tokens becomes padding. Rows without words (``</s> </s>``, all padding) are left
unchanged.

Words: by default every token is a word, which is what XLM does on BPE tokens. With ``word_ids``
(see :func:`word_ids`) a word is a run of pieces that starts at a piece marked as a word start, so
the noise acts on whole words, as XLM's noise does on whitespace words.

Strengths (``k``, ``p``) may be Python floats or traced scalars: they enter the computation only
as numbers, so a schedule does not recompile. A Python value that disables the noise (``k <= 1``,
``p == 0``) returns the input unchanged without drawing random numbers; a traced one gives the
same tokens through the full computation.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xlm_jax.text.tokenizer import EOS_ID, MASK_ID, N_SPECIAL, PAD_ID

Scalar = float | jax.Array


# --- words --------------------------------------------------------------------------------------


def word_start_from_pieces(pieces: Sequence[str], n_special: int = N_SPECIAL) -> np.ndarray:
    """The ``word_start`` table of a SentencePiece vocabulary: bool, one entry per id.

    SentencePiece marks a preceding space with "▁", so a piece starting with it begins a
    whitespace word; special ids (< ``n_special``) are words of their own. For a Tokenizer:
    ``word_start_from_pieces([tok.id_to_piece(i) for i in range(tok.vocab_size)])``.
    """
    table = np.array([p.startswith("\u2581") for p in pieces], dtype=bool)
    table[: min(n_special, len(table))] = True
    return table


def _body(tokens: jax.Array) -> jax.Array:
    """Bool ``(batch, length)``: the word positions, 1 up to the first EOS/PAD after 0."""
    pos = jnp.arange(tokens.shape[1])
    stop = ((tokens == EOS_ID) | (tokens == PAD_ID)) & (pos > 0)
    return (pos > 0) & (jnp.cumsum(stop, axis=1) == 0)


def _number(in_body: jax.Array, starts: jax.Array) -> jax.Array:
    """Word indices from word starts: 0 at position 0, 1..m in the body, m + 1 after it."""
    idx = jnp.cumsum(starts & in_body, axis=1, dtype=jnp.int32)
    m = idx[:, -1:]
    pos = jnp.arange(in_body.shape[1])
    return jnp.where(in_body, idx, jnp.where(pos == 0, 0, m + 1)).astype(jnp.int32)


def _starts(wid: jax.Array) -> jax.Array:
    """True where a token's word differs from the previous token's (the first piece of a word)."""
    prev = jnp.pad(wid[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return wid != prev


def _word_ids(tokens: jax.Array, word_start: jax.Array | np.ndarray | None) -> jax.Array:
    in_body = _body(tokens)
    if word_start is None:
        return _number(in_body, in_body)
    is_start = jnp.take(jnp.asarray(word_start, dtype=bool), tokens, mode="clip")
    # A row may begin with a continuation piece (e.g. after truncation): it still opens a word.
    first = (jnp.arange(tokens.shape[1]) == 1)[None, :]
    return _number(in_body, is_start | first)


def word_ids(tokens: jax.Array, word_start: jax.Array | np.ndarray | None = None) -> jax.Array:
    """int32 ``(batch, length)``: the word index of each token.

    The first EOS is word 0, the words of the body are 1..m and the closing EOS and the padding
    are m + 1. ``word_start`` (bool, ``(vocab_size,)``) marks the pieces that begin a word; the
    first body piece always does. Without it every token of the body is its own word.
    """
    return _word_ids(tokens, word_start)


def _renumber(tokens: jax.Array, wid: jax.Array) -> jax.Array:
    """Word indices 1..m in the new order, after the tokens (and their old indices) moved."""
    return _number(_body(tokens), _starts(wid))


def _per_word(u: jax.Array, wid: jax.Array) -> jax.Array:
    """Each token gets its word's draw ``u[:, word]``, so all pieces of a word share one draw."""
    return jnp.take_along_axis(u, jnp.clip(wid, 0, u.shape[1] - 1), axis=1)


def _compact(tokens: jax.Array, wid: jax.Array, remove: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Removes tokens, shifting the rest left in order (a scatter) and padding on the right."""
    keep = ~remove
    dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, tokens.shape[1])  # out of range: dropped
    rows = jnp.arange(tokens.shape[0])[:, None]
    out = jnp.full_like(tokens, PAD_ID).at[rows, dest].set(tokens, mode="drop")
    wid = jnp.zeros_like(wid).at[rows, dest].set(wid, mode="drop")
    return out, _renumber(out, wid)


def _is_concrete(x: object) -> bool:
    return isinstance(x, numbers.Real)


def _check_blank_id(blank_id: object) -> None:
    if isinstance(blank_id, numbers.Integral) and int(blank_id) in (EOS_ID, PAD_ID):
        raise ValueError(f"blank_id {blank_id} would break the row layout (it is EOS or PAD)")


def _check_p(name: str, p: Scalar) -> None:
    if _is_concrete(p) and not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


# --- the three noises (on tokens and their word indices) ---------------------------------------


def _shuffle(key: jax.Array, tokens: jax.Array, wid: jax.Array, k: Scalar):
    in_body = _body(tokens)
    k = jnp.maximum(jnp.asarray(k, jnp.float32), 0.0)
    noise = _per_word(jax.random.uniform(key, tokens.shape, jnp.float32), wid) * k
    # XLM: word i gets score i + U(0, k); EOS first, closing EOS and padding last.
    pos = jnp.arange(tokens.shape[1])
    score = jnp.where(in_body, wid.astype(jnp.float32) + noise, jnp.where(pos == 0, -1.0, jnp.inf))
    # Stable: the pieces of a word share a score and keep their order (so do exact ties).
    perm = jnp.argsort(score, axis=1, stable=True)
    tokens = jnp.take_along_axis(tokens, perm, axis=1)
    return tokens, _renumber(tokens, jnp.take_along_axis(wid, perm, axis=1))


def _dropout(key: jax.Array, tokens: jax.Array, wid: jax.Array, p: Scalar):
    in_body = _body(tokens)
    u = _per_word(jax.random.uniform(key, tokens.shape, jnp.float32), wid)
    kept = in_body & (u >= p)
    # XLM keeps one random word of a sentence that would lose them all. Given that every draw is
    # below p, the draws are still i.i.d., so the word with the largest one is uniform.
    none_kept = ~jnp.any(kept, axis=1, keepdims=True)
    best = jnp.argmax(jnp.where(in_body, u, -1.0), axis=1, keepdims=True)
    rescued = in_body & none_kept & (wid == jnp.take_along_axis(wid, best, axis=1))
    return _compact(tokens, wid, in_body & ~kept & ~rescued)


def _blank(key: jax.Array, tokens: jax.Array, wid: jax.Array, p: Scalar, blank_id):
    in_body = _body(tokens)
    u = _per_word(jax.random.uniform(key, tokens.shape, jnp.float32), wid)
    blanked = in_body & (u < p)
    first = _starts(wid)
    # A blanked word becomes one blank token: its first piece is replaced, the others removed.
    tokens = jnp.where(blanked & first, jnp.asarray(blank_id, tokens.dtype), tokens)
    return _compact(tokens, wid, blanked & ~first)


# --- the public functions -----------------------------------------------------------------------


def word_shuffle(
    key: jax.Array, tokens: jax.Array, k: Scalar, *, word_ids: jax.Array | None = None
) -> jax.Array:
    """Shuffles the words of each row locally: no word moves ``k`` positions or more.

    As in XLM, word i gets the score ``i + U(0, k)`` and the words are sorted by score. Two words
    i < j swap only if ``j - i < k``, so a word moves at most ``ceil(k) - 1`` positions (in words,
    with ``word_ids``). For ``k <= 1`` nothing can swap (XLM uses ``k = 0`` to disable the noise;
    ``k = 1`` is disabled too, since U(0, 1) noise cannot reorder words one apart).
    """
    if _is_concrete(k) and k <= 1:
        return tokens
    wid = _word_ids(tokens, None) if word_ids is None else word_ids
    return _shuffle(key, tokens, wid, k)[0]


def word_dropout(
    key: jax.Array, tokens: jax.Array, p: Scalar, *, word_ids: jax.Array | None = None
) -> jax.Array:
    """Drops each word with probability ``p``, keeping the others in order.

    A row that would lose all its words keeps one, chosen uniformly (as XLM does), so a sentence
    never becomes empty. The row is compacted and the closing EOS follows the last kept word.
    """
    _check_p("p", p)
    if _is_concrete(p) and p == 0:
        return tokens
    wid = _word_ids(tokens, None) if word_ids is None else word_ids
    return _dropout(key, tokens, wid, p)[0]


def word_blank(
    key: jax.Array,
    tokens: jax.Array,
    p: Scalar,
    *,
    word_ids: jax.Array | None = None,
    blank_id: int = MASK_ID,
) -> jax.Array:
    """Replaces each word by ``blank_id`` with probability ``p`` (XLM blanks with the mask id).

    A blanked word of several pieces becomes a single ``blank_id`` and the row is compacted, so
    the number of pieces of the word is not revealed.
    """
    _check_p("p", p)
    _check_blank_id(blank_id)
    if _is_concrete(p) and p == 0:
        return tokens
    wid = _word_ids(tokens, None) if word_ids is None else word_ids
    return _blank(key, tokens, wid, p, blank_id)[0]


def add_noise(
    key: jax.Array,
    tokens: jax.Array,
    *,
    shuffle_k: Scalar = 3.0,
    dropout: Scalar = 0.1,
    blank: Scalar = 0.1,
    word_start: jax.Array | np.ndarray | None = None,
    blank_id: int = MASK_ID,
) -> jax.Array:
    """XLM's auto-encoder noise: shuffle, then dropout, then blank, with independent keys.

    ``word_start`` (bool, ``(vocab_size,)``) makes the noise act on whole words. The word
    indices are computed once and carried through the three steps, so a word keeps its pieces
    together even when a continuation piece is moved to the front of the row.
    """
    _check_p("dropout", dropout)
    _check_p("blank", blank)
    _check_blank_id(blank_id)
    k_shuffle, k_dropout, k_blank = jax.random.split(key, 3)
    wid = _word_ids(tokens, word_start)
    if not (_is_concrete(shuffle_k) and shuffle_k <= 1):
        tokens, wid = _shuffle(k_shuffle, tokens, wid, shuffle_k)
    if not (_is_concrete(dropout) and dropout == 0):
        tokens, wid = _dropout(k_dropout, tokens, wid, dropout)
    if not (_is_concrete(blank) and blank == 0):
        tokens, wid = _blank(k_blank, tokens, wid, blank, blank_id)
    return tokens
