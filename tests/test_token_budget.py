"""Token-budget batches (XLM's ``tokens_per_batch``) for translation and for pretraining's TLM
pairs (``tlm_tokens_per_batch``): one row count per bucket, bounded shapes, every sentence (pair)
once per epoch, exact resume, per-process rows, early refusal."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config, tiny_nmt
from tests.test_packing import Counted
from tests.test_sentences import _ids, _lengths, _sentences
from xlm_jax.core import loop
from xlm_jax.core.metrics import read_jsonl
from xlm_jax.data import batches
from xlm_jax.data.sentences import (
    BucketedPairBatches,
    ParallelBatches,
    SentenceBatches,
    bucket_length,
    budget_rows,
    greedy_cut,
    shuffled_batches,
)
from xlm_jax.model import objectives
from xlm_jax.tasks import nmt, pretrain
from xlm_jax.text.tokenizer import PAD_ID

BUCKETS = (8, 16, 32, 64)
BUDGET = 256
ROWS = {8: 32, 16: 16, 32: 8, 64: 4}  # 256 // L, a multiple of 2 (the batch split below)
KINDS = ["ae", "mt", "tlm"]  # sentences, translation pairs, TLM rows of pairs


def _sides(kind: str, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sentence i (pair i) starts with token 10 + i, lengths 1..60 (TLM: 1..30 a side, so a
    pair's row fits in 64)."""
    max_len = 30 if kind == "tlm" else 60
    return _sentences(n, 1, max_len), _sentences(n, 2, max_len)


def _make(kind: str, n: int = 700, sides=None, **kw):
    """``sides``: (src, tgt)."""
    args = {"buckets": BUCKETS, "seed": 1, "batch_size": 8, "tokens_per_batch": BUDGET}
    args |= {"row_multiple": 2, **kw}
    src, tgt = sides or _sides(kind, n)
    if kind == "mt":
        return ParallelBatches(src, tgt, src_lang=0, tgt_lang=2, name="mt_en-fr", **args)
    if kind == "tlm":
        return BucketedPairBatches(src, tgt, src_lang=0, tgt_lang=2, name="tlm", **args)
    return SentenceBatches(src, lang_id=3, name="ae_en", **args)


def _real(tokens: np.ndarray) -> np.ndarray:
    """Which rows hold a sentence (the others are all PAD)."""
    return (tokens != PAD_ID).any(1)


def _key(kind: str) -> str:
    return "tgt_tokens" if kind == "mt" else "tokens"


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


@pytest.mark.parametrize("kind", KINDS)
def test_rows_are_the_bucket_rows_of_the_longest_sentence(kind):
    it = _make(kind)
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
        real_rows[longest].append(int(_real(b[_key(kind)]).sum()))
    assert len({s[0][0] for s in shapes}) <= len(BUCKETS)
    if kind != "mt":
        assert len(shapes) <= len(BUCKETS)
    # shorter sentences come in bigger batches (8 rows at 32 tokens, 4 at 64), nearly full
    assert np.mean(real_rows[32]) > 1.5 * np.mean(real_rows[64])
    filled = sum(map(sum, real_rows.values())) / sum(ROWS[b] * len(v) for b, v in real_rows.items())
    assert filled > 0.9
    assert it.state() == {"epoch": 1, "cursor": 0, "plan": it.plan_key()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_sentence_exactly_once_per_epoch(kind):
    it = _make(kind, n=503)
    epochs = []
    for epoch in range(2):
        ids = []
        for _ in range(it.epoch_batches()):
            tokens = next(it)[_key(kind)]
            ids += _ids(tokens[_real(tokens)])
        assert sorted(ids) == list(range(503))
        assert it.state() == {"epoch": epoch + 1, "cursor": 0, "plan": it.plan_key()}
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # each epoch its own order


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_state_mid_epoch(kind):
    it = _make(kind)
    for _ in range(9):
        next(it)
    state, n = it.state(), it.epoch_batches()
    later = []
    for _ in range(n):  # crosses into the next epoch
        later.append((it.next_rows(), next(it)))
    assert it.epoch == 1
    fresh = _make(kind)
    fresh.restore(state)
    for rows, b in later:
        assert fresh.next_rows() == rows
        a = next(fresh)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_from_other_batch_settings_is_refused(kind):
    """The cursor of another cut would index other batches: refused, not silently followed."""
    state = _make(kind).state()
    assert state["plan"] == {
        "batch_size": 8,
        "buckets": list(BUCKETS),
        "tokens_per_batch": BUDGET,
        "row_multiple": 2,
    }
    for other in ({"tokens_per_batch": 512}, {"row_multiple": 4}, {"buckets": BUCKETS[1:]}):
        with pytest.raises(ValueError, match="the checkpoint's batches were cut as"):
            _make(kind, **other).restore(state)
    fixed = _make(kind, tokens_per_batch=-1)
    with pytest.raises(ValueError, match="this run's as"):
        fixed.restore(state)
    with pytest.raises(ValueError, match="the checkpoint's batches were cut as"):
        _make(kind).restore(fixed.state())  # a budget where there was none, too
    old = {"epoch": 0, "cursor": 3}  # saved before plans were recorded: fixed batches
    if kind == "tlm":  # were PairBatches'
        with pytest.raises(ValueError, match="cut as fixed batches"):
            fixed.restore(old)
        src, tgt = _sides(kind, 50)
        pairs = batches.PairBatches(
            src, tgt, src_lang=0, tgt_lang=2, batch_size=8, length=64, seed=1, name="tlm"
        )
        with pytest.raises(ValueError, match="this run's as fixed batches"):
            pairs.restore(state)
    else:
        fixed.restore(old)
        assert fixed.state() == old


@pytest.mark.parametrize("budget", [BUDGET, -1])
@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_read_their_rows_and_make_the_whole_batch(kind, budget):
    """``rows_of`` gives each process half of every batch (fixed-size batches too): together
    they are the single process's batches, and each reads only the sentences of its rows."""

    def make(p: int | None):
        rows_of = None if p is None else (lambda n: (p * n // 2, (p + 1) * n // 2))
        sides = tuple(Counted(s) for s in _sides(kind, 300))
        return _make(kind, sides=sides, tokens_per_batch=budget, rows_of=rows_of), sides

    (whole, _), procs = make(None), [make(0), make(1)]
    for it, _ in procs:
        it.restore({"epoch": 0, "cursor": 30, "plan": it.plan_key()})
    whole.restore({"epoch": 0, "cursor": 30, "plan": whole.plan_key()})
    for _ in range(whole.epoch_batches() - 20):  # crosses into epoch 1
        rows = whole.next_rows()
        assert all(it.next_rows() == rows for it, _ in procs)
        g = next(whole)
        parts = []
        for it, (src, tgt) in procs:
            src.read.clear(), tgt.read.clear()
            parts.append(next(it))
            tokens = parts[-1][_key(kind)]
            ids = sorted(_ids(tokens[_real(tokens)]))
            assert sorted(src.read) == ids  # its rows' sentences, each once, nothing else
            assert sorted(tgt.read) == (ids if kind != "ae" else [])
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
    assert whole.epoch == 1 and all(it.state() == whole.state() for it, _ in procs)


def test_a_too_small_budget_is_refused_early():
    with pytest.raises(ValueError, match=r"tokens_per_batch=127 gives 1 rows .* at least 128"):
        _make("ae", tokens_per_batch=127)  # 2 rows (one per shard) of 64 tokens need 128
    with pytest.raises(ValueError, match="use rows_of"):
        _make("ae", rows=(0, 4))
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


# --- pretraining's TLM pairs (tlm_buckets, tlm_tokens_per_batch) --------------------------------


def test_tlm_rows_are_pack_pair_rows_padded_to_their_bucket():
    """Without a budget: ``batch_size`` rows, each ``batches.pack_pair``'s row of its pair
    (positions restart, each side its language), padded to the batch's bucket; the pairs kept
    are ``PairBatches``' at the longest bucket."""
    src, tgt = _sides("mt", 300)  # up to 60 tokens a side: some pairs do not fit in 64
    it = _make("tlm", sides=(src, tgt), tokens_per_batch=-1)
    kw = {"src_lang": 0, "tgt_lang": 2, "batch_size": 8, "seed": 1, "name": "tlm"}
    plain = batches.PairBatches(src, tgt, length=64, **kw)
    np.testing.assert_array_equal(it.keep, plain.keep)
    assert (it.n_dropped, it.tokens) == (plain.n_dropped, plain.tokens) and it.n_dropped > 0
    lengths = set()
    for _ in range(it.epoch_batches()):
        assert it.next_rows() == 8
        b = next(it)
        rows, length = b["tokens"].shape
        assert rows == 8 and _real(b["tokens"]).all()  # no all-PAD rows without a budget
        assert length == bucket_length(int(_lengths(b["tokens"]).max()) + 2, BUCKETS)
        for r, i in enumerate(_ids(b["tokens"])):
            want = batches.pack_pair(src[i], tgt[i], 0, 2, length)
            for k, row in zip(("tokens", "positions", "langs"), want, strict=True):
                np.testing.assert_array_equal(b[k][r], row)
        lengths.add(length)
    assert len(lengths) > 1  # pools sorted by length: short pairs come in short rows


def test_all_pad_rows_add_no_loss_and_no_tokens():
    it = _make("tlm")
    b = next(it)
    while _real(b["tokens"]).all():  # a batch completed with all-PAD rows
        b = next(it)
    real = _real(b["tokens"])
    mask = jax.jit(functools.partial(objectives.mask_tokens, vocab_size=1000, word_pred=0.5))
    out = mask({k: jnp.asarray(v) for k, v in b.items()}, jax.random.key(0))
    weights = np.asarray(out["weights"])
    assert weights[~real].sum() == 0 and weights[real].sum() > 0
    assert loop.count_tokens(b, len(real), PAD_ID) == (b["tokens"][real] != PAD_ID).sum()


def test_bad_tlm_settings_are_refused_before_anything_is_read(tmp_path):
    cases = [  # tiny_config: tlm_length=48
        ({"tlm_buckets": "24,x"}, r"tlm_buckets='24,x': expected row lengths"),
        ({"tlm_buckets": "24,64"}, r"tlm_buckets='24,64': \[64\] outside 6\.\.tlm_length=48"),
        ({"tlm_buckets": "4"}, r"tlm_buckets='4': \[4\] outside"),
        ({"tlm_tokens_per_batch": 0}, r"tlm_tokens_per_batch=0: -1 \(off\)"),
        ({"tlm_pack": True, "tlm_buckets": "24"}, r"tlm_pack=True with tlm_buckets='24'"),
        ({"tlm_pack": True, "tlm_tokens_per_batch": 480}, "packing already removes the padding"),
        (
            {"tlm_tokens_per_batch": 40},
            r"tlm_tokens_per_batch=40 gives 0 rows of the longest bucket \(48 tokens\), fewer "
            r"than the 1-way batch split: it needs at least 48 \(or a shorter tlm_length\)",
        ),
        ({"tlm_tokens_per_batch": 48, "accum_steps": 2}, "2-way batch split: it needs at least 96"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            pretrain.check(tiny_config(**overrides))
    with pytest.raises(ValueError, match=r"tlm_buckets='24,64'"):  # the loop's first check
        pretrain.train_and_evaluate(tiny_config(tlm_buckets="24,64"), tmp_path)
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "checkpoints").exists()
    config = tiny_config(tlm_buckets="24", tlm_tokens_per_batch=96)
    pretrain.check(config)
    with pytest.raises(ValueError, match="4-way batch split: it needs at least 192"):
        pretrain.check_tlm_rows(config, 4)  # setup's check: data shards x accum_steps
    assert "tlm_batch_size" not in pretrain.batch_sizes(config)  # the budget sets the rows
    assert "tlm_batch_size" in pretrain.batch_sizes(tiny_config(tlm_buckets="24"))


def test_aot_refuses_a_tlm_budget():
    """``python -m xlm_jax.aot`` compiles TLM at ``tlm_batch_size`` rows: a budget's rows per
    bucket are refused with the flags that compile its longest bucket (nothing built here)."""
    from xlm_jax.core import parallel
    from xlm_jax.tools import programs

    mesh, rules = parallel.make_mesh((-1, 1, 1)), parallel.rules_from_config(None)
    rows = budget_rows(480, 48, parallel.data_parallel_size(mesh, rules))
    with pytest.raises(ValueError, match=rf"--config.tlm_batch_size={rows}$"):
        programs.for_mode("pretrain", tiny_config(tlm_tokens_per_batch=480), mesh, rules)


def test_tlm_token_budget_pretraining_runs(tmp_path, caplog):
    """TLM alone (as test_packing's packed run, without evaluation) with buckets 24,48 and a
    budget of 288 tokens: 12 rows at 24, 6 at 48 (not tlm_batch_size's 4: the loop takes the
    iterator's rows); each shape served compiles the TLM step once."""
    caplog.set_level("INFO")
    budget = {"tlm_buckets": "24", "tlm_tokens_per_batch": 288, "mlm_steps": "en-fr"}
    config = tiny_config(max_steps=4, eval_every=0, evals="", best_metric="", **budget)
    pretrain.train_and_evaluate(config, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    losses = [r["train/tlm_en-fr/loss"] for r in records if "train/tlm_en-fr/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    messages = [r.getMessage() for r in caplog.records]
    seen = [re.search(r"batch of (\d+) rows at bucket (\d+) \(first seen\)", m) for m in messages]
    shapes = {(int(m[1]), int(m[2])) for m in seen if m}
    assert shapes and shapes <= {(12, 24), (6, 48)}
    assert f"compiled programs: {len(shapes)}" in messages
