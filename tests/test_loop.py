"""The one loop (`core/loop.py`), as every task gets it: a task that is not XLM plugs in and
resumes exactly; translation and XNLI log tokens/s, TFLOP/s and MFU and fall back past an
unreadable checkpoint, as pretraining does (tests/test_train.py, tests/test_reliability.py)."""

import json
import os

import jax
import numpy as np
import pytest

from tests import toy_task
from tests.conftest import needs_xnli, tiny_config, tiny_nmt
from tests.test_old_workdirs import needs_multi30k, xnli_config
from xlm_jax.core import loop
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.metrics import read_jsonl
from xlm_jax.core.preemption import Preempted
from xlm_jax.tasks import nmt, pretrain, xnli

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")


def params_by_step(into: dict):
    return lambda step, state: into.setdefault(step, jax.device_get(state.params))


def stop_at(n: int):
    def hook(step, state):
        if step == n:
            raise Preempted(step)

    return hook


def test_a_new_task_plugs_in_and_resumes_exactly(tmp_path):
    config = toy_task.default_config()
    full: dict = {}
    last = loop.run(toy_task.TASK, config, tmp_path / "full", on_step=params_by_step(full))
    assert (
        last["valid/loss"]
        < 0.5 * read_jsonl(tmp_path / "full" / "metrics.jsonl")[0]["train/fit/loss"]
    )
    assert last["compiled_programs"] == 1

    work, resumed = tmp_path / "split", {}
    with pytest.raises(Preempted):
        loop.run(toy_task.TASK, config, work, on_step=stop_at(7))  # crashes after step 7
    # every 3 steps, after each evaluation (4), the last 2 kept
    assert Checkpointer(work / "checkpoints").all_steps() == [4, 6]
    again = loop.run(toy_task.TASK, config, work, on_step=params_by_step(resumed))
    assert min(resumed) == 7  # from the checkpoint at step 6
    for step in resumed:
        jax.tree.map(np.testing.assert_array_equal, full[step], resumed[step])
    assert again["valid/loss"] == last["valid/loss"]
    best = Checkpointer(work / "checkpoints", best_metric="valid/loss", best_mode="min")
    assert best.best_step() in (4, 8, 12)


def test_eval_only_reproduces_the_logged_evaluations(tmp_path):
    """XLM's --eval_only: a checkpoint's evaluation equals the one logged when it was saved,
    for the latest, the best and a given step; nothing in the workdir's checkpoints changes."""
    config = toy_task.default_config()
    config.best_metric = "valid/loss, train_loss_unused:max"  # a second one, never measured...
    with pytest.raises(ValueError, match="train_loss_unused"):  # ...is refused before training
        loop.run(toy_task.TASK, config, tmp_path / "refused")
    config.best_metric, config.keep_checkpoints = "valid/loss", 4
    loop.run(toy_task.TASK, config, tmp_path)
    logged = {
        r["step"]: r["valid/loss"]
        for r in read_jsonl(tmp_path / "metrics.jsonl")
        if "valid/loss" in r
    }
    ckpt = Checkpointer(tmp_path / "checkpoints", best_metric="valid/loss")
    steps, best = ckpt.all_steps(), ckpt.best_step()
    config.eval_only = True
    assert 8 in steps  # an evaluated step before the latest
    for which, step in [("latest", steps[-1]), ("best", best), ("8", 8)]:
        config.eval_checkpoint = which
        result = loop.run(toy_task.TASK, config, tmp_path)
        assert result == {"step": step, "valid/loss": logged[step]}, which
        saved = json.loads((tmp_path / "eval_only" / f"step_{step}.json").read_text())
        assert saved == result
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == steps
    config.eval_checkpoint = "5"
    with pytest.raises(ValueError, match="eval_checkpoint='5': no such checkpoint"):
        loop.run(toy_task.TASK, config, tmp_path)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        loop.run(toy_task.TASK, config, tmp_path / "empty")


def _xlm_epoch_steps(epoch_size: int, batch_size: int, steps_per_iteration: int) -> int:
    """XLM's train.py: ``while n_sentences < epoch_size`` runs whole iterations, each step
    adding ``batch_size`` to n_sentences."""
    n_sentences = steps = 0
    while n_sentences < epoch_size:
        for _ in range(steps_per_iteration):
            n_sentences += batch_size
            steps += 1
    return steps


@pytest.mark.parametrize("k", [1, 4, 10])
def test_xlm_epochs_as_cadence(k):
    config = toy_task.default_config()
    for epoch_size in (1, 31, 32, 1000, 200_000):
        expected = _xlm_epoch_steps(epoch_size, 32, k)
        assert loop.xlm_epoch(epoch_size, 32, k) == expected
        config.batch_size, config.epoch_size, config.max_epoch = 32, epoch_size, 3
        cadence = loop.Cadence.of(config, k)
        assert (cadence.eval_every, cadence.max_steps) == (expected, 3 * expected)
    config.epoch_size = -1  # off: steps as configured
    assert loop.Cadence.of(config, k).eval_every == config.eval_every


def test_the_host_waits_for_the_update_in_flight_steps_back():
    """Dispatch is asynchronous: adding update n to the window waits for update n - IN_FLIGHT,
    so a stop request never waits for more than IN_FLIGHT queued updates before its checkpoint."""
    finished = []

    class Pending:  # a device result: block_until_ready marks it finished
        def __init__(self, n):
            self.n = n

        def block_until_ready(self):
            finished.append(self.n)
            return self

    window = loop.Window({}, guard=lambda flags: None, observe=None)
    for n in range(6):
        window.add("mlm", {"loss": Pending(n)}, tokens=1, flops=1.0)
        assert finished == list(range(max(0, n + 1 - loop.IN_FLIGHT)))
    assert loop.IN_FLIGHT == 2


def damage_newest(checkpoints) -> int:
    """Garbles every array file of the newest checkpoint; returns its step."""
    step = Checkpointer(checkpoints).latest_step()
    for f in (checkpoints / str(step) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(os.urandom(f.stat().st_size))
    return step


def check_rates_and_fallback(run, config, work, caplog, previous: int) -> dict:
    """One run; its throughput log; then the same run resumed from a garbled newest checkpoint
    falls back to ``previous`` and ends with the same parameters."""
    config.peak_flops_per_device = 1e9
    full: dict = {}
    first = run(config, work, on_step=params_by_step(full))
    logged = [r for r in read_jsonl(work / "metrics.jsonl") if "train/skipped_updates" in r]
    assert "train/mfu" not in logged[0]  # the first window includes compilation
    for r in logged[1:]:
        assert r["train/tokens_per_s"] > 0 and r["train/tflops_per_device"] > 0
        assert r["train/mfu"] == pytest.approx(r["train/tflops_per_device"] * 1e12 / 1e9)

    newest = damage_newest(work / "checkpoints")
    caplog.set_level("WARNING")
    resumed: dict = {}
    again = run(config, work, on_step=params_by_step(resumed))
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert f"checkpoint {newest}" in warnings[0]
    assert f"falling back to checkpoint {previous}" in warnings[0]
    assert min(resumed) == previous + 1
    jax.tree.map(np.testing.assert_array_equal, full[newest], resumed[newest])
    return first, again


@needs_multi30k
def test_translation_logs_mfu_and_falls_back_past_an_unreadable_checkpoint(tmp_path, caplog):
    # denoising only, at one length bucket: one compiled step (the three kinds and the buckets
    # are tests/test_nmt.py's)
    config = tiny_nmt(
        init_checkpoint="",
        max_steps=8,
        checkpoint_every=4,
        mt_steps="",
        bt_steps="",
        length_buckets="160",
    )
    first, again = check_rates_and_fallback(
        nmt.train_and_evaluate, config, tmp_path, caplog, previous=4
    )
    assert again["train/ae_fr/loss"] == first["train/ae_fr/loss"]


@needs_xnli
def test_xnli_logs_mfu_and_falls_back_past_an_unreadable_checkpoint(tmp_path, caplog):
    config = xnli_config()
    config.keep_checkpoints = 2  # updates 40 and 50 (and the best epoch's)
    first, again = check_rates_and_fallback(xnli.finetune, config, tmp_path, caplog, previous=40)
    assert again["history"] == first["history"]


def test_evaluators_are_chosen_by_name_in_the_config(tmp_path):
    # the retrieval probe runs during pretraining, every 2nd evaluation, beside the validation
    config = tiny_config(
        max_steps=8,
        eval_every=2,
        mlm_steps="en,fr",
        evals="valid,retrieval@2",
        probe_pairs="fr-en: val.fr|val.en",
        probe_layer=0,  # the embeddings' output: the probe reads any layer
    )
    config.best_metric = "retrieval/avg"
    config.best_mode = "max"
    pretrain.train_and_evaluate(config, tmp_path)
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "valid/mlm_fr/loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert ["retrieval/fr-en" in r for r in evals] == [False, True, False, True]
    for r in evals[1::2]:
        assert 0 <= r["retrieval/fr-en"] <= 100 and r["retrieval/avg"] == r["retrieval/fr-en"]

    bad = [
        {"evals": "valid,bleu", "error": "no evaluator 'bleu'"},
        {"evals": "retrieval@0", "error": "NAME@K"},
        {"probe_layer": 2, "error": r"probe_layer=2: the encoder has layers 1\.\.1"},
    ]
    for settings in bad:
        error = settings.pop("error")
        with pytest.raises(ValueError, match=error):
            pretrain.train_and_evaluate(tiny_config(**settings), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before anything ran
