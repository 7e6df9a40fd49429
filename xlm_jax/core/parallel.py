"""Device mesh, logical axis rules and shardings: the only place that knows about devices.

The model names its axes (``batch``, ``embed``, ``heads``, ...); the rules here map them onto the
mesh axes ``data``, ``fsdp`` and ``tensor``. Flax applies rules in order and skips a rule whose
mesh axis is already taken in the same array, so the activation ``(batch, length, embed)`` puts
``batch`` on ``data×fsdp`` and leaves ``embed`` whole, while the parameter ``(vocab, embed)``
puts ``embed`` on ``fsdp`` (FSDP) and ``vocab`` on ``tensor`` (Megatron-style).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("langs", None),
    ("positions", None),
)


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Fills the one ``-1`` entry with the remaining devices; checks the product."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} sizes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(
                f"mesh shape {shape}: {n_devices} devices are not divisible by {known}"
            )
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices, but there are {n_devices}"
        )
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axes, so linen's logical rules apply.

    Devices of several TPU slices (``slice_index``, joined by the slower data-center network)
    are laid out so that only the ``data`` axis crosses slices, its outer part: with the default
    rules only the gradient reduction goes over DCN, FSDP's and tensor parallelism's collectives
    stay on each slice's ICI (as maxtext's ``dcn_data_parallelism``).
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(shape, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    n_slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
    if n_slices == 1:
        try:
            return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
        except NotImplementedError:
            # An axis that is no product of the slice's physical axes (4-way tensor parallelism
            # on a 16x16 v6e torus, found by xlm_jax.tools.aot): split a physical axis between two.
            grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES, axis_types=auto)
    if sizes[0] % n_slices:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes, strict=True))} over {n_slices} slices: the "
            f"data axis must be a multiple of {n_slices}, as only data parallelism crosses slices"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        (sizes[0] // n_slices, *sizes[1:]), (n_slices, 1, 1), devices
    )
    return Mesh(grid, MESH_AXES, axis_types=auto)


def rules_from_config(rules: Sequence[Sequence] | None) -> Rules:
    """Config rules (lists, possibly with lists of mesh axes) as the tuples flax expects."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        if axes is not None and not set(np.atleast_1d(axes)) <= set(MESH_AXES):
            raise ValueError(f"logical axis rule {name!r} -> {axes!r} names an unknown mesh axis")
        out.append((name, axes))
    return tuple(out)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in mesh_axes_of("batch", rules))


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules, what: str = "batch_size") -> None:
    if batch_size < 1:
        raise ValueError(f"{what}={batch_size}: a batch needs at least one row")
    n = data_parallel_size(mesh, rules)
    if batch_size % n:
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {n}-way batch split of {mesh}"
        )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """Shardings for a pytree whose leaves are boxed with logical names (nn.Partitioned)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def mesh_axes_of(logical: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes a logical axis is split over in an array that has it alone, e.g. batch."""
    axes = nn.logical_to_mesh_axes((logical,), rules)[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def process_rows(sharding: NamedSharding, n_rows: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a global batch that this process's devices hold.

    With the batch split over the data axes, each process owns one contiguous block; processes
    whose devices only differ along other axes hold the same block.
    """
    index_map = sharding.addressable_devices_indices_map((n_rows, 1))
    starts = {idx[0].indices(n_rows)[0] for idx in index_map.values()}
    stops = {idx[0].indices(n_rows)[1] for idx in index_map.values()}
    start, stop = min(starts), max(stops)
    covered = set()
    for idx in index_map.values():
        covered.update(range(*idx[0].indices(n_rows)[:2]))
    if covered != set(range(start, stop)):
        raise ValueError(
            f"this process's devices hold rows {sorted(covered)} of {n_rows}: not one contiguous "
            "block; order the mesh devices by process"
        )
    return start, stop


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding, n_rows: int):
    """This process's rows → global ``(n_rows, ...)`` arrays laid out as ``sharding`` says."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (n_rows, *v.shape[1:]))
        for k, v in batch.items()
    }


def on_first_process(fn: Callable[[], Any], name: str) -> None:
    """``fn()`` on process 0 while the others wait at a barrier named ``name`` (e.g. writing a
    shared directory once). If process 0 fails, its launcher stops the others."""
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = None,
) -> None:
    """``jax.distributed.initialize``: explicit values, or auto-detection on TPU pods and SLURM.

    On CPU (tests, local multi-process runs) cross-process collectives need an implementation:
    ``cpu_collectives='gloo'``.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """The context in which the model is traced: mesh for constraints, rules for names."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
