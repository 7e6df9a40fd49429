"""Streams, TLM pairs, the XLM step schedule and iterator state."""

import numpy as np
import pytest

from xlm_jax.data import batches
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID


def _sentences(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(20, 100, rng.integers(0, 12)).astype(np.int32) for _ in range(n)]


def test_stream_layout():
    sents = [np.array([5, 6]), np.array([], np.int32), np.array([7])]
    np.testing.assert_array_equal(batches.make_stream(sents), [EOS_ID, 5, 6, EOS_ID, 7, EOS_ID])


def test_stream_batches_cover_the_stream_and_resume():
    stream = batches.make_stream(_sentences(500))
    it = batches.StreamBatches(stream, lang_id=3, batch_size=4, length=16, seed=1, name="mlm_en")
    first = [next(it) for _ in range(5)]
    b = first[0]
    assert b["tokens"].shape == (4, 16)
    np.testing.assert_array_equal(b["positions"][2], np.arange(16))
    assert (b["langs"] == 3).all()
    # every window is a contiguous cut of the stream
    text = stream.tobytes()
    for row in b["tokens"]:
        assert row.tobytes() in text
    # one epoch visits each window exactly once
    n_windows = len(it._epoch_windows())
    it2 = batches.StreamBatches(stream, lang_id=3, batch_size=1, length=16, seed=1, name="mlm_en")
    rows = [next(it2)["tokens"][0].tobytes() for _ in range(n_windows)]
    assert len(set(rows)) == n_windows and it2.epoch == 1
    # resume: a fresh iterator restored to the state continues identically
    state = it.state()
    later = [next(it)["tokens"] for _ in range(40)]  # crosses epochs
    it3 = batches.StreamBatches(stream, lang_id=3, batch_size=4, length=16, seed=1, name="mlm_en")
    it3.restore(state)
    for a in later:
        np.testing.assert_array_equal(next(it3)["tokens"], a)


def test_pair_packing_positions_restart_and_langs_per_segment():
    tokens, positions, langs = batches.pack_pair(
        np.array([10, 11, 12]), np.array([20, 21]), 0, 2, 12
    )
    np.testing.assert_array_equal(tokens, [1, 10, 11, 12, 1, 1, 20, 21, 1, PAD_ID, PAD_ID, PAD_ID])
    np.testing.assert_array_equal(positions, [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(langs[:9], [0, 0, 0, 0, 0, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="does not fit"):
        batches.pack_pair(np.arange(5), np.arange(5), 0, 1, 10)


def test_pair_batches_drop_and_resume():
    src, tgt = _sentences(200, 1), _sentences(200, 2)
    src[0] = np.arange(20, 80)  # too long for length 32
    it = batches.PairBatches(
        src, tgt, src_lang=0, tgt_lang=1, batch_size=8, length=32, seed=0, name="tlm"
    )
    expected_drop = sum(
        1
        for s, t in zip(src, tgt, strict=True)
        if not len(s) or not len(t) or len(s) + len(t) + 4 > 32
    )
    assert it.n_dropped == expected_drop >= 1
    b = next(it)
    assert b["tokens"].shape == (8, 32)
    # second segment restarts its positions right after the first segment's closing </s>
    for row_t, row_p, row_l in zip(b["tokens"], b["positions"], b["langs"], strict=True):
        eos = np.nonzero(row_t == EOS_ID)[0]
        assert len(eos) == 4 and eos[2] == eos[1] + 1
        assert row_p[eos[2]] == 0 and row_p[eos[1]] == eos[1]
        assert (row_l[: eos[2]] == 0).all() and (row_l[eos[2] : eos[3] + 1] == 1).all()
    state = it.state()
    later = [next(it)["tokens"] for _ in range(60)]
    it2 = batches.PairBatches(
        src, tgt, src_lang=0, tgt_lang=1, batch_size=8, length=32, seed=0, name="tlm"
    )
    it2.restore(state)
    for a in later:
        np.testing.assert_array_equal(next(it2)["tokens"], a)


def test_eval_batches_see_every_token_once():
    stream = batches.make_stream(_sentences(300))
    out = batches.eval_stream_batches(stream, lang_id=1, batch_size=4, length=16)
    flat = np.concatenate([b["tokens"].reshape(-1) for b in out])
    np.testing.assert_array_equal(flat[: len(stream)], stream)
    assert (flat[len(stream) :] == PAD_ID).all()


def test_parse_steps():
    langs = ["en", "fr", "de"]
    steps = batches.parse_steps("mlm", "en, fr,en-fr", langs)
    assert [s.key for s in steps] == ["mlm_en", "mlm_fr", "tlm_en-fr"]
    for bad, msg in [
        ("en-xx", "not in langs"),
        ("en-en", "itself"),
        ("en,en", "duplicate"),
        ("en-fr-de", "parse"),
    ]:
        with pytest.raises(ValueError, match=msg):
            batches.parse_steps("mlm", bad, langs)
    clm = batches.parse_steps("clm", "en,en-fr", langs)  # XLM's clm_steps take pairs too
    assert [(s.key, s.objective, s.lang2) for s in clm] == [
        ("clm_en", "clm", None),
        ("clm_en-fr", "clm", "fr"),
    ]


def test_schedule_sampling_matches_alpha():
    langs = ["en", "fr", "de"]
    mono = batches.parse_steps("mlm", "en,fr,de,en-fr,en-de", langs)
    sizes = {
        "mlm_en": 100_000,
        "mlm_fr": 10_000,
        "mlm_de": 1_000,
        "tlm_en-fr": 5_000,
        "tlm_en-de": 500,
    }
    sched = batches.Schedule([[], mono], sizes, sampling_factor=0.7, seed=0)
    assert sched.iteration_length == 3 + 2
    counts: dict[str, int] = {}
    n_iter = 4000
    for i in range(n_iter):
        it = sched.iteration(i)
        assert [s.lang2 is None for s in it] == [True] * 3 + [False] * 2  # mono first, as XLM
        for s in it:
            counts[s.key] = counts.get(s.key, 0) + 1
    p_mono = np.array([100_000, 10_000, 1_000.0]) / 111_000
    p_mono = p_mono**0.7 / (p_mono**0.7).sum()
    for key, p in zip(["mlm_en", "mlm_fr", "mlm_de"], p_mono, strict=True):
        assert counts[key] / (3 * n_iter) == pytest.approx(p, abs=0.01)
        assert sched.probs[key] == pytest.approx(p, rel=1e-12)
    p_para = np.array([5_000, 500.0]) / 5_500
    p_para = p_para**0.7 / (p_para**0.7).sum()
    assert counts["tlm_en-fr"] / (2 * n_iter) == pytest.approx(p_para[0], abs=0.01)
    # a pure function of the step: the same step gives the same spec, whatever came before
    assert sched(12345) == batches.Schedule([[], mono], sizes, sampling_factor=0.7, seed=0)(12345)


def test_schedule_without_sampling_shuffles_each_list():
    langs = ["en", "fr"]
    clm = batches.parse_steps("clm", "en,fr", langs)
    mlm = batches.parse_steps("mlm", "en,fr,en-fr", langs)
    sched = batches.Schedule([clm, mlm], {}, sampling_factor=0, seed=0)
    assert sched.iteration_length == 5
    for i in range(20):
        it = sched.iteration(i)
        assert sorted(s.key for s in it[:2]) == ["clm_en", "clm_fr"]
        assert sorted(s.key for s in it[2:]) == ["mlm_en", "mlm_fr", "tlm_en-fr"]


def test_lambda_schedules():
    pts = batches.parse_lambda("0:1,1000:0.1,2000:0")
    assert batches.lambda_at(pts, 0) == 1.0
    assert batches.lambda_at(pts, 500) == pytest.approx(0.55)
    assert batches.lambda_at(pts, 1500) == pytest.approx(0.05)
    assert batches.lambda_at(pts, 5000) == 0.0
    assert batches.lambda_at(batches.parse_lambda("0.5"), 10**6) == 0.5
    for bad in ("1:1,0:2", "0:1,x:2", "5:1"):
        with pytest.raises(ValueError):
            batches.parse_lambda(bad)


def _xlm_get_lambda_value(config: list[tuple[int, float]], n_iter: int) -> float:
    """facebookresearch/XLM's ``get_lambda_value`` (src/trainer.py), the reference formula."""
    ranges = [i for i in range(len(config) - 1) if config[i][0] <= n_iter < config[i + 1][0]]
    if not ranges:
        assert n_iter >= config[-1][0]
        return config[-1][1]
    x_a, y_a = config[ranges[0]]
    x_b, y_b = config[ranges[0] + 1]
    return y_a + (n_iter - x_a) * float(y_b - y_a) / float(x_b - x_a)


@pytest.mark.parametrize("steps_per_iteration", [1, 4, 7])
def test_lambda_schedules_count_xlm_iterations(steps_per_iteration):
    """XLM's train loop: every step of an iteration uses the current λ; ``trainer.iter()`` then
    increments n_total_iter and sets λ = get_lambda_value(config, n_total_iter)."""
    spec = "0:1,10:0.1,30:0"
    config = [(0, 1.0), (10, 0.1), (30, 0.0)]
    lambdas = batches.Lambdas({"ae": spec, "bt": "0.5"}, steps_per_iteration)
    lam, step = config[0][1], 0  # XLM starts at the first point's value
    for n_total_iter in range(1, 41):
        for _ in range(steps_per_iteration):
            assert lambdas("ae", step) == pytest.approx(lam, abs=1e-12), step
            assert lambdas("bt", step) == 0.5
            step += 1
        lam = _xlm_get_lambda_value(config, n_total_iter)  # trainer.iter()
    assert lambdas("ae", 15 * steps_per_iteration) == pytest.approx(0.1 - 0.1 * 5 / 20)
    with pytest.raises(ValueError, match="iteration_length"):
        batches.Lambdas({"ae": spec}, 0)


def test_lambda_unit_and_checkpoints_written_before_it():
    per_point = batches.lambda_steps_per_point
    assert per_point("iterations", None, 4) == 4
    assert per_point("steps", None, 4) == 1
    assert per_point("iterations", {"lambda_unit": "iterations"}, 4) == 4
    assert per_point("iterations", {"lambda_ae": "0:1,10:0"}, 4) == 1  # resumes as it ran
    with pytest.raises(ValueError, match="lambda_unit='iteration'"):
        per_point("iteration", None, 4)


def test_int32_permutation_is_numpy_s_order():
    """Epoch orders are int32 to save memory: the same order as rng.permutation(n), so
    checkpoints saved before keep resuming exactly."""
    for n in (1, 2, 7, 1000, 123_457):
        a = np.random.default_rng([5, n]).permutation(n)
        b = batches.permutation(np.random.default_rng([5, n]), n)
        assert b.dtype == np.int32
        np.testing.assert_array_equal(a, b)
