"""Sharded training equals single-device training: meshes, shardings, restore across meshes,
multi-process. Runs happen in subprocesses, each with the device count it needs (8 emulated
CPU devices by XLA_FLAGS, or 2 processes x 2 devices through launch/local.sh)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import xla_flags
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]

# A model every mesh axis of size 8 divides: 8 heads, embed 64, mlp 256, vocabulary 256.
MESH_CONFIG = {
    "model.emb_dim": 64,
    "model.n_heads": 8,
    "tokenizer.vocab_size": 256,
    "batch_size": 8,
    "tlm_batch_size": 8,
    "eval_batch_size": 8,
    "max_steps": 4,
    "eval_every": 2,
    "checkpoint_every": 2,
}
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
TOL = 1e-5
# 8 emulated devices share 2 cores: a collective can wait long for its last thread. XLA:CPU
# aborts after 40 s by default; on a loaded machine that is slowness, not a deadlock.
SLOW_COLLECTIVES = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
    "--xla_cpu_collective_timeout_seconds=900"
)


def _run_jobs(tmp: Path, jobs: list[dict], devices: int) -> None:
    spec = tmp / f"jobs_{len(list(tmp.glob('jobs_*')))}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = xla_flags(
        f"--xla_force_host_platform_device_count={devices}", SLOW_COLLECTIVES
    )
    # A run resumed on a mesh compiles what an earlier job on that mesh did: reuse it.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    out = subprocess.run(
        [sys.executable, "-m", "tests.parallel_worker", str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]


def _job(tmp: Path, name: str, **overrides) -> dict:
    return {
        "workdir": str(tmp / name),
        "out": str(tmp / f"{name}.npz"),
        "overrides": {**MESH_CONFIG, **overrides},
    }


def _losses(workdir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for rec in read_jsonl(workdir / "metrics.jsonl"):
        losses = {k: v for k, v in rec.items() if k.endswith("/loss")}
        if losses:
            out[rec["step"]] = {**out.get(rec["step"], {}), **losses}
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) and la
    for step in la:
        assert la[step].keys() == lb[step].keys()
        for key, value in la[step].items():
            assert lb[step][key] == pytest.approx(value, rel=TOL, abs=TOL), (step, key)


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = np.load(a), np.load(b)
    names = [k for k in pa.files if not k.startswith("__")]
    assert names == [k for k in pb.files if not k.startswith("__")]
    for k in names:
        np.testing.assert_allclose(pa[k], pb[k], rtol=TOL, atol=TOL, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-device reference run, the same run on four 8-device meshes, and a run saved on
    (8,1,1) then resumed on (2,2,2): all made once for the tests below."""
    tmp = tmp_path_factory.mktemp("parallel")
    _run_jobs(tmp, [_job(tmp, "single", **{"mesh.shape": [1, 1, 1]})], devices=1)
    jobs = [_job(tmp, "mesh_" + "x".join(map(str, m)), **{"mesh.shape": list(m)}) for m in MESHES]
    jobs.append(_job(tmp, "resumed", **{"mesh.shape": [8, 1, 1], "max_steps": 2}))
    jobs.append(_job(tmp, "resumed", **{"mesh.shape": [2, 2, 2]}))
    _run_jobs(tmp, jobs, devices=8)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_mesh_matches_single_device(runs, mesh):
    name = "mesh_" + "x".join(map(str, mesh))
    _assert_same_run(runs / "single", runs / name)
    _assert_same_params(runs / "single.npz", runs / f"{name}.npz")


@pytest.mark.slow
def test_alternation_never_recompiles_on_a_mesh(runs):
    # train: masked MLM + masked TLM; eval: masked (both lengths are 48 vs 32: two shapes)
    single = int(np.load(runs / "single.npz")["__compiled__"])
    for mesh in MESHES:
        name = "mesh_" + "x".join(map(str, mesh))
        assert int(np.load(runs / f"{name}.npz")["__compiled__"]) == single == 4


@pytest.mark.slow
def test_parameter_shardings_follow_the_rules(runs):
    specs = json.loads(str(np.load(runs / "mesh_2x2x2.npz")["__specs__"]))
    expected = {
        # (vocab, embed): vocab over tensor, embed over fsdp
        "params['embeddings']['embedding']": ["tensor", "fsdp"],
        # (embed, heads, kv): Megatron column split over tensor, FSDP over embed
        "params['layer_0']['attention']['query']['kernel']": ["fsdp", "tensor", None],
        # (heads, kv, embed): row split
        "params['layer_0']['attention']['out']['kernel']": ["tensor", None, "fsdp"],
        "params['layer_0']['ffn']['lin1']['kernel']": ["fsdp", "tensor"],
        "params['layer_0']['ffn']['lin2']['kernel']": ["tensor", "fsdp"],
        "params['layer_0']['layer_norm1']['scale']": ["fsdp"],
        "params['position_embeddings']['embedding']": [None, "fsdp"],
    }
    for name, spec in expected.items():
        assert specs[name] == spec, name
    # the optimizer's moments are sharded like their parameters (FSDP shards optimizer state)
    moments = {
        k: v for k, v in specs.items() if k.startswith("opt") and "['embeddings']['embedding']" in k
    }
    assert moments and all(v == ["tensor", "fsdp"] for v in moments.values())


@pytest.mark.slow
def test_restore_on_another_mesh_continues_the_run(runs):
    # saved on (8,1,1) at step 2, resumed on (2,2,2): the same run as the single-device one
    _assert_same_run(runs / "single", runs / "resumed")
    _assert_same_params(runs / "single.npz", runs / "resumed.npz")


@pytest.mark.slow
def test_restore_on_one_device(runs, tmp_path):
    """A checkpoint written on 8 devices resumes in a 1-device process."""
    import shutil

    work = tmp_path / "to_one"
    shutil.copytree(runs / "mesh_8x1x1", work)
    # drop the final checkpoint so the run resumes from step 2 and redoes 3..4 on one device
    ckpt = Checkpointer(work / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    shutil.rmtree(work / "checkpoints" / "4")
    job = _job(tmp_path, "to_one", **{"mesh.shape": [1, 1, 1]})
    _run_jobs(tmp_path, [job], devices=1)
    _assert_same_params(runs / "single.npz", tmp_path / "to_one.npz")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """launch/local.sh: 2 processes x 2 CPU devices (gloo) give the 4-device single-process run."""
    overrides = [
        "--config.max_steps=6",
        "--config.log_every=1",
        "--config.eval_every=3",
        "--config.checkpoint_every=3",
        "--config.model.n_layers=1",
        "--config.model.emb_dim=32",
        "--config.model.n_heads=4",
        "--config.tokenizer.vocab_size=300",
        "--config.batch_size=8",
        "--config.tlm_batch_size=8",
        "--config.eval_batch_size=8",
        "--config.bptt=32",
        "--config.tlm_length=48",
        "--config.mesh.shape=(4,1,1)",
        "--config.tensorboard=false",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, "LOG_DIR": str(tmp_path)}
    multi = subprocess.run(
        [
            "bash",
            "launch/local.sh",
            "2",
            "--devices-per-process",
            "2",
            "--timeout",
            "600",
            "--",
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'multi'}",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "xlm_jax.main",
            "--config=configs/demo.py",
            "--cpu_devices=4",
            f"--workdir={tmp_path / 'single'}",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    _assert_same_run(tmp_path / "single", tmp_path / "multi")
    # each process read its own rows of the prepared data: half of the windows and pairs each
    reads = [_reads((tmp_path / f"process_{i}.log").read_text()) for i in range(2)]
    whole = _reads(single.stderr)
    assert reads[0] == reads[1] == (whole[0] // 2, whole[1] // 2) and min(whole) > 0
    # both processes wrote one checkpoint together; it equals the single process's
    a = Checkpointer(tmp_path / "single" / "checkpoints").restore_numpy()
    b = Checkpointer(tmp_path / "multi" / "checkpoints").restore_numpy()
    flat_a, flat_b = _flatten(a["params"]), _flatten(b["params"])
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_allclose(flat_a[k], flat_b[k], rtol=TOL, atol=TOL, err_msg=k)


def _reads(log: str) -> tuple[int, int]:
    """(stream windows, sentence pairs) that the process of ``log`` read (pretrain's last log)."""
    m = re.search(r"read (\d+) stream windows and (\d+) sentence pairs of prepared data", log)
    assert m, log[-2000:]
    return int(m[1]), int(m[2])


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: tree}


NMT_MESH_CONFIG = {
    "model.emb_dim": 64,
    "model.n_heads": 8,
    "tokenizer.vocab_size": 256,
    "batch_size": 8,
    "eval_batch_size": 8,
    "max_steps": 6,
    "length_buckets": "96",  # one shape per program: compiles on 8 devices dominate
    "log_every": 1,
    "checkpoint_every": 6,
}


@pytest.mark.slow
def test_translation_on_a_mesh_matches_single_device(tmp_path):
    """AE, MT and BT steps (BT generates on the mesh) on (2,2,2): same losses and parameters."""
    if not (REPO.parent / "shared" / "data" / "multi30k" / "train.en").exists():
        pytest.skip("no Multi30k data")

    def job(name, mesh):
        return {
            "mode": "nmt",
            "workdir": str(tmp_path / name),
            "out": str(tmp_path / f"{name}.npz"),
            "overrides": {**NMT_MESH_CONFIG, "mesh.shape": mesh},
        }

    _run_jobs(tmp_path, [job("single", [1, 1, 1])], devices=1)
    _run_jobs(tmp_path, [job("mesh", [2, 2, 2])], devices=8)
    _assert_same_run(tmp_path / "single", tmp_path / "mesh")
    _assert_same_params(tmp_path / "single.npz", tmp_path / "mesh.npz")
