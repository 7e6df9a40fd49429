"""XLM's denoising noise (shuffle, dropout, blank) on fixed-shape batches, checked in numbers.

Rows are built so that every token identifies its input position: the piece at position j is
``OFFSET + 2 * j`` if it begins a word and ``OFFSET + 2 * j + 1`` if it continues one. So the
tokens of a row are distinct and a numpy reference can follow every token through the noise.
Statistical checks compare counts with their expectation within 4 standard deviations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlm_jax.text import noise
from xlm_jax.text.tokenizer import EOS_ID, MASK_ID, N_SPECIAL, PAD_ID

B, L = 512, 32
OFFSET = 100
WORD_START = np.zeros(OFFSET + 2 * L, dtype=bool)
WORD_START[:N_SPECIAL] = True
WORD_START[OFFSET::2] = True

# One compilation per function and mode: every call below uses the same shapes, and the strengths
# are traced (Python floats passed to a jitted function become traced float32 scalars).
shuffle = jax.jit(noise.word_shuffle)
dropout = jax.jit(noise.word_dropout)
blank = jax.jit(noise.word_blank, static_argnames="blank_id")
add_noise = jax.jit(noise.add_noise, static_argnames="blank_id")
word_ids = jax.jit(noise.word_ids)


def key(seed: int) -> jax.Array:
    return jax.random.key(seed)


def make_batch(seed: int, *, n_pieces: int | None = None, whole_words: bool = False):
    """``(B, L)`` int32 rows of 0..L-2 pieces (every 64th row is all padding, no EOS)."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, L), PAD_ID, np.int32)
    for r in range(B):
        if n_pieces is None and r % 64 == 63:
            continue
        n = int(rng.integers(0, L - 1)) if n_pieces is None else n_pieces
        cont = (rng.random(n) < 0.5) if whole_words else np.zeros(n, bool)
        tokens[r, 0] = EOS_ID
        tokens[r, 1 : n + 1] = OFFSET + 2 * np.arange(1, n + 1) + cont
        tokens[r, n + 1] = EOS_ID
    return tokens


def body(row) -> list[int]:
    out = []
    for t in row[1:]:
        if t in (EOS_ID, PAD_ID):
            break
        out.append(int(t))
    return out


def ref_words(row, whole_words: bool) -> list[tuple[int, ...]]:
    """The words of a row as tuples of pieces; the first piece always opens a word."""
    words: list[list[int]] = []
    for j, t in enumerate(body(row)):
        if j == 0 or not whole_words or WORD_START[t]:
            words.append([t])
        else:
            words[-1].append(t)
    return [tuple(w) for w in words]


def check_layout(out, inp, blank_id: int | None = None) -> None:
    """EOS at 0, one closing EOS right after the last word, then padding; the row's own tokens."""
    out, inp = np.asarray(out), np.asarray(inp)
    assert out.shape == inp.shape and out.dtype == inp.dtype
    for o, i in zip(out, inp, strict=True):
        if i[0] != EOS_ID or not body(i):  # padding rows and rows without words: untouched
            np.testing.assert_array_equal(o, i)
            continue
        assert o[0] == EOS_ID
        n = 1 + len(body(o))
        assert o[n] == EOS_ID and (o[n + 1 :] == PAD_ID).all()
        b = np.array(body(o))
        own = b[b != blank_id] if blank_id is not None else b
        assert set(own.tolist()) <= set(body(i)), "a token that is not the row's own"
        assert len(set(own.tolist())) == len(own), "a token used twice"


def units(out_row, in_words, blank_id: int | None = None) -> list[int | None]:
    """The output body as input word indices (None for a blank), asserting whole, ordered words."""
    where = {t: i for i, w in enumerate(in_words) for t in w}
    b, result, j = body(out_row), [], 0
    while j < len(b):
        if b[j] == blank_id:
            result.append(None)
            j += 1
            continue
        i = where[b[j]]
        assert tuple(b[j : j + len(in_words[i])]) == in_words[i], "a word broken apart"
        result.append(i)
        j += len(in_words[i])
    kept = [i for i in result if i is not None]
    assert len(set(kept)) == len(kept), "a word appears twice"
    return result


def within(count: float, expected: float, var: float, n_sigma: float = 4.0) -> None:
    sd = math.sqrt(var)
    assert abs(count - expected) <= n_sigma * sd, (count, expected, sd)


# --- word indices -------------------------------------------------------------------------------


def test_word_ids_by_hand():
    a, b_, c, d, e, f = 120, 121, 130, 140, 141, 143  # starts: even ids (a, c, d)
    rows = np.array(
        [
            [EOS_ID, a, b_, c, d, e, f, EOS_ID, PAD_ID],
            [EOS_ID, b_, e, a, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],  # opens with a piece
            [EOS_ID, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
        ],
        np.int32,
    )
    np.testing.assert_array_equal(
        noise.word_ids(rows, WORD_START),
        [[0, 1, 1, 2, 3, 3, 3, 4, 4], [0, 1, 1, 2, 3, 3, 3, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1, 1]],
    )
    np.testing.assert_array_equal(noise.word_ids(rows)[0], [0, 1, 2, 3, 4, 5, 6, 7, 7])


@pytest.mark.parametrize("whole_words", [False, True])
def test_word_ids_match_reference(whole_words):
    tokens = make_batch(0, whole_words=whole_words)
    got = np.asarray(word_ids(tokens, WORD_START if whole_words else None))
    for g, row in zip(got, tokens, strict=True):
        words = ref_words(row, whole_words)
        want = [0] + [i + 1 for i, w in enumerate(words) for _ in w]
        want += [len(words) + 1] * (L - len(want))
        np.testing.assert_array_equal(g, want)


def test_word_start_from_pieces():
    pieces = ["<s>", "</s>", "<pad>", "<unk>", "\u2581the", "re", "\u2581", ","]
    table = noise.word_start_from_pieces(pieces, n_special=4)
    np.testing.assert_array_equal(table, [1, 1, 1, 1, 1, 0, 1, 0])


# --- shuffle ------------------------------------------------------------------------------------


def swap_rate(k: float, d: int) -> float:
    """P(words i and i + d swap) = P(U_i - U_{i+d} > d) for U ~ U(0, k): (k - d)^2 / (2 k^2)."""
    return max(k - d, 0.0) ** 2 / (2 * k * k)


@pytest.mark.parametrize("whole_words", [False, True])
@pytest.mark.parametrize("k", [2.5, 3.0, 5.0])
def test_shuffle_is_a_local_permutation(k, whole_words):
    tokens = make_batch(1, whole_words=whole_words)
    wid = word_ids(tokens, WORD_START) if whole_words else None
    out = np.asarray(shuffle(key(1), tokens, k, word_ids=wid))
    check_layout(out, tokens)
    bound = math.ceil(k) - 1  # i + U(0, k) < j + U(0, k) whenever j - i >= k
    max_move, changed, long_rows = 0, 0, 0
    pairs = {1: [0, 0], 2: [0, 0], bound + 1: [0, 0]}  # distance -> [n pairs, n swapped]
    for o, i in zip(out, tokens, strict=True):
        in_words = ref_words(i, whole_words)
        order = units(o, in_words)
        assert sorted(order) == list(range(len(in_words)))
        moves = [abs(q - w) for q, w in enumerate(order)]
        max_move = max([max_move, *moves])
        if len(in_words) >= 8:
            long_rows += 1
            changed += order != sorted(order)
        where = np.argsort(order)  # output position of each input word
        for d, count in pairs.items():
            count[0] += max(len(in_words) - d, 0)
            count[1] += int(np.sum(where[d:] < where[:-d])) if len(in_words) > d else 0
    assert max_move == bound  # never more, and the bound is reached
    assert changed >= 0.7 * long_rows
    # Neighbouring pairs share a draw and are negatively correlated: binomial sd is conservative.
    for d, (n, swapped) in pairs.items():
        p = swap_rate(k, d)
        within(swapped, n * p, n * p * (1 - p) + 1e-9)
    assert pairs[bound + 1][1] == 0


def test_shuffle_k_at_most_one_is_identity():
    tokens = make_batch(2)
    for k in (0.0, 0.5, 1.0):
        assert noise.word_shuffle(key(0), tokens, k) is tokens  # concrete: nothing drawn
        np.testing.assert_array_equal(shuffle(key(0), tokens, k), tokens)  # traced k


# --- dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("whole_words", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_rate_order_and_never_empty(p, whole_words):
    tokens = make_batch(3, whole_words=whole_words)
    wid = word_ids(tokens, WORD_START) if whole_words else None
    n_words = dropped = expected = var = 0.0
    for seed in range(2):
        out = np.asarray(dropout(key(10 + seed), tokens, p, word_ids=wid))
        check_layout(out, tokens)
        for o, i in zip(out, tokens, strict=True):
            in_words = ref_words(i, whole_words)
            m = len(in_words)
            kept = units(o, in_words)
            assert kept == sorted(kept), "kept words change order"
            if m:
                assert len(kept) >= 1, "an empty sentence"
                # The draw that would drop all m words keeps one instead: E = m p - p^m.
                n_words += m
                dropped += m - len(kept)
                expected += m * p - p**m
                var += m * p * (1 - p)
    assert n_words >= 4000
    within(dropped, expected, var)


def test_dropout_all_keeps_one_uniform_word():
    tokens = make_batch(4, n_pieces=4)
    counts = np.zeros(4)
    for seed in range(4):
        out = np.asarray(dropout(key(20 + seed), tokens, 1.0))
        check_layout(out, tokens)
        kept = [units(o, ref_words(i, False)) for o, i in zip(out, tokens, strict=True)]
        assert all(len(k) == 1 for k in kept)
        np.add.at(counts, [k[0] for k in kept], 1)
    n = counts.sum()
    for c in counts:
        within(c, n / 4, n * 0.25 * 0.75)


def test_dropout_zero_is_identity():
    tokens = make_batch(5)
    assert noise.word_dropout(key(0), tokens, 0.0) is tokens
    np.testing.assert_array_equal(dropout(key(0), tokens, 0.0), tokens)


# --- blank --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_blank_rate_and_tokens_in_place(p):
    tokens = make_batch(6)
    out = np.asarray(blank(key(30), tokens, p))
    check_layout(out, tokens, MASK_ID)
    in_body = (tokens != EOS_ID) & (tokens != PAD_ID)
    blanked = out == MASK_ID
    assert (in_body | ~blanked).all()
    np.testing.assert_array_equal(out[~blanked], tokens[~blanked])
    n = in_body.sum()
    assert n >= 4000
    within(blanked.sum(), n * p, n * p * (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_blank_whole_words_leaves_one_blank_per_word(p):
    tokens = make_batch(7, whole_words=True)
    out = np.asarray(blank(key(31), tokens, p, word_ids=word_ids(tokens, WORD_START)))
    check_layout(out, tokens, MASK_ID)
    n_words = n_blanked = 0
    for o, i in zip(out, tokens, strict=True):
        in_words = ref_words(i, True)
        got = units(o, in_words, MASK_ID)
        assert len(got) == len(in_words)
        assert all(g is None or g == q for q, g in enumerate(got)), "a word moved"
        n_words += len(in_words)
        n_blanked += got.count(None)
    assert n_blanked == (out == MASK_ID).sum()
    within(n_blanked, n_words * p, n_words * p * (1 - p))


def test_blank_zero_is_identity_and_custom_id():
    tokens = make_batch(8)
    assert noise.word_blank(key(0), tokens, 0.0) is tokens
    np.testing.assert_array_equal(blank(key(0), tokens, 0.0), tokens)
    out = np.asarray(blank(key(0), tokens, 1.0, blank_id=7))
    in_body = (tokens != EOS_ID) & (tokens != PAD_ID)
    np.testing.assert_array_equal(out, np.where(in_body, 7, tokens))


# --- add_noise ----------------------------------------------------------------------------------


def test_add_noise_is_shuffle_dropout_blank():
    tokens = make_batch(9)
    k_s, k_d, k_b = jax.random.split(key(40), 3)
    want = shuffle(k_s, tokens, 3.0)
    want = dropout(k_d, want, 0.1)
    want = blank(k_b, want, 0.1)
    got = add_noise(key(40), tokens, shuffle_k=3.0, dropout=0.1, blank=0.1)
    np.testing.assert_array_equal(got, want)
    check_layout(got, tokens, MASK_ID)
    assert (np.asarray(got) != tokens).any(axis=1).mean() > 0.5


@pytest.mark.parametrize("whole_words", [False, True])
def test_add_noise_layout_and_whole_words(whole_words):
    tokens = make_batch(10, whole_words=whole_words)
    ws = WORD_START if whole_words else None
    for seed in range(3):
        out = np.asarray(add_noise(key(50 + seed), tokens, dropout=0.2, blank=0.2, word_start=ws))
        check_layout(out, tokens, MASK_ID)
        for o, i in zip(out, tokens, strict=True):
            in_words = ref_words(i, whole_words)
            got = units(o, in_words, MASK_ID)
            assert bool(got) == bool(in_words)


def test_add_noise_carries_words_through_the_steps():
    """After a shuffle, a word that opened with a continuation piece is still a word of its own.

    Blanking everything must give exactly one blank per input word, wherever the words moved.
    """
    tokens = make_batch(11, whole_words=True)
    out = np.asarray(
        add_noise(key(60), tokens, shuffle_k=4.0, dropout=0.0, blank=1.0, word_start=WORD_START)
    )
    check_layout(out, tokens, MASK_ID)
    n_blanks = (out == MASK_ID).sum(axis=1)
    np.testing.assert_array_equal(n_blanks, [len(ref_words(i, True)) for i in tokens])


# --- jit, keys, arguments -----------------------------------------------------------------------


def test_jit_matches_eager_and_depends_on_key():
    tokens = make_batch(12)
    cases = [
        (noise.word_shuffle, shuffle, 3.0),
        (noise.word_dropout, dropout, 0.2),
        (noise.word_blank, blank, 0.2),
    ]
    for eager, jitted, s in cases:
        a = jitted(key(70), tokens, s)
        assert a.shape == tokens.shape and a.dtype == jnp.int32
        np.testing.assert_array_equal(a, eager(key(70), jnp.asarray(tokens), s))
        np.testing.assert_array_equal(a, jitted(key(70), tokens, s))
        assert (np.asarray(jitted(key(71), tokens, s)) != np.asarray(a)).any()


def test_bad_arguments():
    tokens = make_batch(13)
    with pytest.raises(ValueError, match="probability"):
        noise.word_dropout(key(0), tokens, 1.5)
    with pytest.raises(ValueError, match="probability"):
        noise.add_noise(key(0), tokens, blank=-0.1)
    with pytest.raises(ValueError, match="layout"):
        noise.word_blank(key(0), tokens, 0.1, blank_id=PAD_ID)
