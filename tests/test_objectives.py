"""Masking rates, what is never predicted, CLM targets and the loss sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlm_jax.data import batches
from xlm_jax.model import objectives
from xlm_jax.text.tokenizer import EOS_ID, MASK_ID, N_SPECIAL, PAD_ID

VOCAB = 1000


def _batch(rng: np.random.Generator, rows: int = 64, length: int = 128) -> dict[str, np.ndarray]:
    tokens = rng.integers(N_SPECIAL, VOCAB, (rows, length)).astype(np.int32)
    # Ragged rows: the tail of some rows is padding.
    lengths = rng.integers(length // 2, length + 1, rows)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = PAD_ID
    zeros = np.zeros_like(tokens)
    return {"tokens": tokens, "positions": zeros, "langs": zeros}


def test_mask_rates_and_never_predicted():
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda b, k: objectives.mask_tokens(b, k, vocab_size=VOCAB))
    n_cand = n_pred = n_mask = n_keep = n_rand = 0
    for i in range(60):
        batch = _batch(rng)
        out = jax.device_get(fn(batch, jax.random.key(i)))
        tokens, idx, w = batch["tokens"], out["pred_index"], out["weights"]
        active = w > 0
        rows = np.nonzero(active)[0]
        pos = idx[active]
        # pads and the first column are never predicted, and every slot is distinct within a row
        assert (pos > 0).all()
        assert (tokens[rows, pos] != PAD_ID).all()
        for r in range(len(idx)):
            assert len(set(idx[r][active[r]])) == active[r].sum()
        np.testing.assert_array_equal(out["targets"][active], tokens[rows, pos])
        # positions that are not predicted are untouched
        changed = out["tokens"] != tokens
        predicted = np.zeros_like(changed)
        predicted[rows, pos] = True
        assert not (changed & ~predicted).any()
        new = out["tokens"][rows, pos]
        n_cand += int(((tokens != PAD_ID)[:, 1:]).sum())
        n_pred += int(active.sum())
        n_mask += int((new == MASK_ID).sum())
        n_keep += int((new == tokens[rows, pos]).sum())
        n_rand += int(((new != MASK_ID) & (new != tokens[rows, pos])).sum())
        assert (new[(new != MASK_ID)] >= N_SPECIAL).all()
    assert n_pred / n_cand == pytest.approx(0.15, abs=0.001)
    assert n_mask / n_pred == pytest.approx(0.80, abs=0.005)
    # a random token equal to the original counts as kept: +0.1/986 on kept, negligible here
    assert n_keep / n_pred == pytest.approx(0.10, abs=0.004)
    assert n_rand / n_pred == pytest.approx(0.10, abs=0.004)


def test_slots_hold_every_prediction():
    for length in (8, 64, 127, 256):
        slots = objectives.n_pred_slots(length, 0.15)
        batch = {"tokens": jnp.full((4, length), 50, jnp.int32)}
        for seed in range(20):
            out = objectives.mask_tokens(batch, jax.random.key(seed), vocab_size=VOCAB)
            assert out["pred_index"].shape == (4, slots)
            n = np.asarray(out["weights"]).sum(axis=1)
            # floor(0.15 * (L-1) + u) is never more than the slots
            assert (n <= slots).all() and (n >= np.floor(0.15 * (length - 1))).all()


def test_all_pad_row_predicts_nothing():
    tokens = jnp.full((2, 16), PAD_ID, jnp.int32).at[1, :5].set(7)
    out = objectives.mask_tokens({"tokens": tokens}, jax.random.key(0), vocab_size=VOCAB)
    assert float(out["weights"][0].sum()) == 0.0
    np.testing.assert_array_equal(out["tokens"][0], tokens[0])


def test_sample_alpha_prefers_rare_tokens():
    # Token 20 is frequent, token 21 rare; with alpha=0.5 a rare occurrence is 100x more likely.
    counts = np.ones(VOCAB)
    counts[20], counts[21] = 10_000, 1
    log_w = jnp.asarray(objectives.token_log_weights(counts, 0.5))
    tokens = np.full((256, 64), 20, np.int32)
    tokens[:, 1::16] = 21  # 4 rare among 63 candidates per row
    out = objectives.mask_tokens(
        {"tokens": jnp.asarray(tokens)}, jax.random.key(0), vocab_size=VOCAB, log_weights=log_w
    )
    targets = np.asarray(out["targets"])[np.asarray(out["weights"]) > 0]
    rare_share = (targets == 21).mean()
    assert rare_share > 0.35  # uniform choice would give 4/63 = 6%


def test_causal_targets():
    tokens = jnp.array([[1, 10, 11, 1, 12], [1, 13, PAD_ID, PAD_ID, PAD_ID]], jnp.int32)
    out = objectives.causal_targets({"tokens": tokens})
    np.testing.assert_array_equal(
        out["targets"], [[10, 11, 1, 12, PAD_ID], [13, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    )
    np.testing.assert_array_equal(out["weights"], [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])


def _xlm_concat_batches(x1, len1, lang1, x2, len2, lang2, pad):
    """XLM's ``concat_batches`` (src/utils.py) with reset_positions=True, time-major as XLM."""
    lengths = len1 + len2
    slen, bs = int(lengths.max()), len(lengths)
    x = np.full((slen, bs), pad)
    x[: len1.max()] = x1
    positions = np.arange(slen)[:, None].repeat(bs, 1)
    langs = np.full((slen, bs), lang1)
    for i in range(bs):
        l1 = len1[i]
        x[l1 : l1 + len2[i], i] = x2[: len2[i], i]
        positions[l1:, i] -= len1[i]
        langs[l1:, i] = lang2
    return x, lengths, positions, langs


def _time_major(sentences, eos, pad):
    lengths = np.array([len(s) + 2 for s in sentences])
    x = np.full((lengths.max(), len(sentences)), pad)
    for i, s in enumerate(sentences):
        x[: lengths[i], i] = [eos, *s, eos]
    return x, lengths


@pytest.mark.parametrize("context_size", [0, 3])
def test_clm_on_pairs_is_xlm_s_clm_step(context_size):
    """A clm_steps pair: XLM's generate_batch(l1, l2, 'causal') rows, and clm_step's pred_mask
    (context positions unpredicted) and targets y, in XLM's order."""
    src = [[5, 6, 7], [8], [9, 10, 11, 12]]
    tgt = [[20, 21], [22, 23, 24, 25], [26]]
    (batch,) = batches.eval_pair_batches(
        [np.array(s) for s in src],
        [np.array(t) for t in tgt],
        src_lang=0,
        tgt_lang=1,
        batch_size=3,
        length=16,
    )
    ours = objectives.causal_targets({k: jnp.asarray(v) for k, v in batch.items()}, context_size)

    x1, len1 = _time_major(src, EOS_ID, PAD_ID)
    x2, len2 = _time_major(tgt, EOS_ID, PAD_ID)
    x, lengths, positions, langs = _xlm_concat_batches(x1, len1, 0, x2, len2, 1, PAD_ID)
    pred_mask = np.arange(len(x))[:, None] < lengths[None] - 1  # XLM's clm_step
    pred_mask[:context_size] = False
    y = x[1:][pred_mask[:-1]]

    slen, real = len(x), x != PAD_ID
    np.testing.assert_array_equal(batch["tokens"].T[:slen], x)
    np.testing.assert_array_equal(batch["positions"].T[:slen][real], positions[real])
    np.testing.assert_array_equal(batch["langs"].T[:slen][real], langs[real])
    weights, targets = np.asarray(ours["weights"]).T, np.asarray(ours["targets"]).T
    np.testing.assert_array_equal(weights[: slen - 1], pred_mask[:-1])
    assert not weights[slen - 1 :].any()
    np.testing.assert_array_equal(targets[: slen - 1][pred_mask[:-1]], y)


def test_causal_targets_stay_within_a_packed_pair():
    tokens = jnp.array([[1, 10, 1, 1, 11, 1, PAD_ID]], jnp.int32)
    out = objectives.causal_targets(
        {"tokens": tokens, "segments": jnp.array([[1, 1, 1, 2, 2, 2, 0]])}
    )
    np.testing.assert_array_equal(out["weights"], [[1, 1, 0, 1, 1, 0, 0]])


def test_token_loss_sums():
    logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
    targets = jnp.array([[0, 1]])
    weights = jnp.array([[1.0, 0.0]])
    sums = objectives.token_loss_sums(logits, targets, weights)
    np.testing.assert_allclose(sums["loss_sum"], -np.log(0.7), rtol=1e-6)
    assert float(sums["n_pred"]) == 1.0 and float(sums["n_correct"]) == 1.0
    sums = objectives.token_loss_sums(logits, targets, jnp.ones((1, 2)))
    np.testing.assert_allclose(sums["loss_sum"], -np.log(0.7) - np.log(0.1), rtol=1e-6)
    assert float(sums["n_correct"]) == 1.0
