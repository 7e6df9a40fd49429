"""What a checkpoint's arrays held when they were saved: a fingerprint of each array's values and
whether every floating-point value was finite.

Orbax checks a CRC of each zarr shard's index only, not of the array data, so a flipped bit in an
array file restores without a word. A checkpoint therefore carries this record, and a restore
recomputes it from the arrays it read and compares.

The fingerprint is computed on the devices, inside one jitted program over the sharded arrays:
each 32-bit word (a float's bits, not its value) is mixed with its flat index and the mixed words
are summed modulo 2**32. Integer addition is associative, so the result is the same whatever the
mesh, the sharding or the order of the reduction: a state saved from 8 devices verifies when read
onto 1. Mixing is a bijection of the word for a fixed index, so any single changed word (one
flipped bit) changes the sum; several changes cancel with probability about 2**-32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FORMAT = 1  # of the record: bump when the fingerprint changes


class IntegrityError(RuntimeError):
    """A restored checkpoint is not what was saved (or was saved non-finite)."""


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element; 64-bit elements give two)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits == 32:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if bits < 32:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: a trailing axis of 2 words


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index (mod 2**32), built per axis so it shards like the array."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _fingerprint(x: jax.Array, staged: bool) -> jax.Array:
    words = _words(x)
    v = _mix(words ^ _mix(_flat_index(words.shape) + 1))
    # ``staged`` (on CPU): the sum in stages of 8 along the last axis, each its own fusion (the
    # barrier), because XLA:CPU runs one fused integer reduction of a whole array ~9x slower. Not
    # on TPU: compiled for v5e, the stages of a (204800, 1280) row-sharded array took a 250 MiB
    # temporary (its whole shard), the plain sum none. The value is the same either way.
    while staged and v.ndim and v.shape[-1] % 8 == 0 and v.shape[-1] > 8:
        v = jnp.sum(v.reshape(*v.shape[:-1], -1, 8), axis=-1, dtype=jnp.uint32)
        v = lax.optimization_barrier(v)
    return jnp.sum(v, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.max(jnp.abs(x)) < jnp.inf  # a NaN makes the max NaN (~2x faster than all())
    return jnp.ones((), jnp.bool_)


@functools.partial(jax.jit, static_argnames="staged")
def _summaries(tree: Any, staged: bool) -> Any:
    return jax.tree.map(lambda x: (_fingerprint(x, staged), _finite(x)), tree)


def _platform(tree: Any) -> str:
    arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    return next(iter(arrays[0].devices())).platform if arrays else jax.default_backend()


@dataclasses.dataclass(frozen=True)
class Record:
    """Per array (keyed by its path in the state), the fingerprint and whether it was finite."""

    fingerprints: dict[str, str]
    nonfinite: list[str]

    @property
    def finite(self) -> bool:
        return not self.nonfinite

    def to_json(self, healthy: bool) -> dict[str, Any]:
        """``healthy``: the saver's word that no update was being skipped as non-finite."""
        return {
            "format": FORMAT,
            "finite": self.finite,
            "healthy": healthy,
            "nonfinite": self.nonfinite,
            "fingerprints": self.fingerprints,
        }


def record(state: Any) -> Record:
    """The record of ``state`` (a pytree of arrays, possibly sharded over several processes:
    every process must call this, as it calls a save)."""
    summaries = _summaries(state, staged=_platform(state) == "cpu")
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(summaries))[0]
    fingerprints: dict[str, str] = {}
    nonfinite: list[str] = []
    for i in range(0, len(leaves), 2):  # each array gave (fingerprint, finite)
        # 'params/layer_0/...': the same whether read back as the state or as nested dicts
        path = jax.tree_util.keystr(leaves[i][0][:-1], simple=True, separator="/")
        fingerprints[path] = f"{int(np.asarray(leaves[i][1])):08x}"
        if not bool(leaves[i + 1][1]):
            nonfinite.append(path)
    return Record(fingerprints, nonfinite)


def verify(state: Any, saved: dict[str, Any], step: int) -> None:
    """Raises ``IntegrityError`` if the restored ``state`` differs from the ``saved`` record, or
    if it was saved with non-finite values (restoring it would only skip every update)."""
    if saved.get("format") != FORMAT:
        raise IntegrityError(f"checkpoint {step}: integrity record of format {saved.get('format')}")
    if not saved["finite"]:
        raise IntegrityError(
            f"checkpoint {step} was saved with non-finite values in {saved['nonfinite'][:5]}"
        )
    now = record(state).fingerprints
    differ = [p for p in saved["fingerprints"] if now.get(p) != saved["fingerprints"][p]]
    if differ or now.keys() != saved["fingerprints"].keys():
        raise IntegrityError(
            f"checkpoint {step}: the checksums of {len(differ)} arrays do not match what was "
            f"saved ({differ[:5]}): its files changed after it was written"
        )
