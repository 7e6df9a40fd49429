"""Greedy and beam search (xlm_jax.model.decoding) against plain-Python references on a toy model.

The toy model's logits depend on the whole history, which it reads from a fixed
`(n, max_len + 1)` buffer in its cache (written at `index`), so decoding that forgets to reorder
the cache with the beams produces different tokens and scores.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlm_jax.model import decoding

BOS = EOS = 1  # XLM starts sentences with </s>
PAD = 2


class ToyModel:
    """logits = trigram[prev, cur] + by_sum[sum(history) % 5] + bias[row] (all float32), plus
    2 * index - eos_offset on eos, so that outputs end at varied lengths."""

    def __init__(self, seed: int, vocab: int, max_len: int, n_sums: int = 5, eos_offset: int = 6):
        rng = np.random.default_rng(seed)
        self.eos_offset = eos_offset
        self.calls: list[int] = []  # the `index` of every step run (see `count_steps`)
        self.vocab, self.max_len, self.n_sums = vocab, max_len, n_sums
        self.trigram = (2.0 * rng.normal(size=(vocab + 1, vocab, vocab))).astype(np.float32)
        self.by_sum = (2.0 * rng.normal(size=(n_sums, vocab))).astype(np.float32)

    def biases(self, seed: int, n: int) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=(n, self.vocab)).astype(np.float32)

    def init_cache(self, bias: np.ndarray) -> dict:
        n = bias.shape[0]
        return {
            "history": jnp.zeros((n, self.max_len + 1), jnp.int32),
            "extra": (jnp.asarray(bias),),  # a nested float leaf with a trailing dim
        }

    def step(self, tokens, index, cache):
        jax.debug.callback(lambda i: self.calls.append(int(i)), index)
        history = cache["history"].at[:, index].set(tokens)
        prev = jnp.where(index > 0, history[:, jnp.maximum(index - 1, 0)], self.vocab)
        seen = jnp.arange(history.shape[1]) <= index
        total = jnp.sum(jnp.where(seen, history, 0), axis=1) % self.n_sums
        (bias,) = cache["extra"]
        logits = jnp.asarray(self.trigram)[prev, tokens] + jnp.asarray(self.by_sum)[total] + bias
        logits = logits.at[:, EOS].add((2 * index - self.eos_offset).astype(jnp.float32))
        return logits, {"history": history, "extra": cache["extra"]}

    def logits(self, prefix: list[int], bias: np.ndarray) -> np.ndarray:
        prev = prefix[-2] if len(prefix) > 1 else self.vocab
        x = self.trigram[prev, prefix[-1]] + self.by_sum[sum(prefix) % self.n_sums] + bias
        x[EOS] += np.float32(2 * (len(prefix) - 1) - self.eos_offset)
        return x

    def logprobs(self, prefix: list[int], bias: np.ndarray, eos_allowed: bool = True):
        x = self.logits(prefix, bias).astype(np.float64)
        if not eos_allowed:
            x[EOS] = -np.inf
        return x - x.max() - np.log(np.sum(np.exp(x - x.max())))


# ----------------------------------------------------------------------------- references


def ref_greedy(model, bias, limit, eos_allowed=True):
    """XLM's `generate` for one sentence, eos forced at the limit."""
    seq = [BOS]
    while len(seq) == 1 or seq[-1] != EOS:
        x = model.logits(seq, bias).copy()
        if not eos_allowed:
            x[EOS] = -np.inf
        seq.append(EOS if len(seq) == limit - 1 else int(np.argmax(x)))
    return seq + [PAD] * (model.max_len + 1 - len(seq)), len(seq)


class Hypotheses:
    """XLM's BeamHypotheses rules; stores (score, tokens with eos)."""

    def __init__(self, n, limit, lp, early):
        self.n, self.max_len, self.lp, self.early = n, limit - 1, lp, early
        self.hyp, self.worst = [], 1e9

    def add(self, tokens, sum_logprobs):
        score = sum_logprobs / (len(tokens) - 1) ** self.lp
        if len(self.hyp) < self.n or score > self.worst:
            self.hyp.append((score, tokens))
            if len(self.hyp) > self.n:
                order = sorted((s, i) for i, (s, _) in enumerate(self.hyp))
                del self.hyp[order[0][1]]
                self.worst = order[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum):
        if len(self.hyp) < self.n:
            return False
        return self.early or self.worst >= best_sum / self.max_len**self.lp


def ref_beam(model, bias, beam, limit, lp, early, eos_allowed=True):
    """XLM's `generate_beam` for one sentence: (tokens, length, score, model steps run)."""
    beams = [([BOS], 0.0)] + [([BOS], -1e9)] * (beam - 1)
    hyps = Hypotheses(beam, limit, lp, early)
    for cur in range(1, limit):
        steps = cur
        cands = []
        for k, (seq, s) in enumerate(beams):
            lps = model.logprobs(seq, bias, eos_allowed)
            cands += [(s + lps[w], k * model.vocab + w, k, w) for w in range(model.vocab)]
        cands = sorted(cands, key=lambda c: (-c[0], c[1]))[: 2 * beam]
        if hyps.is_done(cands[0][0]):
            break
        nxt = []
        for value, _, k, w in cands:
            if w == EOS or cur + 1 == limit:
                hyps.add(beams[k][0] + [EOS], value)
            else:
                nxt.append((beams[k][0] + [w], value))
            if len(nxt) == beam:
                break
        beams = nxt
    score, seq = max(hyps.hyp, key=lambda h: h[0])
    return seq + [PAD] * (model.max_len + 1 - len(seq)), len(seq), score, steps


def rescore(model, bias, tokens, length, limit, lp):
    """The length-penalised score of a returned sequence, from the model's log-probs.

    As XLM, a sequence cut at its limit is credited the best word's log-prob at the last
    position (which its forced eos replaces)."""
    seq = [int(t) for t in tokens[:length]]
    total = 0.0
    for t in range(1, length):
        lps = model.logprobs(seq[:t], bias)
        total += lps.max() if t == length - 1 and length == limit else lps[seq[t]]
    return total / (length - 1) ** lp


def exhaustive_best(model, bias, limit, lp):
    """The best length-penalised score over every possible output of length <= limit."""
    words = [w for w in range(model.vocab) if w != EOS]
    best = -math.inf
    for m in range(limit - 1):
        for ws in itertools.product(words, repeat=m):
            seq, total = [BOS], 0.0
            for w in ws:
                total += model.logprobs(seq, bias)[w]
                seq.append(w)
            lps = model.logprobs(seq, bias)
            total += lps.max() if m + 2 == limit else lps[EOS]
            best = max(best, total / (m + 1) ** lp)
    return best


# ----------------------------------------------------------------------------- helpers


def greedy_fn(model, batch, **kw):
    return jax.jit(
        lambda cache, max_lengths: decoding.greedy_decode(
            model.step,
            cache,
            batch_size=batch,
            max_len=model.max_len,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=PAD,
            max_lengths=max_lengths,
            **kw,
        )
    )


def beam_fn(model, batch, beam, eos_allowed=True):
    """fn(cache, max_lengths, length_penalty, early_stopping); the last two may be traced, so
    one compilation serves every setting."""
    return jax.jit(
        lambda cache, max_lengths, length_penalty, early_stopping: decoding.beam_search(
            model.step,
            decoding.tile_beams(cache, beam),
            batch_size=batch,
            beam_size=beam,
            max_len=model.max_len,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=PAD,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            max_lengths=max_lengths,
            eos_allowed=eos_allowed,
        )
    )


def count_steps(model, fn, *args):
    """fn(*args) on the host, and the sorted indices of the model steps it ran."""
    model.calls.clear()
    out = jax.device_get(fn(*args))
    jax.effects_barrier()
    return out, sorted(model.calls)


def check_rows_end_with_eos(tokens, lengths):
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row, n in zip(tokens, lengths, strict=True):
        assert row[0] == BOS and row[n - 1] == EOS
        assert EOS not in row[1 : n - 1]
        assert np.all(row[n:] == PAD)


MODEL = ToyModel(seed=0, vocab=6, max_len=10)
BIAS = MODEL.biases(1, 8)
LIMITS = np.array([11, 11, 2, 5, 3, 11, 7, 4], np.int32)


# ----------------------------------------------------------------------------- greedy


def test_greedy_matches_reference_with_row_limits():
    tokens, lengths = greedy_fn(MODEL, 8)(MODEL.init_cache(BIAS), LIMITS)
    ref = [ref_greedy(MODEL, b, n) for b, n in zip(BIAS, LIMITS, strict=True)]
    np.testing.assert_array_equal(tokens, np.array([r[0] for r in ref]))
    np.testing.assert_array_equal(lengths, np.array([r[1] for r in ref]))
    assert tokens.dtype == lengths.dtype == jnp.int32 and tokens.shape == (8, MODEL.max_len + 1)
    check_rows_end_with_eos(tokens, lengths)
    # The batch mixes early eos and rows cut at their limit.
    assert np.any(lengths < LIMITS) and np.any(lengths == LIMITS)


def test_greedy_early_stop_equals_full_run():
    """Stopping once every row has its eos gives what running all max_len steps gives."""
    short = np.array([3, 6, 2, 6, 3, 3, 6, 6], np.int32)
    (tokens, lengths), steps = count_steps(
        MODEL, greedy_fn(MODEL, 8), MODEL.init_cache(BIAS), short
    )
    assert lengths.max() < short.max()
    assert steps == list(range(lengths.max() - 1))  # it stopped early
    # One more row that never ends before its limit forces all max_len steps for the others.
    never_ends = np.zeros((1, MODEL.vocab), np.float32)
    never_ends[0, EOS] = -100.0
    (long_tokens, long_lengths), steps = count_steps(
        MODEL,
        greedy_fn(MODEL, 9),
        MODEL.init_cache(np.concatenate([BIAS, never_ends])),
        np.append(short, MODEL.max_len + 1),
    )
    assert long_lengths[8] == MODEL.max_len + 1
    assert steps == list(range(MODEL.max_len))
    np.testing.assert_array_equal(tokens, long_tokens[:8])
    np.testing.assert_array_equal(lengths, long_lengths[:8])


def test_greedy_without_eos_has_fixed_lengths():
    tokens, lengths = greedy_fn(MODEL, 8, eos_allowed=False)(MODEL.init_cache(BIAS), LIMITS)
    np.testing.assert_array_equal(lengths, LIMITS)
    check_rows_end_with_eos(tokens, lengths)
    ref = [ref_greedy(MODEL, b, n, eos_allowed=False)[0] for b, n in zip(BIAS, LIMITS, strict=True)]
    np.testing.assert_array_equal(tokens, np.array(ref))
    # Default limit: every row has max_len + 1 tokens.
    _, lengths = greedy_fn(MODEL, 8, eos_allowed=False)(MODEL.init_cache(BIAS), None)
    np.testing.assert_array_equal(lengths, np.full(8, MODEL.max_len + 1))


# ----------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("n, block", [(1000, 64), (1037, 64), (300, 16)])
def test_top_k_equals_lax_top_k_ties_included(n, block):
    """Values and indices of lax.top_k (ties to the lower index), with a partial last block, -inf
    entries and rows of many equal values."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(6, n)).astype(np.float32)
    x[1] = rng.integers(0, 3, n)  # ties everywhere, also across the chosen blocks
    x[2, rng.integers(0, n, n // 2)] = -np.inf
    x[3, -3:] = 9.0  # the best entries in the partial block
    for k in (1, 5, 12):
        got = jax.jit(decoding.top_k, static_argnums=(1, 2))(x, k, block)
        want = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("n, block", [(1000, 64), (1037, 64), (300, 16)])
def test_top_log_softmax_equals_top_k_of_log_softmax(n, block):
    """Bit for bit, also where distinct logits round to equal log-probabilities (a row with one
    large logit and many tiny distinct ones: a top-k of the logits would order those, the
    log-probabilities' top-k takes the lowest indices), with -inf entries and a partial block."""
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(5, n)) * 4).astype(np.float32)
    x[1] = 1e-6 * rng.permutation(n)  # distinct, all within an ulp of one another once shifted
    x[1, n // 2] = 30.0
    x[2, rng.integers(0, n, n // 2)] = -np.inf
    x[3, -3:] = 40.0  # the best entries in the partial block
    x[4] = rng.integers(0, 3, n)  # ties everywhere
    assert len(set(np.asarray(jax.nn.log_softmax(x[1]))[np.argsort(-x[1])[1:13]])) < 12
    fn = jax.jit(decoding.top_log_softmax, static_argnums=(1, 2))
    for k in (1, 5, 12):
        got = fn(x, k, block)
        want = jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_tile_beams_repeats_rows():
    tree = {"a": jnp.arange(6).reshape(3, 2), "b": (jnp.arange(3.0),)}
    out = decoding.tile_beams(tree, 2)
    np.testing.assert_array_equal(out["a"], [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(out["b"][0], [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, True), (0.6, True), (0.0, False)])
def test_beam_one_equals_greedy(length_penalty, early_stopping):
    """One beam is greedy when the first finished hypothesis ends the search: with
    early_stopping, or with length_penalty=0 (else XLM's rule may go on to a longer one)."""
    cache = MODEL.init_cache(BIAS)
    g_tokens, g_lengths = greedy_fn(MODEL, 8)(cache, LIMITS)
    fn = functools.partial(
        decoding.beam_search,
        MODEL.step,
        batch_size=8,
        beam_size=1,
        max_len=MODEL.max_len,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=PAD,
        max_lengths=LIMITS,
    )
    # Static settings here, traced elsewhere.
    b_tokens, b_lengths, _ = jax.jit(
        lambda c: fn(c, length_penalty=length_penalty, early_stopping=early_stopping)
    )(cache)
    np.testing.assert_array_equal(b_tokens, g_tokens)
    np.testing.assert_array_equal(b_lengths, g_lengths)


@functools.cache
def compiled_beam(beam, eos_allowed=True):
    return beam_fn(MODEL, 8, beam, eos_allowed=eos_allowed)


@functools.cache
def beam_run(beam, length_penalty, early_stopping, eos_allowed=True):
    fn = compiled_beam(beam, eos_allowed)
    return jax.device_get(fn(MODEL.init_cache(BIAS), LIMITS, length_penalty, early_stopping))


BEAM_CASES = [
    (beam, lp, early) for beam in (3, 4) for lp in (0.6, 1.0, 1.5) for early in (False, True)
]


@functools.cache
def compiled_beam_one_sentence(beam):
    return beam_fn(MODEL, 1, beam)


@pytest.mark.parametrize("beam, length_penalty, early_stopping", BEAM_CASES)
def test_beam_matches_reference(beam, length_penalty, early_stopping):
    tokens, lengths, scores = beam_run(beam, length_penalty, early_stopping)
    one = compiled_beam_one_sentence(beam)
    all_steps = []
    for i, (bias, limit) in enumerate(zip(BIAS, LIMITS, strict=True)):
        ref_tokens, ref_length, ref_score, ref_steps = ref_beam(
            MODEL, bias, beam, limit, length_penalty, early_stopping
        )
        np.testing.assert_array_equal(tokens[i], ref_tokens, err_msg=f"sentence {i}")
        assert lengths[i] == ref_length
        assert scores[i] == pytest.approx(ref_score, abs=1e-5)
        # Alone, the sentence gives the same, and stops when XLM's loop would (is_done).
        (t1, n1, s1), steps = count_steps(
            MODEL, one, MODEL.init_cache(bias[None]), limit[None], length_penalty, early_stopping
        )
        np.testing.assert_array_equal(t1[0], ref_tokens)
        assert n1[0] == ref_length and s1[0] == scores[i]
        assert steps == list(range(ref_steps)), f"sentence {i}"
        all_steps.append(ref_steps)
    check_rows_end_with_eos(tokens, lengths)
    assert tokens.dtype == lengths.dtype == np.int32 and scores.dtype == np.float32
    # Some sentences stop before their length limit, by the score bound without early stopping.
    assert np.any(np.array(all_steps) < LIMITS - 1)


@pytest.mark.parametrize("beam, length_penalty, early_stopping", BEAM_CASES)
def test_beam_scores_are_the_scores_of_the_tokens(beam, length_penalty, early_stopping):
    tokens, lengths, scores = beam_run(beam, length_penalty, early_stopping)
    for i, (bias, limit) in enumerate(zip(BIAS, LIMITS, strict=True)):
        expected = rescore(MODEL, bias, tokens[i], lengths[i], limit, length_penalty)
        assert scores[i] == pytest.approx(expected, abs=1e-5)


def test_beam_finds_better_hypotheses_than_greedy():
    """Sanity: beam search scores at least as well as the greedy output (here often better)."""
    g_tokens, g_lengths = jax.device_get(greedy_fn(MODEL, 8)(MODEL.init_cache(BIAS), LIMITS))
    _, _, scores = beam_run(4, 1.0, False)
    greedy_scores = []
    for i, limit in enumerate(LIMITS):
        greedy_scores.append(rescore(MODEL, BIAS[i], g_tokens[i], g_lengths[i], limit, 1.0))
    assert np.all(scores >= np.array(greedy_scores) - 1e-5)
    assert np.any(scores > np.array(greedy_scores) + 1e-3)


def test_beam_without_eos_has_fixed_lengths():
    tokens, lengths, scores = beam_run(3, 1.0, False, eos_allowed=False)
    np.testing.assert_array_equal(lengths, LIMITS)
    check_rows_end_with_eos(tokens, lengths)
    for i, (bias, limit) in enumerate(zip(BIAS, LIMITS, strict=True)):
        ref_tokens, _, ref_score, _ = ref_beam(MODEL, bias, 3, limit, 1.0, False, eos_allowed=False)
        np.testing.assert_array_equal(tokens[i], ref_tokens)
        assert scores[i] == pytest.approx(ref_score, abs=1e-5)


# (vocab, max_len, beam, seed, eos_offset): beam > (vocab - 1) ** (max_len - 1) prefixes.
EXHAUSTIVE = [(3, 4, 9, 0, 0), (4, 3, 10, 3, 2)]


@functools.cache
def toy(vocab, max_len, seed, eos_offset):
    return ToyModel(seed, vocab, max_len, eos_offset=eos_offset)


@functools.cache
def compiled_exhaustive(vocab, max_len, beam, seed, eos_offset):
    return beam_fn(toy(vocab, max_len, seed, eos_offset), 5, beam)


@pytest.mark.parametrize("length_penalty", [0.6, 1.0, 1.5])
@pytest.mark.parametrize("case", EXHAUSTIVE)
def test_beam_is_exact_when_it_covers_the_space(case, length_penalty):
    """A beam wider than the number of prefixes makes XLM's search exhaustive: the returned
    score is the best one over every possible output (eos at any position up to the limit)."""
    vocab, max_len, beam, seed, eos_offset = case
    model = toy(vocab, max_len, seed, eos_offset)
    bias = model.biases(7, 5)
    limits = np.array([max_len + 1, max_len + 1, 2, 3, max_len], np.int32)
    fn = compiled_exhaustive(*case)
    tokens, lengths, scores = jax.device_get(
        fn(model.init_cache(bias), limits, length_penalty, False)
    )
    for i, limit in enumerate(limits):
        assert scores[i] == pytest.approx(
            exhaustive_best(model, bias[i], limit, length_penalty), abs=1e-5
        )
        expected = rescore(model, bias[i], tokens[i], lengths[i], limit, length_penalty)
        assert scores[i] == pytest.approx(expected, abs=1e-5)
    check_rows_end_with_eos(tokens, lengths)
    assert np.any(lengths < limits)  # not only outputs cut at their limit


def test_beam_without_cache_reordering_is_caught(monkeypatch):
    """The toy model's history lives in the cache: skipping its reordering changes the output."""
    expected = beam_run(4, 1.0, False)
    monkeypatch.setattr(decoding, "_reorder_cache", lambda cache, rows, reordered=None: cache)
    tokens, _, scores = jax.device_get(
        beam_fn(MODEL, 8, 4)(MODEL.init_cache(BIAS), LIMITS, 1.0, False)
    )
    assert not np.array_equal(tokens, expected[0])
    assert not np.allclose(scores, expected[2])


# ----------------------------------------------------------------------------- compilation


def test_new_batch_does_not_recompile():
    g = greedy_fn(MODEL, 8)
    b = beam_fn(MODEL, 8, 3)
    other_bias = MODEL.biases(2, 8)
    other_limits = np.array([4, 11, 9, 3, 2, 7, 11, 5], np.int32)
    for bias, limits in ((BIAS, LIMITS), (other_bias, other_limits)):
        cache = MODEL.init_cache(bias)
        tokens, lengths = g(cache, limits)
        b_tokens, b_lengths, b_scores = b(cache, limits, 1.0, False)
        for i in range(8):
            ref_tokens, ref_length = ref_greedy(MODEL, bias[i], limits[i])
            np.testing.assert_array_equal(tokens[i], ref_tokens)
            assert lengths[i] == ref_length
            ref_tokens, ref_length, ref_score, _ = ref_beam(
                MODEL, bias[i], 3, limits[i], 1.0, False
            )
            np.testing.assert_array_equal(b_tokens[i], ref_tokens)
            assert b_lengths[i] == ref_length
            assert b_scores[i] == pytest.approx(ref_score, abs=1e-5)
    assert g._cache_size() == 1
    assert b._cache_size() == 1
