"""Checkpoint integrity: fingerprints verified on restore, finite flags, known-good retention and
retries of transient read errors (``core/integrity.py``, ``core/checkpoint.py``)."""

import errno
import importlib.util
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xlm_jax.core import integrity
from xlm_jax.core.checkpoint import Checkpointer, abstract_of
from xlm_jax.core.integrity import IntegrityError


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)},
        "mu": jnp.asarray(rng.normal(size=(256,)), jnp.bfloat16),
        "step": jnp.int32(seed),
    }


def _save(directory, steps, healthy=(), **kw) -> Checkpointer:
    ckpt = Checkpointer(directory, async_save=False, retry_delays=(0.0,), **kw)
    for step in steps:
        ckpt.save(step, _state(step), data_state={}, meta={}, healthy=step not in healthy)
    return ckpt


def test_a_fingerprint_is_the_same_on_any_mesh_and_sees_one_bit():
    state = _state()
    mesh = jax.make_mesh((len(jax.devices()),), ("d",), (jax.sharding.AxisType.Auto,))
    sharded = dict(
        state,
        params={"w": jax.device_put(state["params"]["w"], NamedSharding(mesh, PartitionSpec("d")))},
    )
    assert integrity.record(sharded) == integrity.record(state)
    w = np.array(state["params"]["w"])
    for index in [(0, 0), (31, 7), (63, 63)]:
        for bit in (0, 17, 31):
            flipped = w.copy()
            flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
            got = integrity.record(dict(state, params={"w": jnp.asarray(flipped)}))
            assert got.fingerprints["params/w"] != integrity.record(state).fingerprints["params/w"]
            assert got.fingerprints["mu"] == integrity.record(state).fingerprints["mu"]


def test_swapped_values_change_the_fingerprint():
    w = np.arange(16, dtype=np.float32)
    assert integrity.record(w[::-1].copy()) != integrity.record(w)


def test_nonfinite_values_are_named():
    state = _state()
    state["params"]["w"] = state["params"]["w"].at[3, 3].set(jnp.inf)
    assert integrity.record(state).nonfinite == ["params/w"]
    assert integrity.record(_state()).finite


def _largest_array_file(ckpt: Checkpointer, step: int):
    files = [f for f in Path(ckpt.directory, str(step), "state").rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("where", [0.1, 0.37, 0.5, 0.83])
def test_a_flipped_bit_in_array_data_falls_back_to_the_previous_checkpoint(tmp_path, caplog, where):
    ckpt = _save(tmp_path / "c", [1, 2])
    f = _largest_array_file(ckpt, 2)
    data = bytearray(f.read_bytes())
    data[int(len(data) * where)] ^= 0x10  # one bit, inside the array's values
    f.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    step, state, _, _ = ckpt.restore_newest_readable(abstract_of(_state()))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    warning = next(r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage())
    assert "checkpoint 2 in" in warning and "falling back to checkpoint 1" in warning
    # only the fingerprints see it: orbax checks the CRC of a shard's index, not of its data
    assert "IntegrityError" in warning and "checksums of 1 arrays" in warning
    aside = tmp_path / "c_unreadable" / "2"
    assert "checkpoint 2" in (aside / "SET_ASIDE.txt").read_text()
    assert ckpt.all_steps() == [1]


def test_a_checkpoint_saved_with_nonfinite_values_is_not_restored(tmp_path, caplog):
    ckpt = _save(tmp_path / "c", [1])
    bad = _state(2)
    bad["mu"] = bad["mu"].at[0].set(jnp.nan)
    ckpt.save(2, bad, data_state={}, meta={})
    assert not ckpt.is_good(2) and ckpt.is_good(1)
    with pytest.raises(IntegrityError, match="saved with non-finite values in \\['mu'\\]"):
        ckpt.restore(2, abstract_state=abstract_of(bad))
    caplog.set_level(logging.WARNING)
    assert ckpt.restore_newest_readable(abstract_of(bad))[0] == 1


def test_retention_never_drops_the_newest_good_checkpoint(tmp_path):
    ckpt = _save(tmp_path / "c", [1, 2, 3, 4, 5], healthy={3, 4, 5}, keep_last=2)
    assert ckpt.all_steps() == [2, 4, 5]  # 2: the newest good one
    ckpt.save(6, _state(6), data_state={}, meta={})  # good again: 2 may go
    assert ckpt.all_steps() == [5, 6]
    reopened = Checkpointer(tmp_path / "c", keep_last=2, async_save=False)
    reopened.save(7, _state(7), data_state={}, meta={}, healthy=False)
    reopened.save(8, _state(8), data_state={}, meta={}, healthy=False)
    assert reopened.all_steps() == [6, 7, 8]  # goodness read back from the records on disk
    assert reopened.newest_good() == 6


def test_a_transient_read_error_is_retried_not_set_aside(tmp_path, monkeypatch, caplog):
    ckpt = _save(tmp_path / "c", [1, 2])
    real, calls = ckpt._manager.restore, []

    def flaky(step, *a, **kw):
        calls.append(step)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(step, *a, **kw)

    monkeypatch.setattr(ckpt._manager, "restore", flaky)
    caplog.set_level(logging.WARNING)
    assert ckpt.restore_newest_readable(abstract_of(_state()))[0] == 2
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "c_unreadable").exists()
    assert any("trying again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "error, reads",
    [
        ("UNAVAILABLE: the filesystem is not answering", 2),  # the first read and one retry
        ("DATA_LOSS: Error reading chunk", 1),  # damaged files fail the same way: no retry
    ],
    ids=["transient", "damaged"],
)
def test_a_failing_read_is_set_aside_after_its_retries_if_any(tmp_path, monkeypatch, error, reads):
    ckpt = _save(tmp_path / "c", [1, 2])  # retry_delays=(0.0,): one retry
    real, calls = ckpt._manager.restore, []

    def broken(step, *a, **kw):
        calls.append(step)
        if step == 2:
            raise ValueError(error)
        return real(step, *a, **kw)

    monkeypatch.setattr(ckpt._manager, "restore", broken)
    assert ckpt.restore_newest_readable(abstract_of(_state()))[0] == 1
    assert calls.count(2) == reads


def test_the_staged_sum_on_cpu_gives_the_plain_sums_value():
    state = _state() | {"odd": jnp.arange(3 * 12, dtype=jnp.float32).reshape(3, 12)}
    staged = jax.device_get(integrity._summaries(state, staged=True))
    plain = jax.device_get(integrity._summaries(state, staged=False))
    jax.tree.map(np.testing.assert_array_equal, staged, plain)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_the_record_needs_no_temporary_memory_on_a_tpu():
    from xlm_jax.tools import aot

    mesh = jax.sharding.Mesh(np.array(aot.tpu_slice("v5e:2x2").devices).reshape(4), ("d",))
    for spec in (PartitionSpec("d", None), PartitionSpec(None, "d")):
        x = jax.ShapeDtypeStruct((4096, 1024), jnp.float32, sharding=NamedSharding(mesh, spec))
        plain = integrity._summaries.lower({"w": x}, staged=False).compile()
        shard_bytes = 4096 * 1024 * 4 // 4
        assert plain.memory_analysis().temp_size_in_bytes < shard_bytes / 64  # scratch only
