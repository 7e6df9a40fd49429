"""Tests for xlm_jax.checkpoint: round trip, latest/best, retention, resharding, crash leftovers."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from xlm_jax.core.checkpoint import Checkpointer, parse_tracked

DATA_STATE = {"mlm_en": {"epoch": 1, "cursor": 1234}, "tlm_en-fr": {"epoch": 0, "cursor": 7}}
META = {"config": {"model": {"dim": 8}, "langs": ["en", "fr"]}, "tokenizer": "c3BtIG1vZGVs"}


def make_state(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w": jax.random.normal(k1, (8, 4), jnp.float32),
        "emb": jax.random.normal(k2, (16, 4), jnp.bfloat16),
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # One update so the moments are non-trivial bit patterns.
    updates, opt_state = tx.update(params, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32)}


def abstract(state, sharding_fn=lambda x: x.sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state
    )


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        # Bitwise: compare the raw bytes (also covers bfloat16 and -0.0 / NaN payloads).
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_round_trip_and_meta(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        data_state = {**DATA_STATE, "np_int": np.int64(5), "pair": (1, 2)}
        assert ckpt.save(10, state, data_state=data_state, meta=META)
        ckpt.wait()
        restored, ds, meta = ckpt.restore(abstract_state=abstract(state))
    assert_trees_equal(restored, state)
    # numpy ints and tuples come back as JSON would give them.
    assert ds == {**DATA_STATE, "np_int": 5, "pair": [1, 2]}
    assert meta == META
    # A fresh Checkpointer (a resumed run) reads the meta alone, before building any state.
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.restore_meta() == META
        assert ckpt.best_step() is None  # no best_metric configured


def test_latest_and_skip_older(tmp_path):
    states = {s: make_state(s) for s in (1, 2, 3)}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for s, st in states.items():
            assert ckpt.save(s, st, data_state={"cursor": s}, meta=META)
        assert not ckpt.save(2, states[2], data_state={}, meta=META)  # older than latest
        assert ckpt.latest_step() == 3
        restored, ds, _ = ckpt.restore(abstract_state=abstract(states[3]))
        assert_trees_equal(restored, states[3])
        assert ds == {"cursor": 3}
        restored, ds, _ = ckpt.restore(2, abstract_state=abstract(states[2]))
        assert_trees_equal(restored, states[2])
        assert ds == {"cursor": 2}


def test_retention_keeps_last_n_plus_best(tmp_path):
    state = make_state()
    valid = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0, 6: 1.5}  # step 2 is best (min)
    with Checkpointer(tmp_path, keep_last=2, best_metric="valid/loss") as ckpt:
        for step, loss in valid.items():
            metrics = {"valid/loss": loss, "train/loss": np.float32(9.0)}
            ckpt.save(step, state, data_state={}, meta=META, metrics=metrics)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.best_step() == 2
    on_disk = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert on_disk == [2, 5, 6]
    # The ranking is read back from disk: a restarted run still protects step 2, and saves
    # without metrics or without the best metric (or NaN) are kept by recency only.
    with Checkpointer(tmp_path, keep_last=2, best_metric="valid/loss") as ckpt:
        assert ckpt.best_step() == 2
        ckpt.save(7, state, data_state={}, meta=META)
        ckpt.save(8, state, data_state={}, meta=META, metrics={"train/loss": 1.0})
        ckpt.save(9, state, data_state={}, meta=META, metrics={"valid/loss": float("nan")})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 8, 9]
        assert ckpt.best_step() == 2
        ckpt.save(10, state, data_state={}, meta=META, metrics={"valid/loss": 0.5})
        ckpt.save(11, state, data_state={}, meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [10, 11]
        assert ckpt.best_step() == 10


def test_best_mode_max(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, keep_last=1, best_metric="acc", best_mode="max") as ckpt:
        for step, acc in {1: 10.0, 2: 90.0, 3: 50.0, 4: 20.0}.items():
            ckpt.save(step, state, data_state={}, meta=META, metrics={"acc": acc})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.best_step() == 2


def test_each_tracked_metric_keeps_its_best(tmp_path):
    """XLM's --validation_metrics: a best checkpoint per metric, each with its own direction."""
    state = make_state()
    acc = {1: 10.0, 2: 30.0, 3: 20.0, 4: 5.0, 5: 6.0, 6: 7.0}  # best (max): step 2
    ppl = {1: 3.0, 2: 2.0, 3: 1.0, 4: 9.0, 5: 8.0, 6: 9.0}  # best (min): step 3
    spec = "acc:max, ppl"
    with Checkpointer(tmp_path, keep_last=1, best_metric=spec, best_mode="min") as ckpt:
        for step in acc:
            metrics = {"acc": acc[step], "ppl": ppl[step]}
            ckpt.save(step, state, data_state={}, meta=META, metrics=metrics)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3, 6]
        assert (ckpt.best_step(), ckpt.best_step("acc"), ckpt.best_step("ppl")) == (2, 2, 3)
    with Checkpointer(tmp_path, keep_last=1, best_metric=spec, best_mode="min") as ckpt:
        ckpt.save(7, state, data_state={}, meta=META, metrics={"ppl": 0.5})  # no acc: ranked by ppl
        ckpt.save(8, state, data_state={}, meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 7, 8]
        assert (ckpt.best_step(), ckpt.best_step("ppl")) == (2, 7)
        with pytest.raises(KeyError, match="not tracked"):
            ckpt.best_step("bleu")


def test_parse_tracked():
    assert parse_tracked("a:max, b,c:min", "min") == [("a", "max"), ("b", "min"), ("c", "min")]
    assert parse_tracked("", "max") == []
    with pytest.raises(ValueError, match="twice"):
        parse_tracked("a,a:max", "min")
    with pytest.raises(ValueError, match="best_mode"):
        parse_tracked("a", "up")


def test_restore_onto_other_sharding(tmp_path):
    state = make_state()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, data_state={}, meta=META)
        target = SingleDeviceSharding(jax.devices()[-1])
        restored, _, _ = ckpt.restore(abstract_state=abstract(state, lambda _: target))
    assert_trees_equal(restored, state)
    assert all(x.sharding == target for x in jax.tree.leaves(restored))


# Restoring onto other meshes (8 devices -> (2,2,2) and -> 1 device) is tested end to end in
# tests/test_parallel.py, in processes that have the devices.


def test_a_reader_leaves_a_running_writers_saves_alone(tmp_path):
    """NMT/XNLI read a pretraining run's checkpoints, maybe while it still trains: the reader
    must not remove its saves in flight (orbax's tmp clean-up) nor write anything."""
    state = make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_state={"cursor": 1}, meta=META)
    in_flight = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", in_flight)
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.all_steps() == [1]
        restored, ds, _ = reader.restore(abstract_state=abstract(state))
        assert_trees_equal(restored, state)
        with pytest.raises(PermissionError, match="opened read-only"):
            reader.save(3, state, data_state={}, meta=META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", in_flight.name]
    assert not (tmp_path / "missing").exists()
    with Checkpointer(tmp_path / "missing", read_only=True) as reader:
        assert reader.latest_step() is None
    assert not (tmp_path / "missing").exists()


def test_interrupted_save_is_ignored(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_state={"cursor": 1}, meta=META)
    # What a crash mid-save of step 2 leaves: orbax's tmp dir, never renamed, incomplete.
    tmp = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", tmp)
    (tmp / "commit_success.txt").unlink(missing_ok=True)
    shutil.rmtree(tmp / "state")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        restored, ds, _ = ckpt.restore(abstract_state=abstract(state))
        assert_trees_equal(restored, state)
        assert ds == {"cursor": 1}
        # The resumed run can write step 2 again; the leftover is cleaned up.
        assert ckpt.save(2, state, data_state={"cursor": 2}, meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    assert not tmp.exists()
