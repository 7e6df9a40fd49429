"""What the loop refuses before it trains (issue "never lose a good checkpoint", part): settings
that cannot work, a silent restart over unreadable checkpoints; and a stop requested while it
starts. On the toy task of tests/toy_task.py (milliseconds) and the tasks' own checks (language
codes among them: a typo is refused before anything is read)."""

import os
import signal

import pytest

from tests import toy_task
from tests.conftest import tiny_config
from tests.test_loop import params_by_step
from xlm_jax.core import loop
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.preemption import Preempted
from xlm_jax.data import corpus
from xlm_jax.data.sources import DataError
from xlm_jax.tasks import nmt, pretrain, registry, xnli
from xlm_jax.text.languages import KNOWN
from xlm_jax.tools import config_doc, tutorial

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
        (pretrain, {"langs": "en,fx"}, r"langs: \['fx'\] not in the known language codes"),
        (nmt, {"langs": "en,fx"}, r"langs: \['fx'\] not in the known language codes"),
    ],
)
def test_task_settings_that_cannot_work_are_refused_first(tmp_path, run, overrides, message):
    config = tiny_config() if run is pretrain else nmt.default_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        run.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def xnli_config(**overrides):
    c = xnli.default_config()
    c.data.train, c.data.valid = "en: train.tsv", "en: valid.tsv; fr: valid.tsv"
    c.update_from_flattened_dict(overrides)
    return c


# Each mode's up-front check (what loop.prepare calls before anything is read), and its config.
CHECKS = {
    "pretrain": (pretrain.TASK.check, tiny_config),
    "nmt": (nmt.TASK.check, nmt.default_config),
    "xnli": (xnli.TASK.check, xnli_config),
}


@pytest.mark.parametrize("mode", CHECKS)
def test_a_language_code_typo_is_refused_with_near_codes_and_the_way_out(mode):
    check, make = CHECKS[mode]
    config = make()
    config.langs = "en,fx"
    with pytest.raises(DataError) as refused:
        check(config)
    message = str(refused.value)
    assert message.startswith("langs: ['fx'] not in the known language codes"), message
    suggested = message.split("'fx': did you mean ")[1].split("?")[0].split(", ")
    assert "fr" in suggested and set(suggested) <= KNOWN, message
    assert "--config.new_langs=fx" in message

    config.new_langs = "fx"  # a language the list does not have, said so
    check(config)
    config.langs = "en,zh_classical"  # XLM-100's codes have "_"
    config.new_langs = ""
    check(config)


@pytest.mark.parametrize(
    "langs, message",
    [
        ("en,EN", r"\['EN'\] not in the known .*'EN': did you mean en,"),  # case matters
        ("en,en-fr", r"langs \['en-fr'\]: a language code is letters, digits and '_'"),
        ("en,qqqq", r"\['qqqq'\] not in the known .*languages\.py\)\. A language"),  # none near
    ],
)
def test_language_codes_are_refused_by_their_shape_and_the_known_list(langs, message):
    with pytest.raises(DataError, match=message):
        pretrain.check(tiny_config(langs=langs))


@pytest.mark.parametrize(
    "overrides, where",
    [
        ({"data.valid": "en: v.tsv; fx: v.tsv"}, "data.valid"),
        ({"data.test": "fx: t.tsv"}, "data.test"),
        ({"data.translate_test": "fx: t.tsv"}, "data.translate_test"),
        ({"select_lang": "fx"}, "select_lang"),
    ],
)
def test_xnli_refuses_an_unknown_language_in_its_data_before_reading_it(overrides, where):
    with pytest.raises(DataError, match=rf"^{where}: \['fx'\] not in the known .*new_langs=fx"):
        xnli.TASK.check(xnli_config(**overrides))
    xnli.TASK.check(xnli_config(new_langs="fx", **overrides))


# By config family (registry.families); the retrieval probe has no loop: its languages only.
FAMILY_CHECKS = {
    "Pretraining": pretrain.TASK.check,
    "XNLI fine-tuning": xnli.TASK.check,
    "Retrieval probe": corpus.checked_langs,
    "Translation": nmt.TASK.check,
}


@pytest.mark.parametrize(
    "path", sorted(tutorial.repo_root().glob("configs/[!_]*.py")), ids=lambda p: p.stem
)
def test_every_config_file_passes_its_modes_check(path):
    config = tutorial.load_config(str(path))
    keys = set(config_doc.flatten(config))
    (title,) = [t for t, _, fn in registry.families() if set(config_doc.flatten(fn())) == keys]
    FAMILY_CHECKS[title](config)


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
