"""Ahead-of-time compilation for TPU slices, on any machine: does a run fit, and what does it cost?

  python -m xlm_jax.aot --config=configs/xnli15_mlm_tlm.py --topology=v5e-256
  python -m xlm_jax.aot --config=configs/xnli15_mlm_tlm.py --topology=v5e-256 --num_slices=2 \\
      --config.mesh.shape='(-1,16,1)'
  python -m xlm_jax.aot --mode=nmt --config=configs/multi30k_unmt_enfr.py:random --topology=v5e-8

With libtpu installed (`pip install "jax[tpu]==<the pinned jax>"`, in requirements-dev.txt),
``jax.experimental.topologies`` describes the devices of a real TPU slice without one; every
program the run compiles (`programs.py`) is lowered with the run's shardings over a mesh of those
devices and compiled by the real TPU compiler, with nothing allocated. Reported per program:
compile time, per-chip memory (arguments + outputs + temporaries + code − donated buffers)
against the chip's HBM, the compiler's FLOPs and bytes, and the collectives of the optimized
program (kind, count, bytes; over several slices, what crosses the data-center network). A
program that does not fit fails the command (exit 1) naming the chip, the need and the budget.
``--max_batch=PROGRAM`` searches the largest global batch with which that program fits;
``--pod_table`` makes docs/benchmarks.md's table. As maxtext's ``train_compile.py``; XLM and
HuggingFace have nothing like it.
"""

from __future__ import annotations

import os

# The check runs on a CPU host (a laptop, CI, a TPU VM before it claims its chips): never let
# JAX open an accelerator for it. Set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling claims no chip, so several processes may load libtpu at once (tests, a running job).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from xlm_jax.core import files, parallel
from xlm_jax.data import sentences
from xlm_jax.tasks import nmt
from xlm_jax.tools import programs, tutorial  # noqa: E402

GiB = 1024**3

# --- slices --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per device as the topology lists them (one per chip: megacore on v4/v5p)


# HBM per chip from Cloud TPU's system-architecture pages.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB),
    "v5e": Chip("TPU v5e", 16 * GiB),
    "v5p": Chip("TPU v5p", 95 * GiB),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GiB),
}
# gcloud's accelerator types count TensorCores on v4/v5p (two per chip, one megacore device) and
# chips on v5e/v6e; the topology is in chips.
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def _topology_name(generation: str, n_chips: int) -> str:
    """The usual slice shape of ``n_chips`` chips: 2-D for v5e/v6e, 3-D cubes for v4/v5p."""
    if generation in ("v5e", "v6e"):
        x = 2 ** (int(math.log2(n_chips)) // 2)
        return f"{generation}:{x}x{n_chips // x}"
    dims = [1, 1, 1]
    for i in range(int(math.log2(n_chips))):
        dims[2 - i % 3] *= 2  # doubling one axis after the other
    dims = sorted(dims, key=lambda d: (d == 1, d))  # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
    return f"{generation}:{'x'.join(str(d) for d in dims)}"


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its name, its topology and its devices (compile-only descriptions)."""

    name: str
    topology: str
    chip: Chip
    devices: tuple  # of jax devices, num_slices x chips

    @property
    def n_slices(self) -> int:
        return len({getattr(d, "slice_index", 0) for d in self.devices})


def parse_slice(name: str) -> tuple[str, str, str]:
    """``v5e-256`` / ``v5litepod-256`` / ``v4-128`` (gcloud's accelerator types) or a topology
    ``v5e:16x16`` → (generation, topology name, chip config)."""
    if ":" in name:
        generation = _ALIASES.get(name.split(":")[0], name.split(":")[0])
        topology = f"{generation}:{name.split(':', 1)[1]}"
    else:
        m = re.fullmatch(r"(v\d+[a-z]*?)(?:pod)?-(\d+)", name)
        if not m:
            raise ValueError(f"--topology={name!r}: expected e.g. v5e-256, v4-128 or v5e:16x16")
        generation = _ALIASES.get(m.group(1), m.group(1))
        if generation not in CHIPS:
            raise ValueError(f"--topology={name!r}: unknown TPU generation {generation!r}")
        n = int(m.group(2))
        chips, rest = divmod(n, _CORES_PER_CHIP[generation])
        if rest or chips < 1 or chips & (chips - 1):
            raise ValueError(f"--topology={name!r}: {n} is not a power-of-two slice size")
        topology = _topology_name(generation, chips)
    if generation not in CHIPS:
        raise ValueError(f"--topology={name!r}: unknown TPU generation {generation!r}")
    return generation, topology, "megacore" if _CORES_PER_CHIP[generation] == 2 else "default"


def tpu_slice(name: str, num_slices: int = 1) -> Slice:
    """The devices of ``num_slices`` slices of type ``name``; needs libtpu, not a TPU."""
    from jax.experimental import topologies

    generation, topology, chip_config = parse_slice(name)
    dims = [int(x) for x in topology.split(":")[1].split("x")]
    kw: dict[str, Any] = {"num_slices": num_slices}
    if chip_config == "megacore":  # one device per chip, as Cloud TPU VMs run v4 and v5p
        kw.update(
            chip_config_name="megacore",
            chips_per_host_bounds=(2, 2, 1),
            wrap=tuple(d >= 4 for d in dims),  # a full 4-chip ring or more closes into a torus
        )
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw)
    except Exception as e:  # libtpu missing, or a shape it does not know
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); the TPU "
            f"compiler comes with libtpu: pip install 'jax[tpu]=={jax.__version__}'"
        ) from e
    return Slice(name, topology, CHIPS[generation], tuple(desc.devices))


# --- collectives in the optimized program -------------------------------------------------------

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.+?)\s+(?P<op>"
    + "|".join(_COLLECTIVES)
    + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}


def _array_bytes(shape_text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype)[:3] or 8)
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * bits // 8)
    return out


_DCN_SEND = re.compile(
    r"^\s*%\S+\s*=\s*\((?P<shape>.*?)\)\s+send\(.*_xla_megascale_transfer_type=\"(?P<kind>\w+)\""
)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {count, bytes, dcn_count, dcn_bytes}}`` of the optimized program, per device.

    ``count``/``bytes``: collective instructions over the slice's ICI (a loop body's count once;
    bytes = the result, or an async start's largest buffer). Over several slices the compiler
    splits what crosses slices into transfers over the data-center network (DCN): the megascale
    sends, counted in ``dcn_count``/``dcn_bytes`` (their payload) by the kind they implement."""
    out: dict[str, dict[str, int]] = {}

    def stats(kind: str) -> dict[str, int]:
        return out.setdefault(kind, {"count": 0, "bytes": 0, "dcn_count": 0, "dcn_bytes": 0})

    for line in hlo_text.splitlines():
        if m := _INSTR.match(line):
            sizes = _array_bytes(m.group("shape"))
            s = stats(m.group("op"))
            s["count"] += 1
            s["bytes"] += max(sizes, default=0) if m.group("start") else sum(sizes)
        elif m := _DCN_SEND.match(line):
            s = stats(m.group("kind").lower().replace("_", "-"))
            s["dcn_count"] += 1
            s["dcn_bytes"] += _array_bytes(m.group("shape"))[0]
    return out


# --- compiling ------------------------------------------------------------------------------------


def _memory(compiled) -> dict[str, int]:
    mem = compiled.memory_analysis()
    parts = {
        k: int(getattr(mem, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "temp", "alias", "generated_code")
    }
    # Donated buffers (alias) are arguments reused as outputs: counted once.
    parts["total"] = (
        parts["argument"] + parts["output"] + parts["temp"] + parts["generated_code"]
    ) - parts["alias"]
    return parts


def compile_program(program: programs.Program, tpu: Slice, hbm_fraction: float) -> dict:
    """Compiles one program for the slice; its memory, cost and collectives (or why it failed)."""
    budget = int(tpu.chip.hbm_bytes * hbm_fraction)
    report: dict[str, Any] = {"program": program.name, "budget_bytes": budget}
    t = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except Exception as e:  # the TPU compiler refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        report.update(
            compile_s=time.perf_counter() - t,
            fits=False,
            error=" ".join(str(e).split())[:400],
            memory={"total": None, "at_least": oom_need(str(e))},
        )
        return report
    report["compile_s"] = time.perf_counter() - t
    report["memory"] = _memory(compiled)
    report["fits"] = report["memory"]["total"] <= budget
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    report["flops"] = float(cost.get("flops", 0.0))
    report["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    report["collectives"] = collectives(compiled.as_text())
    return report


def oom_need(message: str) -> int | None:
    """A lower bound of what a program the TPU compiler refused needs, from its message: "Total hbm
    usage >= 16.07G", or "the total memory required for HLO temporaries (24.35G) exceeds ..."."""
    m = re.search(r"Total hbm usage >= ([\d.]+)([GMK])", message) or re.search(
        r"temporaries \(([\d.]+)([GMK])\)", message
    )
    return _to_bytes(*m.groups()) if m else None


def _to_bytes(value: str, unit: str | None) -> int:
    return int(float(value) * {"G": GiB, "M": 1024**2, "K": 1024}.get(unit or "", 1))


def check(
    config: ml_collections.ConfigDict,
    mode: str,
    tpu: Slice,
    *,
    only: Sequence[str] = (),
    all_shapes: bool = False,
    hbm_fraction: float = 0.95,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Compiles every program of ``mode``'s run (or those named in ``only``) for ``tpu``."""
    mesh = parallel.make_mesh(config.mesh.shape, tpu.devices)
    rules = parallel.rules_from_config(config.mesh.rules)
    progs = run_programs(mode, config, mesh, rules, all_shapes)
    unknown = sorted(set(only) - {p.name for p in progs})
    if unknown:
        raise ValueError(
            f"--programs={','.join(only)}: {unknown} not among {[p.name for p in progs]}"
        )
    reports = []
    for p in progs:
        if only and p.name not in only:
            continue
        parallel.check_batch_size(p.batch_shape[0], mesh, rules, programs.batch_field(mode, p.name))
        r = compile_program(p, tpu, hbm_fraction)
        r.update(mesh=dict(mesh.shape), batch=p.batch_shape, topology=tpu.topology)
        log(summary_line(r, tpu))
        reports.append(r)
    return reports


def run_programs(
    mode: str, config: ml_collections.ConfigDict, mesh, rules, all_shapes: bool
) -> list[programs.Program]:
    """``programs.for_mode``'s; translation with ``tokens_per_batch``: each bucket's programs
    with its train steps at that bucket's rows, as the run's iterators make them (``KIND_L``
    with ``all_shapes``, else the longest bucket's, whose attention is the widest)."""
    if mode != "nmt" or config.tokens_per_batch <= 0:
        return programs.for_mode(mode, config, mesh, rules, all_shapes=all_shapes)
    dp = parallel.data_parallel_size(mesh, rules)
    buckets = nmt._buckets(config)
    out = []
    for length in buckets if all_shapes else buckets[-1:]:
        c = ml_collections.ConfigDict(config.to_dict())
        c.length_buckets, c.tokens_per_batch = str(length), -1
        c.batch_size = sentences.budget_rows(config.tokens_per_batch, length, dp)
        progs = programs.for_mode(mode, c, mesh, rules)
        out += (
            [dataclasses.replace(p, name=f"{p.name}_{length}") for p in progs]
            if all_shapes
            else progs
        )
    return out


def need_text(r: dict) -> str:
    """A report's memory per chip; for a program the compiler refused, what it said it needs."""
    need, at_least = r["memory"].get("total"), r["memory"].get("at_least")
    if need is not None:
        return f"{need / GiB:.2f} GiB"
    return f"more than {at_least / GiB:.2f} GiB" if at_least else "?"


def summary_line(r: dict, tpu: Slice) -> str:
    coll = r.get("collectives", {})
    coll_s = ", ".join(
        f"{k} {v['count']}" + (f" ({v['dcn_count']} over DCN)" if v["dcn_count"] else "")
        for k, v in sorted(coll.items())
    )
    return (
        f"{r['program']:<12} batch {r['batch']} mesh {r['mesh']}: {need_text(r)} of "
        f"{r['budget_bytes'] / GiB:.1f} GiB per {tpu.chip.name} "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}; compile {r['compile_s']:.0f} s"
        + (f"; {r['flops'] / 1e12:.2f} TFLOP/chip" if r.get("flops") else "")
        + (f"; {coll_s}" if coll_s else "")
    )


def largest_batch(
    config: ml_collections.ConfigDict,
    mode: str,
    tpu: Slice,
    program: str,
    *,
    known: dict[int, dict] | None = None,
    on_report: Callable[[int, dict], None] = lambda k, r: None,
    hbm_fraction: float = 0.95,
    log: Callable[[str], None] = print,
) -> dict:
    """The largest global batch whose ``program`` fits, in steps of the batch split ``unit``, to
    within 1/16 (the next size that was compiled and did not fit is at most 1/16 larger).

    Memory grows about linearly with the batch, so each next size to compile is where the line
    through the two nearest compiled sizes meets the budget (kept strictly between the largest
    size that fits and the smallest that does not) until those two are within 1/16.
    ``known``: reports already compiled, by batch per ``unit``; ``on_report`` sees each new one.
    Near the limit XLA rematerializes to fit, so memory flattens below the budget (seen:
    11,776 and 12,672 rows both 28.7 GiB on a v4): a flat line falls back to bisection."""
    mesh = parallel.make_mesh(config.mesh.shape, tpu.devices)
    unit = parallel.data_parallel_size(mesh, parallel.rules_from_config(config.mesh.rules))
    field = programs.batch_field(mode, program)
    if mode == "nmt" and field == "batch_size" and config.tokens_per_batch > 0:
        raise ValueError(
            f"--max_batch={program} searches batch_size, which tokens_per_batch="
            f"{config.tokens_per_batch} replaces: search with --config.tokens_per_batch=-1 (the "
            "largest rows at the longest bucket, times its length, is the largest budget)"
        )

    def compile_at(k: int) -> dict:
        c = ml_collections.ConfigDict(config.to_dict())
        c[field] = k * unit
        report = check(c, mode, tpu, only=(program,), hbm_fraction=hbm_fraction, log=log)[0]
        on_report(k, report)
        return report

    tried = search_fitting(compile_at, dict(known or {}))
    lo = max((k for k, r in tried.items() if r["fits"]), default=0)
    return {
        "per_unit": lo,
        "unit": unit,
        "global": lo * unit,
        "report": tried.get(lo),
        "tried": {k: (r["memory"].get("total"), r["fits"]) for k, r in sorted(tried.items())},
    }


def search_fitting(
    measure: Callable[[int], dict], tried: dict[int, dict], max_steps: int = 12
) -> dict[int, dict]:
    """Measures sizes until the largest that fits and the smallest that does not are within 1/16
    of each other (``measure(k)`` → a report with ``fits``, ``budget_bytes``, ``memory.total``)."""
    if not tried:
        tried[1] = measure(1)
    for _ in range(max_steps):
        fit = [k for k, r in tried.items() if r["fits"]]
        lo, hi = max(fit, default=0), min((k for k in tried if k not in fit), default=None)
        if hi is not None and hi - lo <= max(1, lo // 16):
            break
        k = _next_size(tried, lo, hi)
        tried[k] = measure(k)
    return tried


def _next_size(tried: dict[int, dict], lo: int, hi: int | None) -> int:
    points = sorted((k, r["memory"]["total"]) for k, r in tried.items() if r["memory"].get("total"))
    budget = next(iter(tried.values()))["budget_bytes"]
    guess = None
    if len(points) >= 2:
        (k1, m1), (k2, m2) = sorted(points, key=lambda p: abs(p[0] - (lo or 1)))[:2]
        slope = (m2 - m1) / (k2 - k1) if k2 != k1 else 0
        if slope > 0 and abs(m2 - m1) > budget / 100:  # a flat line predicts nothing
            guess = int(k1 + (budget - m1) / slope)
    if hi is not None:
        return guess if guess is not None and lo < guess < hi else (lo + hi) // 2  # else bisect
    if guess is None:
        return 2 * max(lo, 1)  # no line yet: double
    return max(guess, lo + max(1, lo // 16))  # at the predicted limit: a size just above it


# --- the pod table (docs/benchmarks.md) ----------------------------------------------------------

# The paper's two pretrained sizes (XLM README: mlm_tlm_xnli15_1024, mlm_100_1280) on the
# XNLI-15 config; XLM-100 has no language embeddings.
POD_MODELS = {
    "XLM-15": {
        "model.emb_dim": 1024,
        "model.n_layers": 12,
        "model.n_heads": 8,
        "tokenizer.vocab_size": 95_000,
    },
    "XLM-100": {
        "model.emb_dim": 1280,
        "model.n_layers": 16,
        "model.n_heads": 16,
        "tokenizer.vocab_size": 200_000,
        "model.use_lang_emb": False,
    },
}
POD_SLICES = ("v4-128", "v5e-256", "v5p-128", "v6e-256")
POD_MESHES = {"DP": (-1, 1, 1), "FSDP": (1, -1, 1), "FSDP+TP4": (1, -1, 4)}
POD_CONFIG = "configs/xnli15_mlm_tlm.py"
PAPER_BATCH = 4096  # 64 GPUs x 64 streams of 256 tokens (XLM README's XNLI-15 command)


def _pod_config(model: str, mesh: tuple[int, ...]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The pod table's config for ``model`` on ``mesh``, and the same as command-line flags."""
    overrides = {**POD_MODELS[model], "batch_size": PAPER_BATCH, "bptt": 256, "mesh.shape": mesh}
    flags_ = [
        f"--config.{key}=" + (f"'{tuple(v)}'".replace(" ", "") if isinstance(v, tuple) else f"{v}")
        for key, v in overrides.items()
    ]
    return tutorial.load_config(POD_CONFIG, overrides), flags_


def pod_table(
    out_dir: str, models: Sequence[str] = tuple(POD_MODELS), log: Callable[[str], None] = print
) -> dict:
    """Compiles XLM-15's and XLM-100's MLM step on each slice and mesh at the paper's batch, then
    bisects the largest batch of the mesh to pick. One JSON file per row in ``out_dir``: a rerun
    skips what is there, and processes given different ``models`` can share the directory."""
    os.makedirs(out_dir, exist_ok=True)

    def cached(name: str, make: Callable[[], Any]) -> Any:
        path = os.path.join(out_dir, name.replace("|", "_").replace("+", "") + ".json")
        if not os.path.exists(path):
            files.write_atomic(path, json.dumps(make(), indent=1).encode())
        with open(path) as f:
            return json.load(f)

    for model in models:
        for name in POD_SLICES:
            tpu = tpu_slice(name)
            rows = {
                m: cached(f"{model}|{name}|{m}", functools.partial(_pod_row, model, tpu, m, log))
                for m in POD_MESHES
            }
            cached(
                f"best|{model}|{name}",
                functools.partial(_pod_best, model, tpu, rows, _Searched(out_dir), log),
            )
    return load_pod_table(out_dir)


@dataclasses.dataclass(frozen=True)
class _Searched:
    """The batch search's compiles, one file each in ``search/``: a rerun reuses them."""

    out_dir: str

    def _dir(self, model: str, slice_name: str, mesh_name: str) -> str:
        return os.path.join(self.out_dir, "search", f"{model}_{slice_name}_{mesh_name}")

    def load(self, model: str, slice_name: str, mesh_name: str) -> dict[int, dict]:
        folder = self._dir(model, slice_name, mesh_name)
        out = {}
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            with open(os.path.join(folder, name)) as f:
                out[int(name.removesuffix(".json"))] = json.load(f)
        return out

    def save(self, model: str, slice_name: str, mesh_name: str, k: int, report: dict) -> None:
        folder = self._dir(model, slice_name, mesh_name)
        files.write_atomic(os.path.join(folder, f"{k}.json"), json.dumps(report).encode())


def _pod_row(model: str, tpu: Slice, mesh_name: str, log: Callable[[str], None]) -> dict:
    config, extra = _pod_config(model, POD_MESHES[mesh_name])
    log(f"{model} on {tpu.name}, {mesh_name}:")
    report = check(config, "pretrain", tpu, only=("mlm",), log=log)[0]
    command = " ".join(
        [
            "python -m xlm_jax.aot",
            f"--config={POD_CONFIG}",
            f"--topology={tpu.name}",
            "--programs=mlm",
            *extra,
        ]
    )
    return {
        "model": model,
        "slice": tpu.name,
        "mesh_name": mesh_name,
        "chips": len(tpu.devices),
        "report": report,
        "command": command,
    }


def _pod_best(
    model: str, tpu: Slice, rows: dict, searched: _Searched, log: Callable[[str], None]
) -> dict:
    """The mesh to pick (of those that fit at the paper's batch, the one moving the fewest
    collective bytes: the FLOPs per chip are the same) and its largest batch."""
    fitting = [m for m, r in rows.items() if r["report"]["fits"]]
    if not fitting:
        return {"model": model, "slice": tpu.name, "mesh_name": None}
    best = min(fitting, key=lambda m: _comm_bytes(rows[m]["report"]))
    config, _ = _pod_config(model, POD_MESHES[best])
    mesh = parallel.make_mesh(POD_MESHES[best], tpu.devices)
    unit = parallel.data_parallel_size(mesh, parallel.rules_from_config(config.mesh.rules))
    known = {PAPER_BATCH // unit: rows[best]["report"], **searched.load(model, tpu.name, best)}
    found = largest_batch(
        config,
        "pretrain",
        tpu,
        "mlm",
        known=known,
        on_report=functools.partial(searched.save, model, tpu.name, best),
        log=log,
    )
    return {
        "model": model,
        "slice": tpu.name,
        "mesh_name": best,
        "chips": len(tpu.devices),
        "largest": {k: v for k, v in found.items() if k != "report"},
        "memory": found["report"]["memory"]["total"],
        "command": rows[best]["command"] + " --max_batch=mlm",
    }


def load_pod_table(out_dir: str) -> dict:
    table: dict[str, dict] = {"rows": {}, "best": {}}
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(out_dir, name)) as f:
            entry = json.load(f)
        key = f"{entry['model']}|{entry['slice']}"
        if name.startswith("best_"):
            table["best"][key] = entry
        else:
            table["rows"][f"{key}|{entry['mesh_name']}"] = entry
    return table


def _comm_bytes(report: dict) -> int:
    return sum(v["bytes"] + v["dcn_bytes"] for v in report.get("collectives", {}).values())


def pod_markdown(table: dict) -> str:
    lines = [
        "| model | slice (chips, HBM) | mesh (data, fsdp, tensor) | memory per chip | fits | "
        "TFLOP per chip | collective bytes per chip (share of bytes accessed) | compile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = [f"{m}|{n}" for m in POD_MODELS for n in POD_SLICES]
    for key, row in sorted(
        table["rows"].items(),
        key=lambda kv: (
            order.index(kv[0].rsplit("|", 1)[0]),
            list(POD_MESHES).index(kv[1]["mesh_name"]),
        ),
    ):
        model, name, mesh_name = key.split("|")
        r = row["report"]
        chip = CHIPS[parse_slice(name)[0]]
        comm = _comm_bytes(r)
        share = f" ({comm / r['bytes_accessed']:.1%})" if r.get("bytes_accessed") else ""
        lines.append(
            f"| {model} | {name} ({row['chips']}, {chip.hbm_bytes / GiB:.0f} GiB) | {mesh_name} "
            f"{tuple(r['mesh'].values())} | {need_text(r)} | "
            f"{'yes' if r['fits'] else '**no**'} | "
            f"{r.get('flops', 0) / 1e12:.1f} | {comm / GiB:.2f} GiB{share} | "
            f"{r['compile_s']:.0f} s |"
        )
    lines += [
        "",
        "| model | slice | mesh to pick | largest global batch (× 256 tokens) | tokens per chip | "
        "memory per chip there |",
        "|---|---|---|---|---|---|",
    ]
    for key in (k for k in order if k in table["best"]):
        model, name = key.split("|")
        best = table["best"][key]
        if best["mesh_name"] is None:
            lines.append(f"| {model} | {name} | none fits at the paper's batch | | | |")
            continue
        n, chips = best["largest"]["global"], best["chips"]
        lines.append(
            f"| {model} | {name} | {best['mesh_name']} | {n:,} | {n * 256 // chips:,} | "
            f"{best['memory'] / GiB:.1f} GiB |"
        )
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------


def define_flags() -> None:
    """The command's flags; defined only when it runs, as tests import this module beside others
    (bench, main) that define --config too."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_enum("mode", "pretrain", programs.MODES, "Whose programs to compile.")
    flags.DEFINE_string(
        "topology",
        None,
        "TPU slice: v5e-256, v4-128, v5p-128, v6e-256 (gcloud names) or v5e:16x16.",
    )
    flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN (data parallel).")
    flags.DEFINE_list("programs", [], "Only these programs (default: all of the run's).")
    flags.DEFINE_bool(
        "all_shapes", False, "Every bucket of NMT's steps, not only the largest (the peak)."
    )
    flags.DEFINE_float(
        "hbm_fraction", 0.95, "Share of the chip's HBM a run may plan for (the rest: runtime)."
    )
    flags.DEFINE_string(
        "max_batch", "", "A program (e.g. mlm): also find the largest global batch that fits."
    )
    flags.DEFINE_string("out", "", "Write the reports as JSON here.")
    flags.DEFINE_string(
        "pod_table", "", "Make docs/benchmarks.md's pod table in this folder (resumable), print it."
    )
    flags.DEFINE_list("pod_models", list(POD_MODELS), "The pod table's models.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.pod_table:
        print(pod_markdown(pod_table(f.pod_table, f.pod_models)))
        return
    if f.config is None or not f.topology:
        raise app.UsageError("--config and --topology are required")
    tpu = tpu_slice(f.topology, f.num_slices)
    print(
        f"{tpu.name} ({tpu.topology}) x {tpu.n_slices} slice(s): {len(tpu.devices)} devices of "
        f"{tpu.chip.name}, {tpu.chip.hbm_bytes / GiB:.0f} GiB HBM each"
    )
    config = f.config
    reports = check(
        config,
        f.mode,
        tpu,
        only=f.programs,
        all_shapes=f.all_shapes,
        hbm_fraction=f.hbm_fraction,
    )
    result: dict[str, Any] = {"slice": tpu.name, "topology": tpu.topology, "programs": reports}
    if f.max_batch:
        unit = parallel.data_parallel_size(
            parallel.make_mesh(config.mesh.shape, tpu.devices),
            parallel.rules_from_config(config.mesh.rules),
        )
        known = {r["batch"][0] // unit: r for r in reports if r["program"] == f.max_batch}
        result["max_batch"] = largest_batch(
            config,
            f.mode,
            tpu,
            f.max_batch,
            known=known,
            hbm_fraction=f.hbm_fraction,
        )
        best = result["max_batch"]
        print(
            f"largest {f.max_batch} batch that fits: {best['global']} "
            f"({best['per_unit']} per batch shard of {best['unit']})"
        )
    if f.out:
        files.write_atomic(f.out, json.dumps(result, indent=1).encode())
    too_big = [r for r in reports if not r["fits"]]
    for r in too_big:
        print(
            f"error: {r['program']} does not fit on {tpu.chip.name}: needs "
            f"{need_text(r)} per device, the budget is "
            f"{r['budget_bytes'] / GiB:.2f} GiB ({f.hbm_fraction:.0%} of "
            f"{tpu.chip.hbm_bytes / GiB:.0f} GiB). Shard more (--config.mesh.shape), lower the "
            "batch, or set --config.model.remat=full.",
            file=sys.stderr,
        )
    if too_big:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
