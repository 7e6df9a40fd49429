"""Ahead-of-time compilation for TPU slices (xlm_jax.tools.aot): the real TPU compiler from libtpu
(requirements-dev.txt), no TPU. The parsing and the batch search are checked without it."""

import importlib.util
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import CPU_ENV, tiny_config, tiny_nmt
from xlm_jax.core import parallel
from xlm_jax.tasks import xnli
from xlm_jax.tools import aot, programs

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -r requirements-dev.txt brings it)",
)

HLO = """\
HloModule jit_step
  %all-reduce.1 = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(%a, %b), channel_id=1, replica_groups={{0,1}}
  %all-gather-start.2 = (bf16[2,8]{1,0}, bf16[4,8]{1,0}) all-gather-start(%c), dimensions={0}
  %all-gather-done.2 = bf16[4,8]{1,0} all-gather-done(%all-gather-start.2)
  ROOT %reduce-scatter.3 = f32[2]{0} reduce-scatter(%d), dimensions={0}
  %send.4 = (f32[1,8,128]{2,1,0}, u32[], token[]) send(%e, %t), is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv.4 = (f32[1,8,128]{2,1,0}, u32[], token[]) recv(%t), is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
"""  # noqa: E501


def test_collectives_counts_each_kind_and_dcn_transfers():
    got = aot.collectives(HLO)
    assert got["all-reduce"] == {
        "count": 1,
        "bytes": 4 * 8 * 4 + 16 * 2,  # a combined all-reduce moves every operand
        "dcn_count": 1,
        "dcn_bytes": 8 * 128 * 4,  # the megascale send's payload; its recv is not counted again
    }
    assert got["all-gather"] == {"count": 1, "bytes": 4 * 8 * 2, "dcn_count": 0, "dcn_bytes": 0}
    assert got["reduce-scatter"]["count"] == 1 and got["reduce-scatter"]["bytes"] == 8


def test_what_a_refused_program_needs_is_read_from_the_compilers_message():
    two = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
        "memory in memory space hbm. Used 15.81G of 15.75G hbm. Total hbm usage >= 16.07G: ...",
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (24.35G) exceeds available HBM (15.75G).",
    )
    assert [aot.oom_need(m) for m in two] == [int(16.07 * 2**30), int(24.35 * 2**30)]
    assert aot.oom_need("some other failure") is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v5e-256", ("v5e", "v5e:16x16", "default")),
        ("v5litepod-16", ("v5e", "v5e:4x4", "default")),
        ("v6e-8", ("v6e", "v6e:2x4", "default")),
        ("v4-128", ("v4", "v4:4x4x4", "megacore")),  # 128 TensorCores = 64 chips
        ("v5p-8", ("v5p", "v5p:2x2x1", "megacore")),
        ("v4-16", ("v4", "v4:2x2x2", "megacore")),
        ("v5e:2x4", ("v5e", "v5e:2x4", "default")),
    ],
)
def test_slice_names(name, expected):
    assert aot.parse_slice(name) == expected


@pytest.mark.parametrize("name", ["v5e", "v5e-12", "v9-8", "tpu-8"])
def test_bad_slice_names_are_refused(name):
    with pytest.raises(ValueError, match="--topology"):
        aot.parse_slice(name)


def _fit_bounds(tried):
    fit = [k for k, r in tried.items() if r["fits"]]
    return max(fit, default=0), min((k for k in tried if k not in fit), default=None)


def test_search_finds_the_largest_fitting_size_in_few_compiles():
    calls = []

    def measure(k):  # memory linear in the batch plus a little curvature: 90 fits (10,081), 91 not
        calls.append(k)
        total = 1000 + 100 * k + (k * k) // 100
        return {"fits": total <= 10_081, "budget_bytes": 10_081, "memory": {"total": total}}

    lo, hi = _fit_bounds(aot.search_fitting(measure, {}))
    assert lo <= 90 < hi and hi - lo <= max(1, lo // 16) and lo >= 85
    assert len(calls) <= 5, calls
    # nothing fits at all: one compile says so
    assert aot.search_fitting(
        lambda k: {"fits": False, "budget_bytes": 1, "memory": {"total": None}}, {}
    ).keys() == {1}


def test_search_bisects_where_the_compiler_keeps_memory_flat():
    """Near the limit XLA rematerializes: memory stops growing, then the program fails (as seen
    on a v4); the line predicts nothing there and the search bisects."""
    calls = []

    def measure(k):
        calls.append(k)
        if k > 150:  # the compiler gives up
            return {"fits": False, "budget_bytes": 1000, "memory": {"total": None}}
        return {"fits": True, "budget_bytes": 1000, "memory": {"total": min(900, 300 + 10 * k)}}

    lo, hi = _fit_bounds(aot.search_fitting(measure, {64: measure(64)}))
    assert lo <= 150 < hi and hi - lo <= lo // 16, (lo, hi, calls)
    assert len(calls) <= 9, calls


def _spec(sharding_tree, *path):
    node = sharding_tree
    for key in path:
        node = node[key]
    return node.spec


@needs_libtpu
def test_tiny_model_compiles_for_a_v5e_slice_with_fsdp_and_tensor_shardings():
    config = tiny_config()
    config.mesh.shape = (1, 2, 2)
    tpu = aot.tpu_slice("v5e:2x2")
    mesh = parallel.make_mesh(config.mesh.shape, tpu.devices)
    rules = parallel.rules_from_config(config.mesh.rules)
    progs = programs.for_mode("pretrain", config, mesh, rules)
    assert [p.name for p in progs] == ["mlm", "eval_mlm", "tlm", "eval_tlm"]
    compiled = progs[0].lower().compile()
    params = compiled.input_shardings[0][0].params
    # (vocab, embed) -> (tensor, fsdp); attention (embed, heads, kv) -> (fsdp, tensor, -)
    assert _spec(params, "embeddings", "embedding") == P("tensor", "fsdp")
    assert _spec(params, "layer_0", "attention", "query", "kernel") == P("fsdp", "tensor", None)
    report = aot.compile_program(progs[0], tpu, 0.95)
    assert report["fits"] and 0 < report["memory"]["total"] < 64 * 2**20
    assert report["flops"] > 0 and report["collectives"]["all-gather"]["count"] > 0
    assert all(v["dcn_count"] == 0 for v in report["collectives"].values())  # one slice


@needs_libtpu
def test_two_slices_only_reductions_cross_the_data_center_network():
    config = tiny_config()
    config.mesh.shape = (2, 2, 2)  # data over the 2 slices; FSDP and tensor inside each
    tpu = aot.tpu_slice("v5e:2x2", num_slices=2)
    mesh = parallel.make_mesh(config.mesh.shape, tpu.devices)
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
    report = aot.check(config, "pretrain", tpu, only=("mlm",), log=lambda _: None)[0]
    over_dcn = {k for k, v in report["collectives"].items() if v["dcn_count"]}
    assert over_dcn == {"all-reduce"}  # gradients (and loss sums); no activation gathers
    with pytest.raises(ValueError, match="multiple of 2"):
        parallel.make_mesh((1, 4, 2), tpu.devices)


@needs_libtpu
def test_a_mesh_axis_may_split_a_physical_axis():
    """4-way tensor parallelism on a 16x16 v6e torus: 4 is no product of the physical axes, so one
    is split (jax.make_mesh alone refused it: the pod table's v6e-256 FSDP+TP4 row)."""
    mesh = parallel.make_mesh((1, -1, 4), aot.tpu_slice("v6e-256").devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "tensor": 4}
    assert len({d.id for d in mesh.devices.flat}) == 256


@needs_libtpu
def test_nmt_and_xnli_programs_compile(tmp_path):
    tpu = aot.tpu_slice("v5e:2x2")
    nmt_config = tiny_nmt(batch_size=4, eval_batch_size=4, length_buckets="16,32")
    nmt_config.init_checkpoint = ""  # a random encoder sized by the config
    reports = aot.check(nmt_config, "nmt", tpu, only=("bt", "greedy"), log=lambda _: None)
    assert [r["program"] for r in reports] == ["bt", "greedy"] and all(r["fits"] for r in reports)
    assert reports[0]["batch"] == (4, 32)  # the largest bucket
    x = xnli.default_config()
    x.model.emb_dim, x.model.n_layers, x.tokenizer.vocab_size = 32, 1, 300
    x.batch_size, x.eval_batch_size, x.max_len = 4, 4, 16
    (report,) = aot.check(x, "xnli", tpu, only=("xnli",), log=lambda _: None)
    assert report["fits"] and report["batch"] == (4, 32)  # 2 * max_len - 1 -> 32


@needs_libtpu
def test_cli_fails_clearly_when_a_program_does_not_fit():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "xlm_jax.tools.aot",
            "--config=configs/demo.py",
            "--topology=v5e:2x2",
            "--programs=mlm",
            "--hbm_fraction=0.000001",
            "--config.model.n_layers=1",
            "--config.model.emb_dim=32",
            "--config.tokenizer.vocab_size=300",
        ],
        capture_output=True,
        text=True,
        env=CPU_ENV,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert "mlm" in run.stdout and "DOES NOT FIT" in run.stdout
    assert "error: mlm does not fit on TPU v5e: needs" in run.stderr
    assert "the budget is 0.00 GiB" in run.stderr


def _stub(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("check_rc", [1, 0])
def test_tpu_pod_launcher_compiles_first_and_stops_if_that_fails(tmp_path, check_rc):
    """launch/tpu_pod.sh asks gcloud for the slice type, runs the compile check here with the
    run's --config/--mode arguments, and starts nothing on the workers when it fails."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(
        bin_dir / "gcloud",
        f'echo "gcloud $*" >> {calls}\ncase "$*" in *describe*) echo v5litepod-8;; esac\n',
    )
    check = _stub(tmp_path / "check", f'echo "check $*" >> {calls}\nexit {check_rc}\n')
    env = {
        **CPU_ENV,
        "PATH": f"{bin_dir}:{CPU_ENV['PATH']}",
        "TPU_NAME": "pod",
        "ZONE": "z",
        "AOT_PYTHON": str(check),
    }
    run = subprocess.run(
        [
            "bash",
            "launch/tpu_pod.sh",
            "--",
            "--config=configs/demo.py",
            "--workdir=/w",
            "--mode=xnli_sweep",
            "--config.batch_size=8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm describe pod --zone=z")
    assert lines[1] == (
        "check -m xlm_jax.aot --topology=v5litepod-8 --mode=xnli "
        "--config=configs/demo.py --config.batch_size=8"
    )
    if check_rc:
        assert run.returncode == 3 and len(lines) == 2, run.stderr
        assert "nothing was started on pod" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert lines[2].startswith("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all")
