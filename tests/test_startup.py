"""What the loop refuses before it trains (issue "never lose a good checkpoint", part): settings
that cannot work, a silent restart over unreadable checkpoints; and a stop requested while it
starts. On the toy task of tests/toy_task.py (milliseconds) and pretraining's own checks."""

import os
import signal

import pytest

from tests import toy_task
from tests.conftest import tiny_config
from tests.test_loop import params_by_step
from xlm_jax.core import loop
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.preemption import Preempted
from xlm_jax.tasks import nmt, pretrain

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")


def toy(**overrides):
    c = toy_task.default_config()
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"log_every": 0}, "log_every=0: must be at least 1"),
        ({"max_steps": 0}, "max_steps=0: must be at least 1"),
        ({"max_steps": -1}, "max_steps=-1: must be at least 1"),
        ({"eval_every": -2}, "eval_every=-2: must be at least 0"),
        ({"checkpoint_every": -1}, "checkpoint_every=-1: must be at least 0"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0: must be at least 1"),
        ({"batch_size": 0}, "batch_size=0: a batch needs at least one row"),
    ],
)
def test_loop_settings_that_cannot_work_are_refused_first(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        loop.run(toy_task.TASK, toy(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # nothing written


@pytest.mark.parametrize(
    "run, overrides, message",
    [
        (pretrain, {"bptt": 65}, r"bptt=65: rows need 1..model.max_positions=64"),
        (pretrain, {"tlm_length": 100}, r"tlm_length=100: rows need 1..model.max_positions=64"),
        (pretrain, {"optimizer.lr": -1.0}, r"optimizer.lr=-1.0: a learning rate must be >= 0"),
        (nmt, {"optimizer.lr": -1.0}, r"optimizer.lr=-1.0: a learning rate must be >= 0"),
    ],
)
def test_task_settings_that_cannot_work_are_refused_first(tmp_path, run, overrides, message):
    config = tiny_config() if run is pretrain else nmt.default_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        run.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoint_every_zero_saves_after_evaluations_and_at_the_end(tmp_path):
    loop.run(toy_task.TASK, toy(checkpoint_every=0, max_steps=10, keep_checkpoints=5), tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [4, 8, 10]


def garble_metadata(checkpoints) -> list[int]:
    steps = Checkpointer(checkpoints).all_steps()
    for step in steps:
        for f in (checkpoints / str(step) / "meta").rglob("*"):
            if f.is_file():
                f.write_bytes(b"\x00not json")
    return steps


def test_unreadable_checkpoints_are_never_a_silent_restart(tmp_path):
    config = toy()
    loop.run(toy_task.TASK, config, tmp_path)
    steps = garble_metadata(tmp_path / "checkpoints")
    assert steps == [9, 12]
    seen: dict = {}
    with pytest.raises(RuntimeError, match=r"Refusing to start over.*restart_from_scratch=true"):
        loop.run(toy_task.TASK, config, tmp_path, on_step=params_by_step(seen))
    assert not seen and Checkpointer(tmp_path / "checkpoints").all_steps() == steps

    # Asked for explicitly: the unreadable ones are set aside, the run starts from step 0.
    loop.run(toy_task.TASK, toy(restart_from_scratch=True), tmp_path, on_step=params_by_step(seen))
    assert min(seen) == 1
    aside = sorted(p.name for p in (tmp_path / "checkpoints_unreadable").iterdir())
    assert aside == ["12", "9"]


def test_a_rerun_after_every_checkpoint_was_set_aside_refuses_to_start_over(tmp_path):
    config = toy()
    loop.run(toy_task.TASK, config, tmp_path)
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and "/state/" in str(f):
            f.write_bytes(b"")  # every array file of every checkpoint truncated
    with pytest.raises(RuntimeError, match="can be restored"):
        loop.run(toy_task.TASK, config, tmp_path)  # each tried, each set aside
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == []
    seen: dict = {}
    with pytest.raises(RuntimeError, match=r"set aside earlier as unreadable: \['12', '9'\]"):
        loop.run(toy_task.TASK, config, tmp_path, on_step=params_by_step(seen))  # a retry
    assert not seen


def test_a_stop_requested_while_starting_ends_with_preempted_and_nothing_written(tmp_path):
    def setup_interrupted(config, env):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while data is read
        return toy_task.setup(config, env)

    before = signal.getsignal(signal.SIGTERM)
    task = loop.Task("toy", setup_interrupted, toy_task.TASK.batch_sizes)
    with pytest.raises(Preempted, match="while starting .* nothing was written"):
        loop.run(task, toy(), tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == []
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
