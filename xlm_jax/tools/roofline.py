"""The matrix products of a compiled program, timed alone: a floor under its run time.

A training step or a decoder is mostly matmuls; everything else (dropout, softmax, LayerNorm,
optimizer, gathers) comes on top. Timing the program's own ``dot_general`` operations one shape at
a time, with the same XLA backend, gives the time the program could not go below even if every
other operation were free, and so the best tokens/s (or sentences/s) it could reach on this
machine. ``python -m xlm_jax.bench`` reports it beside each measurement, so a target can be
checked against what the hardware allows in the same run.

The products are read from the program's jaxpr (nested jits, remat, scans and loops included;
the body of a ``while`` loop counts ``loop_trips`` times, as its trip count is only known at run
time). The traced program is the global one: on a mesh of several devices the shapes are not the
per-device ones, so the floor is only meaningful for one device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class DotProduct:
    """One ``lax.dot_general`` as the program calls it."""

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    dtype: str
    dimension_numbers: tuple  # ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
    preferred_element_type: str | None

    @property
    def flops(self) -> int:
        """2 x the multiply-adds: the product of every lhs dimension and rhs's free ones."""
        (_, rhs_contract), (_, rhs_batch) = self.dimension_numbers
        rhs_free = [n for i, n in enumerate(self.rhs) if i not in (*rhs_contract, *rhs_batch)]
        return 2 * math.prod(self.lhs) * math.prod(rhs_free)


def _sub_jaxprs(eqn: Any) -> Iterator[tuple[jex_core.Jaxpr, str]]:
    """The jaxprs an equation runs: (jaxpr, the parameter's name)."""
    for name, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr, name
            elif isinstance(v, jex_core.Jaxpr):
                yield v, name


def dot_products(jaxpr: jex_core.Jaxpr, loop_trips: int = 1) -> collections.Counter:
    """{DotProduct: how many times the program runs it}.

    A ``scan`` body counts its length times, a ``while`` body ``loop_trips`` times (its
    condition is not counted); of a ``cond``'s branches, the one with the most FLOPs.
    """
    counts: collections.Counter = collections.Counter()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            pet = eqn.params.get("preferred_element_type")
            counts[
                DotProduct(
                    tuple(lhs.shape),
                    tuple(rhs.shape),
                    str(lhs.dtype),
                    eqn.params["dimension_numbers"],
                    None if pet is None else str(np.dtype(pet)),
                )
            ] += 1
        elif name == "cond":
            branches = [dot_products(j, loop_trips) for j, _ in _sub_jaxprs(eqn)]
            counts += max(branches, key=lambda c: sum(d.flops * n for d, n in c.items()))
        else:
            times = {"scan": eqn.params.get("length", 1), "while": loop_trips}.get(name, 1)
            for sub, param in _sub_jaxprs(eqn):
                if name == "while" and param == "cond_jaxpr":
                    continue
                for dot, n in dot_products(sub, loop_trips).items():
                    counts[dot] += n * times
    return counts


def program_dot_products(
    fn: Callable[..., Any], *args: Any, loop_trips: int = 1
) -> collections.Counter:
    """The dot products of ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct``s)."""
    return dot_products(jax.make_jaxpr(fn)(*args).jaxpr, loop_trips)


def median_seconds(fn: Callable[[], object], n: int, warmup: int = 2) -> float:
    """Median wall time of ``n`` calls after ``warmup`` untimed ones. Each call is waited for
    (``jax.block_until_ready`` ignores what is not a JAX array: a torch step's result)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


SAMPLE_SECONDS = 0.05  # each timing sample of a product runs at least this long
# "Cold" timing rotates each product over copies of its operands that together exceed any last
# level cache of the machines this runs on, so that its operands come from memory, as a decoding
# step's must (its weights, 150 MB at 6 x 512 with a 32k vocabulary, cannot stay in cache).
COLD_BYTES = 256 * 2**20
MAX_COPIES = 64  # a tiny product's copies stop here (its cost is dispatch, not memory)


def operand_copies(nbytes: int, cold: bool) -> int:
    """How many copies of a product's operands (``nbytes`` together) a timing rotates over."""
    return min(MAX_COPIES, max(1, math.ceil(COLD_BYTES / nbytes))) if cold else 1


def _seconds_per_call(
    f: Callable[..., Any], copies: list[tuple], min_seconds: float = SAMPLE_SECONDS
) -> float:
    """Median time of one call; calls are issued back to back (JAX dispatches asynchronously),
    enough of them per sample that dispatch overhead is spread out, each call on the next of the
    operands' ``copies``."""
    jax.block_until_ready(f(*copies[0]))  # compile
    t = time.perf_counter()
    jax.block_until_ready(f(*copies[0]))
    one = max(time.perf_counter() - t, 1e-6)
    calls = max(len(copies), math.ceil(min_seconds / one))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        out = None
        for c in range(calls):
            out = f(*copies[c % len(copies)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / calls)
    return float(np.median(samples))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """One product ready to time: its compiled function and the operands it rotates over."""

    dot: DotProduct
    calls: int  # how many times the program runs it
    fn: Callable[..., Any]
    copies: list[tuple]


def _prepare(dot: DotProduct, calls: int, key: jax.Array, cold: bool) -> _Prepared:
    dtype = jnp.dtype(dot.dtype)
    nbytes = (math.prod(dot.lhs) + math.prod(dot.rhs)) * dtype.itemsize
    copies = []
    for k in jax.random.split(key, operand_copies(nbytes, cold)):
        k1, k2 = jax.random.split(k)
        copies.append(
            (jax.random.normal(k1, dot.lhs, dtype), jax.random.normal(k2, dot.rhs, dtype))
        )
    fn = jax.jit(
        lambda a, b: lax.dot_general(
            a, b, dot.dimension_numbers, preferred_element_type=dot.preferred_element_type
        )
    )
    return _Prepared(dot, calls, fn, copies)


def _by_cost(counts: collections.Counter) -> Iterator[tuple[int, DotProduct, int]]:
    """(index, product, calls), the costliest first; the index keys its random operands."""
    ranked = sorted(counts.items(), key=lambda kv: -kv[0].flops * kv[1])
    for i, (dot, n) in enumerate(ranked):
        yield i, dot, n


def time_dot_products(
    counts: collections.Counter, sample_seconds: float = SAMPLE_SECONDS, cold: bool = False
) -> dict[str, Any]:
    """Seconds the program's products take alone, each shape timed once on random operands:
    the same operands at every call (in cache when they fit), or ``cold``, rotated over copies
    (``operand_copies``) so that they come from memory.

    Returns ``{"seconds", "flops", "products"}``: the total over all calls, its FLOPs, and one
    row per distinct product (shapes, calls, seconds per call, GFLOP/s).
    """
    rows, total_s, total_flops = [], 0.0, 0
    key = jax.random.key(0)
    for i, dot, n in _by_cost(counts):
        # one product's operands at a time: cold copies take COLD_BYTES each
        p = _prepare(dot, n, jax.random.fold_in(key, i), cold)
        s = _seconds_per_call(p.fn, p.copies, sample_seconds)
        total_s += s * n
        total_flops += dot.flops * n
        rows.append(
            {
                "lhs": list(dot.lhs),
                "rhs": list(dot.rhs),
                "dimension_numbers": repr(dot.dimension_numbers),
                "calls": n,
                "seconds_per_call": s,
                "gflops_per_s": dot.flops / s / 1e9,
            }
        )
    return {"seconds": total_s, "flops": total_flops, "products": rows}


def interleaved(
    program: Callable[[], object],
    program_calls: int,
    counts: collections.Counter,
    rounds: int,
    sample_seconds: float = SAMPLE_SECONDS,
) -> dict[str, Any]:
    """The program and its products (warm) timed in turns, ``rounds`` times: the median of
    ``program_calls`` program runs, then the products' total, timed as ``time_dot_products``
    does but compiled and given operands once for all turns.

    A machine whose speed drifts by 20-30% over minutes (shared cores, turbo) moves a ceiling
    timed minutes apart from its program by as much; within a turn both see the same machine, so
    each turn's ratio (``shares``: floor / program, the program's share of its ceiling) is free of
    drift slower than a turn. Faster noise remains, and the spread of the shares shows it (on a
    shared 2-core machine one program's turns gave 67-85%: docs/benchmarks.md). Returns the
    per-turn lists ``program_seconds``, ``floor_seconds``, ``shares`` and the products' ``flops``.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1")
    key = jax.random.key(0)
    prepared = [_prepare(d, n, jax.random.fold_in(key, i), False) for i, d, n in _by_cost(counts)]
    programs, floors = [], []
    for r in range(rounds):
        programs.append(median_seconds(program, program_calls, warmup=2 if r == 0 else 0))
        floors.append(
            sum(_seconds_per_call(p.fn, p.copies, sample_seconds) * p.calls for p in prepared)
        )
    return {
        "program_seconds": programs,
        "floor_seconds": floors,
        "shares": [f / p for f, p in zip(floors, programs, strict=True)],
        "flops": sum(p.dot.flops * p.calls for p in prepared),
    }


def machine() -> dict:
    """What a benchmark ran on: CPU model, core count, devices, JAX version."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
