"""Token-budget batches for translation (XLM's ``tokens_per_batch``): one row count per bucket,
bounded shapes, every sentence once per epoch, exact resume, per-process rows, early refusal."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import tiny_nmt
from tests.test_packing import Counted
from tests.test_sentences import _ids, _lengths, _sentences
from xlm_jax.data.sentences import (
    ParallelBatches,
    SentenceBatches,
    bucket_length,
    budget_rows,
    greedy_cut,
    shuffled_batches,
)
from xlm_jax.tasks import nmt
from xlm_jax.text.tokenizer import PAD_ID

BUCKETS = (8, 16, 32, 64)
BUDGET = 256
ROWS = {8: 32, 16: 16, 32: 8, 64: 4}  # 256 // L, a multiple of 2 (the batch split below)


def _make(parallel: bool, n: int = 700, sides=None, **kw) -> SentenceBatches | ParallelBatches:
    """Sentence i (pair i) starts with token 10 + i, lengths 1..60; ``sides``: (src, tgt)."""
    args = {"buckets": BUCKETS, "seed": 1, "batch_size": 8, "tokens_per_batch": BUDGET}
    args |= {"row_multiple": 2, **kw}
    src, tgt = sides or (_sentences(n, 1), _sentences(n, 2))
    if parallel:
        return ParallelBatches(src, tgt, src_lang=0, tgt_lang=2, name="mt_en-fr", **args)
    return SentenceBatches(src, lang_id=3, name="ae_en", **args)


def _real(tokens: np.ndarray) -> np.ndarray:
    """Which rows hold a sentence (the others are all PAD)."""
    return (tokens != PAD_ID).any(1)


def _key(parallel: bool) -> str:
    return "tgt_tokens" if parallel else "tokens"


def test_budget_rows_and_greedy_cut():
    assert [budget_rows(BUDGET, b, 2) for b in BUCKETS] == list(ROWS.values())
    assert budget_rows(100, 16, 4) == 4 and budget_rows(100, 16) == 6
    # a batch grows while its size stays within the smallest cap among its items
    np.testing.assert_array_equal(greedy_cut(np.array([4, 4, 4, 4, 4, 2, 2, 2])), [0, 4, 6, 8])
    np.testing.assert_array_equal(greedy_cut(np.array([3, 1, 3, 3])), [0, 1, 2, 4])
    np.testing.assert_array_equal(greedy_cut(np.array([3, 3, 3, 1, 2, 2])), [0, 3, 4, 6])
    order, bounds = np.arange(10, 17), np.array([0, 3, 4, 7])
    got, new = shuffled_batches(np.random.default_rng(0), order, bounds)
    perm = np.random.default_rng(0).permutation(3)
    parts = [order[bounds[k] : bounds[k + 1]] for k in perm]
    np.testing.assert_array_equal(got, np.concatenate(parts))
    np.testing.assert_array_equal(np.diff(new), [len(p) for p in parts])


@pytest.mark.parametrize("parallel", [False, True])
def test_rows_are_the_bucket_rows_of_the_longest_sentence(parallel):
    it = _make(parallel)
    assert it.bucket_rows == ROWS
    shapes, real_rows = set(), {b: [] for b in BUCKETS}
    for _ in range(it.epoch_batches()):
        rows = it.next_rows()
        b = next(it)
        lengths = {k: v.shape[1] for k, v in b.items() if k.endswith("tokens")}
        longest = max(lengths.values())  # pairs: the longer side's bucket decides the rows
        assert all(v.shape[0] == rows == ROWS[longest] for v in b.values())
        assert all(rows * n <= BUDGET for n in lengths.values())
        for key, n in lengths.items():  # each side: the bucket of its longest real row
            real = _real(b[key])
            assert n == bucket_length(int(_lengths(b[key][real]).max()) + 2, BUCKETS)
            assert (b[key][~real] == PAD_ID).all()
            assert (b[key.replace("tokens", "positions")][~real] == 0).all()
        shapes.add(tuple(v.shape for v in b.values()))
        real_rows[longest].append(int(_real(b[_key(parallel)]).sum()))
    assert len({s[0][0] for s in shapes}) <= len(BUCKETS)
    if not parallel:
        assert len(shapes) <= len(BUCKETS)
    # shorter sentences come in bigger batches (8 rows at 32 tokens, 4 at 64), nearly full
    assert np.mean(real_rows[32]) > 1.5 * np.mean(real_rows[64])
    filled = sum(map(sum, real_rows.values())) / sum(ROWS[b] * len(v) for b, v in real_rows.items())
    assert filled > 0.9
    assert it.state() == {"epoch": 1, "cursor": 0}


@pytest.mark.parametrize("parallel", [False, True])
def test_every_sentence_exactly_once_per_epoch(parallel):
    it = _make(parallel, n=503)
    epochs = []
    for epoch in range(2):
        ids = []
        for _ in range(it.epoch_batches()):
            tokens = next(it)[_key(parallel)]
            ids += _ids(tokens[_real(tokens)])
        assert sorted(ids) == list(range(503))
        assert it.state() == {"epoch": epoch + 1, "cursor": 0}
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # each epoch its own order


@pytest.mark.parametrize("parallel", [False, True])
def test_resume_from_state_mid_epoch(parallel):
    it = _make(parallel)
    for _ in range(9):
        next(it)
    state, n = it.state(), it.epoch_batches()
    later = []
    for _ in range(n):  # crosses into the next epoch
        later.append((it.next_rows(), next(it)))
    assert it.epoch == 1
    fresh = _make(parallel)
    fresh.restore(state)
    for rows, b in later:
        assert fresh.next_rows() == rows
        a = next(fresh)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("budget", [BUDGET, -1])
@pytest.mark.parametrize("parallel", [False, True])
def test_two_processes_read_their_rows_and_make_the_whole_batch(parallel, budget):
    """``rows_of`` gives each process half of every batch (fixed-size batches too): together
    they are the single process's batches, and each reads only the sentences of its rows."""

    def make(p: int | None):
        rows_of = None if p is None else (lambda n: (p * n // 2, (p + 1) * n // 2))
        sides = (Counted(_sentences(300, 1)), Counted(_sentences(300, 2)))
        return _make(parallel, sides=sides, tokens_per_batch=budget, rows_of=rows_of), sides

    (whole, _), procs = make(None), [make(0), make(1)]
    for it, _ in procs:
        it.restore({"epoch": 0, "cursor": 30})
    whole.restore({"epoch": 0, "cursor": 30})
    for _ in range(whole.epoch_batches() - 20):  # crosses into epoch 1
        rows = whole.next_rows()
        assert all(it.next_rows() == rows for it, _ in procs)
        g = next(whole)
        parts = []
        for it, (src, tgt) in procs:
            src.read.clear(), tgt.read.clear()
            parts.append(next(it))
            tokens = parts[-1][_key(parallel)]
            ids = sorted(_ids(tokens[_real(tokens)]))
            assert sorted(src.read) == ids  # its rows' sentences, each once, nothing else
            assert sorted(tgt.read) == (ids if parallel else [])
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
    assert whole.epoch == 1 and all(it.state() == whole.state() for it, _ in procs)


def test_a_too_small_budget_is_refused_early():
    with pytest.raises(ValueError, match=r"tokens_per_batch=127 gives 1 rows .* at least 128"):
        _make(False, tokens_per_batch=127)  # 2 rows (one per shard) of 64 tokens need 128
    with pytest.raises(ValueError, match="use rows_of"):
        _make(False, rows=(0, 4))
    config = tiny_nmt(tokens_per_batch=150)  # buckets 48,96,160
    with pytest.raises(ValueError, match=r"tokens_per_batch=150 .*longest bucket \(160 tokens\)"):
        nmt.check(config)
    config.tokens_per_batch = 300
    nmt.check(config)
    with pytest.raises(ValueError, match=r"2-way batch split: it needs at least 320"):
        nmt.check_token_budget(config, 2)  # setup's check, with the mesh's batch split
    assert "batch_size" not in nmt.batch_sizes(config)  # a budget sets the rows, not batch_size
    assert "batch_size" in nmt.batch_sizes(tiny_nmt())


def test_aot_compiles_each_bucket_at_its_rows():
    """``python -m xlm_jax.aot --mode=nmt`` lowers the train steps at the run's shapes: each
    bucket's rows with ``--all_shapes``, else the longest bucket's (nothing compiled here)."""
    from xlm_jax.core import parallel
    from xlm_jax.tools import aot

    config = tiny_nmt(tokens_per_batch=400, eval_batch_size=4, init_checkpoint="")
    mesh, rules = parallel.make_mesh((-1, 1, 1)), parallel.rules_from_config(None)
    shapes = {p.name: p.batch_shape for p in aot.run_programs("nmt", config, mesh, rules, True)}
    assert {k: v for k, v in shapes.items() if k.startswith("bt")} == {
        "bt_48": (8, 48),
        "bt_96": (4, 96),
        "bt_160": (2, 160),
    }
    assert shapes["greedy_96"] == (4, 96)  # evaluation keeps eval_batch_size
    longest = {p.name: p.batch_shape for p in aot.run_programs("nmt", config, mesh, rules, False)}
    assert longest["mt"] == (2, 160) and longest["eval_loss"] == (4, 160)
