"""Packed TLM rows: segment-aware attention, the packing iterator, and a packed pretraining run."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from xlm_jax.core.metrics import read_jsonl
from xlm_jax.data import batches
from xlm_jax.model import layers, objectives
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.tasks import pretrain
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

CONFIG = ModelConfig(
    vocab_size=40,
    n_langs=2,
    emb_dim=16,
    n_layers=2,
    n_heads=4,
    max_positions=32,
    pad_id=PAD_ID,
    attention_dropout=0.0,
)


class Counted(Sequence):
    """A side whose reads are recorded (which pairs a process reads); its lengths come without
    reading, as a prepared side's (``data/prepared.Sentences``)."""

    def __init__(self, items: list[np.ndarray]) -> None:
        self.items, self.read = items, []

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.items], np.int64)

    def __getitem__(self, i):  # type: ignore[override]
        self.read.append(i)
        return self.items[i]


def _pairs(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    src = [rng.integers(6, 40, rng.integers(1, 9)) for _ in range(n)]
    tgt = [rng.integers(6, 40, rng.integers(1, 9)) for _ in range(n)]
    return src, tgt


def _packed(src, tgt, **kw) -> batches.PackedPairBatches:
    args = {"src_lang": 0, "tgt_lang": 1, "batch_size": 4, "length": 24, "seed": 3, "name": "tlm"}
    return batches.PackedPairBatches(src, tgt, **(args | kw))


# --- the encoder ---------------------------------------------------------------------------------


def _encode(config: ModelConfig, params, rows, segments=None) -> np.ndarray:
    tokens, positions, langs = (jnp.asarray(np.stack(x)) for x in zip(*rows, strict=True))
    out = XLMEncoder(config).apply(
        {"params": params},
        tokens,
        positions,
        langs,
        segments=None if segments is None else jnp.asarray(np.stack(segments)),
        method=XLMEncoder.encode,
    )
    return np.asarray(out)


@pytest.mark.parametrize("impl", ["explicit", "xla"])
def test_a_packed_row_encodes_each_pair_as_alone(impl):
    config = ModelConfig(**(CONFIG.to_dict() | {"attention_impl": impl}))
    src, tgt = _pairs(3, seed=1)
    length = sum(len(s) + len(t) + 4 for s, t in zip(src, tgt, strict=True)) + 3  # + padding
    packed = batches.pack_pairs(list(zip(src, tgt, strict=True)), 0, 1, length)
    alone = [batches.pack_pair(s, t, 0, 1, length) for s, t in zip(src, tgt, strict=True)]
    params = XLMEncoder(config).init(jax.random.key(0), *(jnp.asarray(x[None]) for x in alone[0]))
    got = _encode(config, params["params"], [packed[:3]], [packed[3]])[0]
    want = _encode(config, params["params"], alone)
    start = 0
    for k, (s, t) in enumerate(zip(src, tgt, strict=True)):
        n = len(s) + len(t) + 4
        assert (packed[3][start : start + n] == k + 1).all()
        np.testing.assert_allclose(got[start : start + n], want[k, :n], rtol=0, atol=1e-5)
        start += n
    assert (got[start:] == 0).all()  # padding stays exactly zero


def test_without_segments_the_encoder_is_unchanged():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 40, (3, 10)).astype(np.int32)
    tokens[1, 6:] = PAD_ID
    tokens[2, :] = PAD_ID  # an all-pad row
    positions = np.broadcast_to(np.arange(10, dtype=np.int32), tokens.shape)
    langs = rng.integers(0, 2, tokens.shape).astype(np.int32)
    args = tuple(jnp.asarray(x) for x in (tokens, positions, langs))
    model = XLMEncoder(CONFIG)
    variables = model.init(jax.random.key(1), *args)

    def old_encode(module: XLMEncoder, tokens, positions, langs):
        # the encoder's forward pass as it was before segments
        x, valid = module.embed(tokens, positions, langs, deterministic=True)
        mask = valid[:, None, :]
        for layer in module.layers:
            x = layer(x, mask, valid, True)
        return x

    old = model.apply(variables, *args, method=old_encode)
    np.testing.assert_array_equal(model.apply(variables, *args, method=XLMEncoder.encode), old)
    np.testing.assert_array_equal(
        model.apply(variables, *args, segments=None, method=XLMEncoder.encode), old
    )
    # one segment per row is the unpacked row
    one = jnp.asarray((tokens != PAD_ID).astype(np.int32))
    np.testing.assert_array_equal(
        model.apply(variables, *args, segments=one, method=XLMEncoder.encode), old
    )


def test_segment_mask_keeps_padding_queries_unmasked():
    segments = jnp.asarray([[1, 1, 2, 0]])
    mask = layers.make_attention_mask(segments > 0, segments=segments)
    np.testing.assert_array_equal(
        mask[0],
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0]],
    )


def test_masking_never_predicts_a_pairs_first_token():
    src, tgt = _pairs(40, seed=2)
    it = _packed(src, tgt, batch_size=8, length=32)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    seen = np.zeros(batch["tokens"].shape, bool)
    for i in range(20):
        out = objectives.mask_tokens(batch, jax.random.key(i), vocab_size=40, word_pred=0.5)
        rows = np.arange(len(seen))[:, None]
        active = np.asarray(out["weights"]) > 0
        seen[np.broadcast_to(rows, active.shape)[active], np.asarray(out["pred_index"])[active]] = 1
    segments = np.asarray(batch["segments"])
    starts = segments != np.pad(segments, ((0, 0), (1, 0)))[:, :-1]
    assert not (seen & starts).any() and not (seen & (segments == 0)).any()
    assert seen.any()


# --- the iterator --------------------------------------------------------------------------------


def test_packed_rows_by_hand():
    src = [np.array([10, 11]), np.array([12]), np.array([13, 14, 15]), np.array([], int)]
    tgt = [np.array([20]), np.array([21, 22, 23]), np.array([24, 25]), np.array([26])]
    src.append(np.arange(6, 20))  # too long for 16
    tgt.append(np.array([27]))
    it = _packed(src, tgt, batch_size=2, length=16, shuffle=False)
    assert (len(it), it.n_dropped, it.tokens, it.epoch_rows()) == (3, 2, 7 + 8 + 9, 2)
    b = next(it)
    assert set(b) == {"tokens", "positions", "langs", "segments"}
    e, p = EOS_ID, PAD_ID
    row0 = [e, 10, 11, e, e, 20, e, e, 12, e, e, 21, 22, 23, e, p]
    np.testing.assert_array_equal(b["tokens"][0], row0)
    np.testing.assert_array_equal(
        b["positions"][0], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 0]
    )
    np.testing.assert_array_equal(b["langs"][0], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["segments"][0], [1] * 7 + [2] * 8 + [0])
    np.testing.assert_array_equal(b["tokens"][1], [e, 13, 14, 15, e, e, 24, 25, e] + [p] * 7)
    np.testing.assert_array_equal(b["segments"][1], [1] * 9 + [0] * 7)
    assert it.state() == {"epoch": 1, "cursor": 0}
    for x in b.values():
        assert x.dtype == np.int32


def test_each_epoch_packs_every_pair_once():
    src, tgt = _pairs(101, seed=4)
    src[5] = np.array([], int)
    side = Counted(src)
    it = _packed(side, tgt, batch_size=1)
    kept = sorted(set(range(101)) - {5})
    orders = []
    for epoch in range(3):
        side.read.clear()
        rows = [next(it) for _ in range(it.epoch_rows())]
        assert sorted(side.read) == kept and it.state() == {"epoch": epoch + 1, "cursor": 0}
        assert len(rows) < len(kept)
        for b in rows:
            assert b["tokens"].shape == (1, 24)
            np.testing.assert_array_equal(b["segments"] > 0, b["tokens"] != PAD_ID)
            assert b["segments"].max() * 6 <= 24  # a pair takes at least 6 tokens
        orders.append(side.read.copy())
    assert orders[0] != orders[1] != orders[2]  # each epoch its own order (and packing)


def test_packed_resume_gives_the_same_batches():
    src, tgt = _pairs(50, seed=5)
    it = _packed(src, tgt)
    for _ in range(7):  # across an epoch boundary
        next(it)
    state = it.state()
    later = [next(it) for _ in range(12)]
    again = _packed(src, tgt)
    next(again)  # a cached plan of another epoch must not survive restore
    again.restore(state)
    for want in later:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_a_process_reads_only_the_pairs_of_its_rows():
    src, tgt = _pairs(60, seed=6)
    full_src, part_src, part_tgt = Counted(src), Counted(src), Counted(tgt)
    full = _packed(full_src, tgt)
    part = _packed(part_src, part_tgt, rows=(1, 3))
    assert not full_src.read and not part_src.read  # the plan needs only the lengths
    for _ in range(5):
        full_src.read.clear()
        want, got = next(full), next(part)
        assert got["tokens"].shape == (2, 24)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k][1:3])
        n = want["segments"].max(axis=1)  # pairs per row
        mine = full_src.read[n[0] : n[0] + n[1] + n[2]]
        assert part_src.read == mine == part_tgt.read
        part_src.read.clear()
        part_tgt.read.clear()


def test_padding_share():
    src, tgt = _pairs(200, seed=7)
    plain = batches.PairBatches(
        src, tgt, src_lang=0, tgt_lang=1, batch_size=1, length=24, seed=0, name="tlm"
    )
    packed = _packed(src, tgt, batch_size=1)
    share = batches.padding_share(plain, len(plain))
    assert share == pytest.approx(1 - plain.tokens / (len(plain) * 24))
    rows = packed.epoch_rows()
    assert batches.padding_share(packed, rows) == pytest.approx(1 - packed.tokens / (rows * 24))
    assert math.ceil(packed.tokens / 24) <= rows < len(plain)


# --- pretraining ---------------------------------------------------------------------------------


def test_packed_pretraining_runs(tmp_path, caplog):
    caplog.set_level("INFO")
    config = tiny_config(max_steps=4, eval_every=4, checkpoint_every=4, tlm_pack=True)
    config.best_metric = "valid/tlm_ppl"
    config.mlm_steps = "en-fr"
    pretrain.train_and_evaluate(config, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    tlm = [r["train/tlm_en-fr/loss"] for r in records if "train/tlm_en-fr/loss" in r]
    assert tlm and all(np.isfinite(tlm))
    valid = [r["valid/tlm_en-fr/loss"] for r in records if "valid/tlm_en-fr/loss" in r]
    assert valid and all(np.isfinite(valid))
    # train: packed TLM; eval: (unpacked) TLM
    lines = [r.getMessage() for r in caplog.records if "compiled programs" in r.getMessage()]
    assert lines == ["compiled programs: 2"]
