"""Stopping and faults: preemption checkpoints and resumes exactly; NaN steps are skipped."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import CPU_ENV, demo_command, tiny_config, xla_flags
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.metrics import read_jsonl
from xlm_jax.core.preemption import EXIT_PREEMPTED, Preempted
from xlm_jax.tasks import pretrain

REPO = Path(__file__).resolve().parents[1]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    seen = {}
    config = tiny_config(max_steps=8, eval_every=0, debug_nonfinite_steps="3,4")
    pretrain.train_and_evaluate(
        config, tmp_path, on_step=lambda s, st: seen.setdefault(s, jax.device_get(st))
    )
    logs = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert [logs[s]["train/skipped_updates"] for s in range(1, 9)] == [0, 0, 0, 1, 1, 0, 0, 0]
    # loop steps 3 and 4 (logged as 4 and 5) changed nothing: parameters and the update count
    jax.tree.map(np.testing.assert_array_equal, seen[3].params, seen[5].params)
    assert int(seen[3].step) == int(seen[5].step) == 3 and int(seen[8].step) == 6
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(seen[8].params))


def test_too_many_nonfinite_steps_stop_the_run_naming_the_verified_good_checkpoint(tmp_path):
    config = tiny_config(
        max_steps=12,
        eval_every=0,
        checkpoint_every=1,
        keep_checkpoints=1,
        max_nonfinite_steps=4,
        debug_nonfinite_steps="4,5,6,7,8",
    )
    with pytest.raises(FloatingPointError, match="4 consecutive steps with a non-finite loss") as e:
        pretrain.train_and_evaluate(config, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    # keep-last-1 kept 4 too: the newest checkpoint saved with no update being skipped
    assert ckpt.all_steps() == [4, 7] and ckpt.newest_good() == 4
    message = str(e.value)
    assert "The newest verified good checkpoint is 4" in message
    assert "checkpoints [7] were saved while updates were being skipped" in message
    aside = tmp_path / "checkpoints_superseded"
    assert f"mkdir -p {aside} && mv {tmp_path / 'checkpoints' / '7'} {aside}/" in message
    subprocess.run(message.split("and rerun: ")[1], shell=True, check=True)  # the advice works
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4
    state = ckpt.restore_numpy(4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_stop_request_checkpoints_and_resume_is_exact(tmp_path, monkeypatch):
    full = {}
    pretrain.train_and_evaluate(
        tiny_config(max_steps=10),
        tmp_path / "full",
        on_step=lambda s, st: full.setdefault(s, jax.device_get(st.params)),
    )
    # stop at step 4 as a SIGTERM would: the guard's flag is set, the loop saves and raises
    from xlm_jax.core import preemption

    real = preemption.PreemptionGuard.should_stop
    monkeypatch.setattr(
        preemption.PreemptionGuard, "should_stop", lambda self, step: step == 4 or real(self, step)
    )
    with pytest.raises(Preempted, match="stopped at step 4"):
        pretrain.train_and_evaluate(tiny_config(max_steps=10), tmp_path / "split")
    monkeypatch.undo()
    assert Checkpointer(tmp_path / "split" / "checkpoints").latest_step() == 4
    resumed = {}
    pretrain.train_and_evaluate(
        tiny_config(max_steps=10),
        tmp_path / "split",
        on_step=lambda s, st: resumed.setdefault(s, jax.device_get(st.params)),
    )
    assert min(resumed) == 5
    jax.tree.map(np.testing.assert_array_equal, full[10], resumed[10])


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_the_preempted_code(tmp_path):
    cmd = demo_command(
        tmp_path,
        "--config.max_steps=100000",
        "--config.log_every=1",
        "--config.eval_every=0",
        "--config.checkpoint_every=100000",
    )
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until it trains (a progress line per step)
        line = proc.stdout.readline()
        if line.startswith("step 5/"):
            break
    else:
        proc.kill()
        pytest.fail("the run did not reach step 5")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "checkpoint is saved, rerun to resume" in err
    step = Checkpointer(tmp_path / "checkpoints").latest_step()
    assert step is not None and step >= 5


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    full = {}
    pretrain.train_and_evaluate(
        tiny_config(max_steps=12),
        tmp_path / "full",
        on_step=lambda s, st: full.setdefault(s, jax.device_get(st.params)),
    )
    work = tmp_path / "damaged"
    pretrain.train_and_evaluate(tiny_config(max_steps=12), work)
    assert Checkpointer(work / "checkpoints").all_steps() == [6, 12]
    files = [f for f in (work / "checkpoints" / "12" / "state").rglob("*") if f.is_file()]
    assert files
    if damage == "bitflip":  # one bit in the middle of the largest array file: it still reads
        f = max(files, key=lambda f: f.stat().st_size)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x04
        f.write_bytes(bytes(data))
    else:  # every array file of the newest checkpoint emptied
        for f in files:
            f.write_bytes(b"")
    caplog.set_level("WARNING")
    resumed = {}
    pretrain.train_and_evaluate(
        tiny_config(max_steps=12),
        work,
        on_step=lambda s, st: resumed.setdefault(s, jax.device_get(st.params)),
    )
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert (
        warnings
        and "checkpoint 12" in warnings[0]
        and "falling back to checkpoint 6" in warnings[0]
    )
    if damage == "bitflip":  # only the fingerprints see it: it would restore without a word
        assert "IntegrityError: checkpoint 12: the checksums of 1 arrays" in warnings[0]
    assert min(resumed) == 7  # redone from step 6
    jax.tree.map(np.testing.assert_array_equal, full[12], resumed[12])


SIZE_CHECKS = """
import json, os, sys
from tests.conftest import override, tiny_config, tiny_nmt
from tests.test_xnli import _finetune_config
from xlm_jax.tasks import nmt, pretrain, xnli

root = sys.argv[1]
modes = {
    "pretrain": (pretrain.train_and_evaluate, tiny_config),
    "nmt": (nmt.train_and_evaluate, tiny_nmt),
    "xnli": (xnli.finetune, lambda **kw: _finetune_config("/no/pretraining", **kw)),
}
cases = {
    "mesh": {"mesh.shape": (3, 1, 1)},
    "batch": {"mesh.shape": (2, 1, 1), "batch_size": 3},
    "eval_batch": {"mesh.shape": (2, 1, 1), "eval_batch_size": 5},
}
out = {}
for mode, (run, make) in modes.items():
    for case, overrides in cases.items():
        workdir = os.path.join(root, mode + "_" + case)
        try:  # data that does not exist: the size check must come first
            run(override(make(**overrides), **{"data.root": "/no/data"}), workdir)
            out[mode + " " + case] = "ran"
        except Exception as e:
            out[mode + " " + case] = [type(e).__name__, str(e), sorted(os.listdir(workdir))]
print("RESULT" + json.dumps(out))
"""


def test_mesh_and_batch_sizes_that_do_not_divide_are_refused_first(tmp_path):
    """On 2 devices, every mode refuses a mesh the devices do not fill and a batch the batch
    split does not divide, with a message naming the setting, before reading any data (here
    missing) and with nothing written to the workdir."""
    env = {**CPU_ENV, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")}
    proc = subprocess.run(
        [sys.executable, "-c", SIZE_CHECKS, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "RESULT" in proc.stdout, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    split = "2-way batch split of Mesh('data': 2, 'fsdp': 1, 'tensor': 1"
    for mode in ("pretrain", "nmt", "xnli"):
        assert out[f"{mode} mesh"] == [
            "ValueError",
            "mesh shape {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, but there are 2",
            [],
        ]
        kind, msg, written = out[f"{mode} batch"]
        assert kind == "ValueError" and msg.startswith(
            f"batch_size=3 is not divisible by the {split}"
        )
        assert written == []
        kind, msg, written = out[f"{mode} eval_batch"]
        assert kind == "ValueError" and msg.startswith(
            f"eval_batch_size=5 is not divisible by the {split}"
        )
        assert written == []
