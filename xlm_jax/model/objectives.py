"""What each step predicts and how it is scored: pure functions, run on device inside the step.

MLM/TLM follow XLM's recipe (``Trainer.mask_out``): 15% of the tokens are prediction targets, of
which 80% are replaced by the mask token, 10% kept and 10% replaced by a random token. Padding and
the first column (in packed TLM rows, each pair's first token) are never predicted. Instead of a
Bernoulli draw per token, each row predicts ``floor(rate * n_valid + u)`` tokens (``u ~ U[0, 1)``,
so the expected rate is exact) chosen by Gumbel top-k, which is sampling without replacement; with
``sample_alpha > 0`` the choice is weighted by ``count(token) ** -sample_alpha`` as in XLM. The
chosen positions go into a fixed number of slots per row, so the output layer is computed only
where a target is (as XLM does) while every shape stays static.

Losses are returned as sums and counts (``loss_sum``, ``n_pred``, ``n_correct``): means are taken
only when logging, so reductions across devices and steps stay exact. On a mesh,
``sharded_token_loss_sums`` computes them with explicit collectives (``jax.shard_map``): each
shard sums its own rows, which hold a varying number of targets, and a ``psum`` of sums and counts
gives the exact global numbers; a vocabulary split over the tensor axis is reduced Megatron-style
without ever gathering the logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from xlm_jax.text.tokenizer import MASK_ID, N_SPECIAL, PAD_ID

Batch = Mapping[str, jax.Array]


def n_pred_slots(length: int, word_pred: float) -> int:
    """Slots per row that always hold the predicted tokens of a row of ``length`` tokens.

    A row has at most ``length - 1`` candidates (column 0 is never predicted) and predicts at most
    ``ceil(word_pred * (length - 1))`` of them.
    """
    return max(1, math.ceil(word_pred * (length - 1)))


def token_log_weights(counts: np.ndarray, sample_alpha: float) -> np.ndarray:
    """XLM's ``sample_alpha`` smoothing: a token is chosen as a target with weight count**-alpha.

    Returned as logs (float32, one per vocabulary id) to be added to the Gumbel noise.
    """
    counts = np.maximum(np.asarray(counts, np.float64), 1.0)
    return (-sample_alpha * np.log(counts)).astype(np.float32)


def mask_tokens(
    batch: Batch,
    rng: jax.Array,
    *,
    vocab_size: int,
    word_pred: float = 0.15,
    mask_keep_rand: tuple[float, float, float] = (0.8, 0.1, 0.1),
    log_weights: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Corrupts ``batch['tokens']`` for MLM/TLM.

    Returns the batch with corrupted ``tokens`` plus ``pred_index`` (int32, ``(batch, slots)``:
    where each slot's target sits in the row), ``targets`` (the original tokens there) and
    ``weights`` (1.0 for a slot that holds a target, 0.0 for an unused slot).
    """
    tokens = batch["tokens"]
    n_rows, length = tokens.shape
    n_slots = n_pred_slots(length, word_pred)
    k_count, k_choose, k_how, k_rand = jax.random.split(rng, 4)

    first = jnp.broadcast_to(jnp.arange(length) == 0, tokens.shape)
    if "segments" in batch:  # packed rows: no pair's first token, as no row's first token
        segments = batch["segments"]
        first = first | (segments != jnp.pad(segments, ((0, 0), (1, 0)))[:, :-1])
    candidates = (tokens != PAD_ID) & ~first
    n_valid = candidates.sum(axis=1).astype(jnp.float32)
    u = jax.random.uniform(k_count, (n_rows,))
    n_pred = jnp.minimum(jnp.floor(word_pred * n_valid + u), n_valid).astype(jnp.int32)

    # Gumbel top-k = sampling without replacement, proportional to exp(log_weights).
    scores = jax.random.gumbel(k_choose, tokens.shape)
    if log_weights is not None:
        scores = scores + log_weights[tokens]
    scores = jnp.where(candidates, scores, -jnp.inf)
    _, pred_index = jax.lax.top_k(scores, n_slots)
    pred_index = pred_index.astype(jnp.int32)
    active = jnp.arange(n_slots)[None, :] < n_pred[:, None]

    targets = jnp.take_along_axis(tokens, pred_index, axis=1)
    p_mask, p_keep, _ = mask_keep_rand
    r = jax.random.uniform(k_how, pred_index.shape)
    random_tokens = jax.random.randint(k_rand, pred_index.shape, N_SPECIAL, vocab_size)
    replaced = jnp.where(
        r < p_mask, MASK_ID, jnp.where(r < p_mask + p_keep, targets, random_tokens)
    )
    replaced = jnp.where(active, replaced, targets)
    rows = jnp.arange(n_rows)[:, None]
    corrupted = tokens.at[rows, pred_index].set(replaced.astype(tokens.dtype))

    return {
        **batch,
        "tokens": corrupted,
        "pred_index": pred_index,
        "targets": jnp.where(active, targets, PAD_ID),
        "weights": active.astype(jnp.float32),
    }


def causal_targets(batch: Batch, context_size: int = 0) -> dict[str, jax.Array]:
    """CLM: every position predicts the next token (XLM's ``clm_step``); the last cannot, nor
    the first ``context_size`` positions of a row (XLM's ``--context_size``: they are context
    only). A packed row (``segments``) predicts no token of another pair."""
    tokens = batch["tokens"]
    targets = jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], PAD_ID)], axis=1)
    weights = (tokens != PAD_ID) & (targets != PAD_ID)
    weights &= jnp.arange(tokens.shape[1])[None, :] >= context_size
    if batch.get("segments") is not None:
        seg = batch["segments"]
        weights &= jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros_like(seg[:, :1], bool)], 1)
    return {**batch, "targets": targets, "weights": weights.astype(jnp.float32)}


def token_loss_sums(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> dict[str, jax.Array]:
    """Cross-entropy and accuracy at weighted positions, as sums and counts (float32)."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(nll * weights),
        "n_pred": jnp.sum(weights),
        "n_correct": jnp.sum(correct * weights),
    }


def sharded_token_loss_sums(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str],
    vocab_axes: Sequence[str],
    label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
    """``token_loss_sums`` on a mesh: rows split over ``batch_axes``, vocab over ``vocab_axes``.

    The log-softmax needs the max and the sum of exponentials over the whole vocabulary: a
    ``pmax``/``psum`` over the vocabulary axes of per-shard statistics, and the target's logit
    comes from the one shard that holds it. Returns replicated global sums.
    """
    batch_axes, vocab_axes = tuple(batch_axes), tuple(vocab_axes)
    vocab_size = logits.shape[-1]
    row_spec = PartitionSpec(batch_axes or None, None)
    logit_spec = PartitionSpec(batch_axes or None, None, vocab_axes or None)

    def over_vocab(x, op):
        return op(x, vocab_axes) if vocab_axes else x

    def local(logits, targets, weights):
        logits = logits.astype(jnp.float32)
        v_local = logits.shape[-1]
        offset = 0
        for axis in vocab_axes:  # this shard's first vocabulary id (row-major over the axes)
            offset = offset * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
        offset = offset * v_local
        # The max only stabilises the exponentials: no gradient flows through it.
        gmax = over_vocab(jax.lax.stop_gradient(logits.max(axis=-1)), jax.lax.pmax)
        sumexp = over_vocab(jnp.exp(logits - gmax[..., None]).sum(axis=-1), jax.lax.psum)
        lse = gmax + jnp.log(sumexp)
        local_t = targets - offset
        here = (local_t >= 0) & (local_t < v_local)
        picked = jnp.take_along_axis(logits, jnp.clip(local_t, 0, v_local - 1)[..., None], axis=-1)
        target_logit = over_vocab(jnp.where(here, picked[..., 0], 0.0), jax.lax.psum)
        nll = lse - target_logit
        if label_smoothing:
            mean_logit = over_vocab(logits.sum(axis=-1), jax.lax.psum) / vocab_size
            nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
        # correct iff the target holds the global max (argmax ties have probability zero)
        correct = (target_logit >= gmax).astype(jnp.float32)
        sums = {
            "loss_sum": jnp.sum(nll * weights),
            "n_pred": jnp.sum(weights),
            "n_correct": jnp.sum(correct * weights),
        }
        return jax.lax.psum(sums, batch_axes) if batch_axes else sums

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(logit_spec, row_spec, row_spec),
        out_specs=PartitionSpec(),
    )(logits, targets, weights)
