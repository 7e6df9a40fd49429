"""Autoregressive decoding on device: greedy search and XLM's beam search.

Both run in a `lax.while_loop` over a model-agnostic step function with a cache, with fixed shapes
(a new batch of the same sizes never recompiles), and stop as soon as every sentence is finished.
They follow facebookresearch/XLM `TransformerModel.generate` / `generate_beam` and its
`BeamHypotheses`, so that translations (hence BLEU) match the reference implementation:

* Row layout: position 0 holds the start token (`bos_id`; XLM uses `</s>`), then the generated
  tokens, then `eos_id`, then `pad_id`. `lengths` count every token, bos and eos included.
* A row that reaches its length limit without eos gets eos forced as its last token, so every
  row ends with exactly one eos after the start token.

The step function (the NMT decoder provides one) has the form::

    step_fn(tokens (n,) int32, index () int32, cache) -> (logits (n, vocab), cache)

where `tokens` sit at position `index` and `logits` predict position `index + 1`; the cache
entries beam search reorders have leading dimension n (n = batch, or batch * beam).

Callers close the step function and the static sizes over and wrap the call in `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Cache = Any
StepFn = Callable[[Array, Array, Cache], tuple[Array, Cache]]
BeamState = dict[str, Any]  # beam_search's loop state: see `_initial_beams`

# XLM's initial score of beams 1..K-1: only beam 0 expands at the first step (all beams hold the
# same start token), yet the value stays finite, so no inf - inf can ever appear.
_DEAD_BEAM = -1e9


def tile_beams(tree: Cache, beam_size: int) -> Cache:
    """Repeats every leaf's rows `beam_size` times (row b*beam + j = beam j of sentence b).

    Turns a per-sentence cache (e.g. the encoder output) into the batch*beam cache
    `beam_search` expects, as XLM's `generate_beam` expands `src_enc` and `src_len`.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def _row_limits(max_lengths: Array | None, batch_size: int, max_len: int) -> Array:
    """Per-row limits on the total length (bos and eos included), clipped to [2, max_len + 1]."""
    if max_lengths is None:
        return jnp.full((batch_size,), max_len + 1, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    if max_lengths.shape != (batch_size,):
        raise ValueError(f"max_lengths must have shape ({batch_size},), got {max_lengths.shape}")
    # A row needs room for bos and eos; the output buffer has max_len + 1 positions.
    return jnp.clip(max_lengths, 2, max_len + 1)


def _check_sizes(batch_size: int, max_len: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


def _float_logits(logits: Array, eos_id: int, eos_allowed: bool) -> Array:
    """float32 logits, with eos impossible when `eos_allowed=False` (fixed-length benchmarks)."""
    logits = logits.astype(jnp.float32)
    if not eos_allowed:
        logits = logits.at[:, eos_id].set(-jnp.inf)
    return logits


def _reorder_cache(cache: Cache, rows: Array, reordered: Collection[str] | None = None) -> Cache:
    """Gathers cache entries along axis 0 (the parent beam of each new beam): all of them, or
    the `reordered` entries of a dict cache. Indices are in bounds by construction: "clip"
    spares the out-of-bounds fill that `take` would otherwise apply to every gathered element."""

    def take(tree: Cache) -> Cache:
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=0, mode="clip"), tree)

    if reordered is None or not isinstance(cache, dict):
        return take(cache)
    return {k: take(v) if k in reordered else v for k, v in cache.items()}


def _gather_beams(x: Array, idx: Array) -> Array:
    """x (batch, m, ...), idx (batch, k) -> (batch, k, ...): per-sentence selection."""
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0, mode="clip"))(x, idx)


def greedy_decode(
    step_fn: StepFn,
    cache: Cache,
    *,
    batch_size: int,
    max_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_lengths: Array | None = None,
    eos_allowed: bool = True,
) -> tuple[Array, Array]:
    """Greedy decoding (XLM's `generate` without sampling); returns `(tokens, lengths)`.

    `tokens` is int32 `(batch_size, max_len + 1)`: bos, the argmax tokens, eos, then pads;
    `lengths` (int32 `(batch_size,)`) counts bos and eos. `max_lengths` (int32 `(batch_size,)`)
    limits each row's total length (clipped to [2, max_len + 1]), as XLM's per-batch
    `max_len = a * src_len + b` but per row; a row reaching its limit gets eos forced as its last
    token, like XLM's `generated[-1].masked_fill_(unfinished_sents, eos_index)`. The loop stops
    once every row has its eos, which gives the same outputs as running all `max_len` steps.
    `eos_allowed=False` removes eos from the choices, so every row has exactly its limit length.
    """
    _check_sizes(batch_size, max_len)
    limits = _row_limits(max_lengths, batch_size, max_len)
    tokens = jnp.full((batch_size, max_len + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)
    lengths = jnp.ones((batch_size,), jnp.int32)
    unfinished = jnp.ones((batch_size,), jnp.bool_)

    def cond(state):
        cur, _, _, unfinished, _ = state
        return (cur <= max_len) & jnp.any(unfinished)

    def body(state):
        cur, tokens, lengths, unfinished, cache = state
        prev = lax.dynamic_index_in_dim(tokens, cur - 1, axis=1, keepdims=False)
        logits, cache = step_fn(prev, cur - 1, cache)
        logits = _float_logits(logits, eos_id, eos_allowed)
        word = top_k(logits, 1)[1][:, 0]  # argmax (the first of equals), several times faster
        word = jnp.where(cur >= limits - 1, eos_id, word)  # the last position is always eos
        word = jnp.where(unfinished, word, pad_id)
        tokens = lax.dynamic_update_index_in_dim(tokens, word, cur, axis=1)
        lengths = lengths + unfinished.astype(jnp.int32)
        unfinished = unfinished & (word != eos_id)
        return cur + 1, tokens, lengths, unfinished, cache

    state = (jnp.int32(1), tokens, lengths, unfinished, cache)
    _, tokens, lengths, _, _ = lax.while_loop(cond, body, state)
    return tokens, lengths


def beam_search(
    step_fn: StepFn,
    cache: Cache,
    *,
    batch_size: int,
    beam_size: int,
    max_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float | Array = 1.0,
    early_stopping: bool | Array = False,
    max_lengths: Array | None = None,
    eos_allowed: bool = True,
    reordered: Collection[str] | None = None,
) -> tuple[Array, Array, Array]:
    """XLM's `generate_beam`; returns the best hypothesis per sentence `(tokens, lengths, scores)`.

    `cache` has batch_size * beam_size rows (see `tile_beams`); at every step its entries are
    gathered along axis 0 by the parent beams: all of them, or only those a dict cache names in
    `reordered` (the others are the same for all beams of a sentence, like the source's keys and
    values, or are read through a reordered index, like `XLMDecoder`'s `beam_history`).
    `tokens` (int32 `(batch_size, max_len + 1)`) and `lengths` are laid out as in
    `greedy_decode`, including `max_lengths` and `eos_allowed`.

    Rules, as XLM (ties aside): at each step the top 2 * beam_size (beam, word) extensions are
    visited in order of log-probability; one ending in eos (or reaching the row's length limit)
    becomes a finished hypothesis, the first beam_size others form the next beams. A sentence
    keeps its beam_size best finished hypotheses and is done when it has beam_size of them and
    either `early_stopping` or none of its alive beams can still beat the worst of them
    (worst >= best_next_sum_logprobs / (limit - 1) ** length_penalty), or at its length limit.

    `scores` = sum of log-probs / length ** length_penalty, where length is XLM's `len(hyp)`:
    the hypothesis without its eos but with the start token, i.e. `lengths - 1` (= the number of
    generated tokens, eos included). As in XLM, a hypothesis cut at its length limit is scored
    with the log-prob of the best candidate word at that position, which the eos then replaces.
    `length_penalty` and `early_stopping` may be traced scalars: one compilation serves all.
    """
    _check_sizes(batch_size, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    limits = _row_limits(max_lengths, batch_size, max_len)
    length_penalty = jnp.asarray(length_penalty, jnp.float32)
    # XLM's BeamHypotheses.max_len: the longest possible hypothesis, bos in, eos out.
    best_possible_den = (limits - 1).astype(jnp.float32) ** length_penalty

    def cond(state: BeamState) -> Array:
        return (state["cur"] <= max_len) & ~jnp.all(state["done"])

    def body(state: BeamState) -> BeamState:
        cur = state["cur"]
        prev = lax.dynamic_index_in_dim(state["alive_seq"], cur - 1, axis=2, keepdims=False)
        logits, cache = step_fn(prev.reshape(-1), cur - 1, state["cache"])  # (B*K,) rows
        logits = _float_logits(logits, eos_id, eos_allowed)
        top_score, parent, word = _top_candidates(logits, state["alive_score"])
        # Checked before this step's candidates are added, as XLM.
        done = _sentences_done(state, top_score[:, 0], best_possible_den, early_stopping)
        at_limit = cur >= limits - 1
        added, extends = _candidate_fates(word == eos_id, at_limit, done)
        finished = _add_finished(state, parent, top_score, added, eos_id, length_penalty)
        beams, rows = _next_beams(state, parent, word, top_score, extends, pad_id)
        cache = _reorder_cache(cache, rows, reordered)
        return {**finished, **beams, "cur": cur + 1, "done": done | at_limit, "cache": cache}

    start = _initial_beams(cache, batch_size, beam_size, max_len, bos_id, pad_id)
    return _best_hypotheses(lax.while_loop(cond, body, start))


def _initial_beams(
    cache: Cache, batch_size: int, beam_size: int, max_len: int, bos_id: int, pad_id: int
) -> BeamState:
    """The beam search's loop state before its first step (position 0 holds the start token)."""
    B, K, T = batch_size, beam_size, max_len + 1
    return {
        "cur": jnp.int32(1),  # the position the next step writes
        "alive_seq": jnp.full((B, K, T), pad_id, jnp.int32).at[:, :, 0].set(bos_id),
        # All beams hold the same start token: only beam 0 may expand at the first step.
        "alive_score": jnp.full((B, K), _DEAD_BEAM, jnp.float32).at[:, 0].set(0.0),
        # The K best finished hypotheses of each sentence (BeamHypotheses), fewer at first.
        "fin_seq": jnp.full((B, K, T), pad_id, jnp.int32),
        "fin_len": jnp.zeros((B, K), jnp.int32),
        "fin_score": jnp.full((B, K), -jnp.inf, jnp.float32),
        "fin_count": jnp.zeros((B,), jnp.int32),
        "done": jnp.zeros((B,), jnp.bool_),
        "cache": cache,
    }


def _top_candidates(logits: Array, alive_score: Array) -> tuple[Array, Array, Array]:
    """The 2K best extensions (beam, word) of each sentence, best first: their sums of log-probs,
    parent beams and words, each (B, 2K). `logits` is (B*K, V), `alive_score` (B, K)."""
    B, K = alive_score.shape
    V = logits.shape[-1]
    # Two-stage top-k: the best 2K of K x V candidates are among each beam's best 2K words,
    # and a top-k over (B*K, V) then (B, K*2K) is far cheaper than one over (B, K*V).
    beam_lp, beam_word = top_log_softmax(logits, min(2 * K, V))  # (B*K, 2K)
    n = beam_lp.shape[-1]
    cand = (alive_score[:, :, None] + beam_lp.reshape(B, K, n)).reshape(B, K * n)
    top_score, top_idx = lax.top_k(cand, 2 * K)  # (B, 2K), best first
    parent = top_idx // n
    word = jnp.take_along_axis(beam_word.reshape(B, K * n), top_idx, axis=1).astype(jnp.int32)
    return top_score, parent, word


def top_log_softmax(logits: Array, k: int, block: int = 128) -> tuple[Array, Array]:
    """`top_k(jax.nn.log_softmax(logits, axis=-1), k)` bit for bit, without writing out the
    log-probabilities: only the row's maximum and log-sum-exp are reduced over the vocabulary,
    and the log-softmax (the same operations as jax's) is applied to the block maxima and the
    candidates `top_k` reads. Exact, ties included, because it is non-decreasing in the logit:
    the maximum of a block's log-probabilities is the log-probability of its maximum logit. (A
    top-k of the logits would not do: log-probabilities of distinct logits can round to equals,
    which then resolve to the lower index.)"""
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))
    return top_k(logits, k, block, monotone=lambda v: (v - row_max) - log_sum)


def top_k(
    x: Array, k: int, block: int = 128, monotone: Callable[[Array], Array] | None = None
) -> tuple[Array, Array]:
    """`lax.top_k` over the last axis of a 2-D `x`: the same values and indices (ties to the lower
    index; inputs without NaN), in passes a CPU runs several times faster over a vocabulary.

    The k largest entries lie in the k blocks of `block` entries with the largest maxima (ties to
    the lower block): a block left out has k blocks whose maxima are at least its own, and come
    first. So one reduction over the row, a top-k over its block maxima and one over the
    k * block entries of the chosen blocks (in index order, so that ties keep resolving to the
    lower index) give the row's top k. Over beam search's (128, 32k) candidates, XLA:CPU's
    sort-based `top_k` took 6 ms of a 90 ms step.

    With `monotone` (a non-decreasing function of each entry, broadcasting over rows), returns
    the top k of `monotone(x)`, applied only to the block maxima and the candidates.
    """
    rows, n = x.shape
    f = monotone or (lambda v: v)
    n_blocks = n // block
    if n_blocks <= k:
        return lax.top_k(f(x), k)
    blocks = x[:, : n_blocks * block].reshape(rows, n_blocks, block)
    _, chosen = lax.top_k(f(jnp.max(blocks, axis=-1)), k)
    chosen = jnp.sort(chosen, axis=-1)
    candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1).reshape(rows, -1)
    index = (chosen[:, :, None] * block + jnp.arange(block)).reshape(rows, -1)
    if n_blocks * block < n:  # the last, partial block is always a candidate
        candidates = jnp.concatenate([candidates, x[:, n_blocks * block :]], axis=1)
        rest = jnp.arange(n_blocks * block, n, dtype=index.dtype)
        index = jnp.concatenate([index, jnp.broadcast_to(rest, (rows, rest.size))], axis=1)
    values, position = lax.top_k(f(candidates), k)
    return values, jnp.take_along_axis(index, position, axis=1).astype(jnp.int32)


def _sentences_done(
    state: BeamState, best_sum: Array, best_possible_den: Array, early_stopping: bool | Array
) -> Array:
    """XLM's BeamHypotheses.is_done per sentence: it has K finished hypotheses and either stops
    early or none of its alive beams (the best sums to `best_sum`) can still beat the worst."""
    K = state["fin_score"].shape[1]
    hopeless = jnp.min(state["fin_score"], axis=1) >= best_sum / best_possible_den
    return state["done"] | ((state["fin_count"] >= K) & (early_stopping | hopeless))


def _candidate_fates(is_eos: Array, at_limit: Array, done: Array) -> tuple[Array, Array]:
    """Of the (B, 2K) sorted candidates of sentences not `done`: those that become finished
    hypotheses (final: eos, or at the row's length limit) and those that may extend a beam."""
    K = is_eos.shape[1] // 2
    final = is_eos | at_limit[:, None]
    # XLM's loop over the candidates stops after the K-th non-final one, so a final one is
    # visited iff fewer than K non-final ones precede it (`rank` counts them up to itself).
    nonfinal = (~final).astype(jnp.int32)
    rank = jnp.cumsum(nonfinal, axis=1)
    return final & (rank - nonfinal < K) & ~done[:, None], ~final & ~done[:, None]


def _add_finished(
    state: BeamState, parent: Array, score: Array, added: Array, eos_id: int, length_penalty: Array
) -> BeamState:
    """The `fin_*` entries of the state with the `added` candidates: the parent's tokens with eos
    at `cur`, score normalised by length. Keeps the K best, a streaming top-K, which is what
    BeamHypotheses.add keeps."""
    cur = state["cur"]
    B, K = state["fin_score"].shape
    cand_seq = _gather_beams(state["alive_seq"], parent)
    cand_seq = lax.dynamic_update_index_in_dim(
        cand_seq, jnp.full((B, 2 * K), eos_id, jnp.int32), cur, axis=2
    )
    cand_norm = score / cur.astype(jnp.float32) ** length_penalty
    merged = jnp.concatenate([state["fin_score"], jnp.where(added, cand_norm, -jnp.inf)], 1)
    fin_score, keep = lax.top_k(merged, K)
    fin_seq = _gather_beams(jnp.concatenate([state["fin_seq"], cand_seq], axis=1), keep)
    cand_len = jnp.full((B, 2 * K), cur + 1, jnp.int32)
    fin_len = _gather_beams(jnp.concatenate([state["fin_len"], cand_len], axis=1), keep)
    fin_count = jnp.minimum(K, state["fin_count"] + jnp.sum(added, axis=1, dtype=jnp.int32))
    return {"fin_seq": fin_seq, "fin_len": fin_len, "fin_score": fin_score, "fin_count": fin_count}


def _next_beams(
    state: BeamState, parent: Array, word: Array, score: Array, extends: Array, pad_id: int
) -> tuple[BeamState, Array]:
    """The `alive_*` entries of the state for the next step, and the cache rows of their parent
    beams (B*K,). Slot s takes the (s+1)-th of the sorted candidates that `extends`; sentences
    without any (done, or at their limit) keep their own beams, which are never read again."""
    alive_seq, cur = state["alive_seq"], state["cur"]
    B, K = state["alive_score"].shape
    rank = jnp.cumsum(extends.astype(jnp.int32), axis=1)
    slots = jnp.arange(1, K + 1, dtype=jnp.int32)
    match = extends[:, None, :] & (rank[:, None, :] == slots[None, :, None])
    pick = jnp.argmax(match, axis=-1)  # (B, K)
    live = jnp.any(match, axis=-1)
    own = jnp.broadcast_to(jnp.arange(K), (B, K))
    new_parent = jnp.where(live, jnp.take_along_axis(parent, pick, axis=1), own)
    new_word = jnp.where(live, jnp.take_along_axis(word, pick, axis=1), pad_id)
    new_score = jnp.where(live, jnp.take_along_axis(score, pick, axis=1), _DEAD_BEAM)
    alive_seq = lax.dynamic_update_index_in_dim(
        _gather_beams(alive_seq, new_parent), new_word, cur, axis=2
    )
    rows = (jnp.arange(B)[:, None] * K + new_parent).reshape(B * K)
    return {"alive_seq": alive_seq, "alive_score": new_score}, rows


def _best_hypotheses(state: BeamState) -> tuple[Array, Array, Array]:
    """`(tokens, lengths, scores)` of each sentence's best finished hypothesis."""
    best = jnp.argmax(state["fin_score"], axis=1)[:, None]
    tokens = _gather_beams(state["fin_seq"], best)[:, 0]
    lengths = jnp.take_along_axis(state["fin_len"], best, axis=1)[:, 0]
    scores = jnp.take_along_axis(state["fin_score"], best, axis=1)[:, 0]
    return tokens, lengths, scores
