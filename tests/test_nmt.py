"""Translation mode: step lists, input checks, learning, exact resume, init from pretraining, the
translate command."""

import dataclasses
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from tests.conftest import CPU_ENV, SHARED_DATA, tiny_nmt, write_lines
from tests.test_faults import committed_steps, disk_full_for, orbax_threads_wind_down
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.data.sources import DataError
from xlm_jax.model import pretrained as pretrained_lib
from xlm_jax.model.encoder import ModelConfig
from xlm_jax.tasks import nmt
from xlm_jax.text import bleu
from xlm_jax.text.tokenizer import train_tokenizer

M30K = SHARED_DATA / "multi30k"
needs_m30k = pytest.mark.skipif(not (M30K / "train.en").exists(), reason="no Multi30k data")
# a failed orbax save (the disk-full test) leaves a coroutine unawaited; Python reports it in
# whichever test runs next
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")


def test_steps_follow_xlm_order_and_reject_bad_lists():
    c = tiny_nmt(ae_steps="fr,en", mt_steps="fr-en", bt_steps="en-fr-en")
    keys = [e.key for e in nmt.parse_entries(c, ["en", "fr"])]
    assert keys == ["ae_fr", "ae_en", "mt_fr-en", "bt_en-fr-en"]
    for field, value, match in [
        ("bt_steps", "en-fr", "l1-l2-l1"),
        ("bt_steps", "en-fr-fr", "l1-l2-l1"),
        ("mt_steps", "en-en", "src-tgt"),
        ("ae_steps", "en-fr", "one language"),
        ("ae_steps", "en,de", "not in langs"),
        ("ae_steps", "en,en", "listed twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            nmt.parse_entries(tiny_nmt(**{field: value}), ["en", "fr"])
    with pytest.raises(ValueError, match="no training step"):
        nmt.parse_entries(tiny_nmt(ae_steps="", mt_steps="", bt_steps=""), ["en", "fr"])


@needs_m30k
def test_bad_input_is_refused_before_compiling(tmp_path):
    with pytest.raises(DataError, match="no parallel text"):
        nmt.train_and_evaluate(tiny_nmt(**{"data.train": "en: train.en; fr: train.fr"}), tmp_path)
    with pytest.raises(ValueError, match="positions"):
        nmt.train_and_evaluate(tiny_nmt(**{"model.max_positions": 64}), tmp_path / "b")
    with pytest.raises(ValueError, match="will not be measured"):
        nmt.train_and_evaluate(tiny_nmt(best_metric="valid/en-de/bleu"), tmp_path / "c")
    short = write_lines(tmp_path / "short.fr", ["un", "deux"])
    with pytest.raises(DataError, match="line"):
        nmt.train_and_evaluate(
            tiny_nmt(
                **{
                    "data.train": f"en: {short}; fr: {short}; en-fr: train.en@0:3|{short}",
                }
            ),
            tmp_path / "d",
        )


def _params(state) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.params, sep="/").items()}


@needs_m30k
def test_resume_continues_exactly(tmp_path):
    """8 steps (AE, MT, BT in turn) straight = 4 steps, a new process's resume, 4 more."""
    seen: dict[str, dict[int, dict]] = {"straight": {}, "resumed": {}}

    def keep(run):
        return lambda step, state: seen[run].__setitem__(step, _params(state))

    one = {"length_buckets": "160"}  # one shape per objective: fewer compiles, the same resume
    straight = nmt.train_and_evaluate(tiny_nmt(**one), tmp_path / "a", on_step=keep("straight"))
    nmt.train_and_evaluate(tiny_nmt(max_steps=4, **one), tmp_path / "b")
    resumed = nmt.train_and_evaluate(tiny_nmt(**one), tmp_path / "b", on_step=keep("resumed"))
    assert sorted(seen["resumed"]) == [5, 6, 7, 8]
    for step in (5, 8):
        for name, value in seen["straight"][step].items():
            np.testing.assert_array_equal(seen["resumed"][step][name], value, err_msg=name)
    for key in ("train/bt_fr-en-fr/loss", "train/ae_fr/loss", "train/mt_en-fr/loss"):
        assert resumed[key] == straight[key]


@needs_m30k
def test_initialised_from_pretraining_by_name(tmp_path, pretrained):
    """Both halves start from the pretrained encoder: after an update with lr 0 every copied
    parameter still equals the checkpoint's."""
    config = tiny_nmt(
        init_checkpoint=str(pretrained), max_steps=1, checkpoint_every=1, length_buckets="32,64"
    )
    config.optimizer.lr = 0.0
    config.optimizer.warmup_init_lr = 0.0
    got = {}
    nmt.train_and_evaluate(config, tmp_path, on_step=lambda s, st: got.update(_params(st)))
    _, _, _, _, state = pretrained_lib.load_checkpoint(pretrained)
    source = traverse_util.flatten_dict(state["params"], sep="/")
    copied = 0
    for name, value in got.items():
        inner = name.split("/", 1)[1]
        if "cross_attention" in name or "layer_norm15" in name:
            assert inner not in source
            continue
        np.testing.assert_array_equal(value, source[inner], err_msg=name)
        copied += 1
    assert copied == 2 * len(source)


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    """A model trained to copy English (pairs en → 'fr' = the same sentence): it must learn it."""
    if not (M30K / "train.en").exists():
        pytest.skip("no Multi30k data")
    workdir = tmp_path_factory.mktemp("copy")
    config = tiny_nmt(
        ae_steps="",
        bt_steps="",
        mt_steps="en-fr",
        max_steps=400,
        log_every=100,
        eval_every=400,
        checkpoint_every=400,
        best_metric="valid/en-fr/bleu",
        batch_size=16,  # BLEU 75 at step 400 in half the time of 32 rows (95): the test asks > 60
        length_buckets="40,80,160",
    )
    config.data.train = "en-fr: train.en@0:3000|train.en@0:3000"
    config.data.valid = "en-fr: val.en@0:64|val.en@0:64"
    config.eval_directions = "en-fr"  # the reverse of a copy is a copy: decoding it twice is waste
    config.model.emb_dim = 64
    config.model.n_heads = 4
    config.model.dropout = 0.0
    config.model.attention_dropout = 0.0
    config.optimizer.lr = 3e-3
    config.optimizer.warmup_steps = 50
    result = nmt.train_and_evaluate(config, workdir)
    return workdir, result


@pytest.mark.slow
def test_a_tiny_model_learns_to_copy(copy_model):
    workdir, result = copy_model
    # measured 75.4 at step 400 (batch 16; 94.9 with batch 32 at twice the time); chance is ~0
    assert result["valid/en-fr/bleu"] > 60.0
    assert result["valid/en-fr/tok_bleu"] > 60.0
    hyps = (workdir / "hypotheses" / "valid.en-fr.400.txt").read_text().splitlines()
    assert len(hyps) == 64
    refs = (M30K / "val.en").read_text().splitlines()[:64]
    assert sum(h == r for h, r in zip(hyps, refs, strict=True)) >= 10  # exact copies


@pytest.mark.slow
def test_eval_only_reproduces_the_logged_bleu(copy_model):
    """XLM's --eval_only on the run's checkpoint: the perplexities and BLEU logged at step 400."""
    workdir, result = copy_model
    config = Checkpointer(workdir / "checkpoints", read_only=True).restore_meta()["config"]
    config = ml_collections.ConfigDict({**config, "eval_only": True})
    evaluated = nmt.train_and_evaluate(config, workdir)
    assert evaluated.pop("step") == 400
    assert evaluated == {k: v for k, v in result.items() if k.startswith("valid/")}
    assert evaluated["valid/en-fr/bleu"] > 60.0


@pytest.mark.slow
def test_translate_command(copy_model, tmp_path):
    workdir, _ = copy_model
    lines = (M30K / "val.en").read_text().splitlines()[:20]
    src = write_lines(tmp_path / "in.en", lines)
    cmd = [sys.executable, "-m", "xlm_jax.tools.translate", f"--workdir={workdir}", "--src=en"]
    out = tmp_path / "out.fr"
    run = subprocess.run(
        [
            *cmd,
            "--tgt=fr",
            f"--input={src}",
            f"--output={out}",
            "--beam_size=3",
            "--batch_size=8",
            f"--reference={src}",  # a copy model: the input is its own reference
        ],
        env=CPU_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    hyps = out.read_text().splitlines()
    assert len(hyps) == len(lines)
    # the BLEU it prints is sacreBLEU's on what it wrote
    assert str(bleu.sacre_bleu(hyps, lines)) in run.stderr
    # in-process, greedy: the same model through the Translator API, stdin-like order preserved
    translator = nmt.Translator(workdir, beam_size=1, batch_size=8)
    greedy = translator(lines, "en", "fr")
    assert (
        len(greedy) == len(lines) and sum(g == r for g, r in zip(greedy, lines, strict=True)) >= 3
    )
    with pytest.raises(ValueError, match="knows"):
        translator(lines, "en", "de")
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"a man\n\xff\xfe broken\n")
    run = subprocess.run(
        [*cmd, "--tgt=fr", f"--input={bad}"],
        env=CPU_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and f"{bad}:2: invalid UTF-8" in run.stderr


def test_a_new_translation_may_change_the_pretrained_dropout_masks():
    """An encoder from before the hashed dropout (threefry16) keeps its masks in both halves
    unless dropout_rng asks for others; dec_layers and the rates apply as before."""
    old = ModelConfig(vocab_size=50, n_langs=2, emb_dim=16, n_heads=2, dropout_rng="threefry16")
    enc, dec = nmt.seq2seq_configs(old, tiny_nmt(dropout=0.2, dec_layers=1))
    assert enc == dataclasses.replace(old, dropout=0.2)
    assert dec == dataclasses.replace(enc, n_layers=1)
    enc, dec = nmt.seq2seq_configs(old, tiny_nmt(dropout_rng="hash"))
    assert enc == dataclasses.replace(old, dropout_rng="hash")
    assert (dec.dropout_rng, dec.n_layers) == ("hash", old.n_layers)


def test_depths_take_the_first_layers_of_the_source():
    source = ModelConfig(vocab_size=50, n_langs=2, emb_dim=16, n_heads=2, n_layers=4)
    enc, dec = nmt.seq2seq_configs(source, tiny_nmt(enc_layers=2))
    assert (enc.n_layers, dec.n_layers) == (2, 4)  # the decoder keeps the source's depth
    assert enc == dataclasses.replace(dec, n_layers=2)
    enc, dec = nmt.seq2seq_configs(source, tiny_nmt(enc_layers=1, dec_layers=3))
    assert (enc.n_layers, dec.n_layers) == (1, 3)
    nmt.check_depths(tiny_nmt(enc_layers=4, dec_layers=-1), source_layers=4)
    with pytest.raises(ValueError, match="enc_layers=5: the pretrained model has 4 layers"):
        nmt.check_depths(tiny_nmt(enc_layers=5), source_layers=4)
    with pytest.raises(ValueError, match="dec_layers=0: expected -1"):
        nmt.check(tiny_nmt(dec_layers=0))


def test_max_len_rule():
    assert nmt.max_len_of(10, 1.3, 5) == 18  # XLM: int(1.3 * 10 + 5)
    assert nmt.max_len_of(64, 1.5, 10) == 106
    positions = nmt.positions_of(jax.numpy.asarray([[1, 7, 1, 2, 2]]))
    np.testing.assert_array_equal(np.asarray(positions), [[0, 1, 2, 0, 0]])


@needs_m30k
def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path):
    """NaN steps leave the parameters as they were (counted); 3 in a row stop the run."""
    seen = {}
    result = nmt.train_and_evaluate(
        tiny_nmt(debug_nonfinite_steps="2", max_steps=4, log_every=4),
        tmp_path / "a",
        on_step=lambda step, state: seen.__setitem__(step, _params(state)),
    )
    assert result["train/skipped_updates"] == 1.0
    # loop index 2 is the third update (on_step step 3): skipped, so nothing changed in it
    assert all(np.array_equal(seen[3][k], seen[2][k]) for k in seen[3])
    assert not all(np.array_equal(seen[2][k], seen[1][k]) for k in seen[2])
    # raised at the log of step 4, before that step's checkpoint: there is none yet
    with pytest.raises(FloatingPointError, match="3 consecutive steps.*No checkpoint was written"):
        nmt.train_and_evaluate(
            tiny_nmt(debug_nonfinite_steps="1,2,3", max_nonfinite_steps=3, log_every=4),
            tmp_path / "b",
        )


# --- resuming: a damaged newest checkpoint, a changed config --------------------------------------


def _checkpointed_config(**overrides):
    """4 steps (AE en, AE fr, MT en-fr, AE en), checkpoints at 2 and 4."""
    return tiny_nmt(bt_steps="", max_steps=4, checkpoint_every=2, **overrides)


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A finished random-init run (its own tokenizer in the workdir) and its parameters after
    every step."""
    if not (M30K / "train.en").exists():
        pytest.skip("no Multi30k data")
    workdir = tmp_path_factory.mktemp("nmt_run")
    seen: dict[int, dict] = {}
    nmt.train_and_evaluate(
        _checkpointed_config(), workdir, on_step=lambda s, st: seen.__setitem__(s, _params(st))
    )
    return workdir, seen


def test_damaged_newest_checkpoint_falls_back_to_the_previous(checkpointed_run, tmp_path, caplog):
    """Every array file of checkpoint 4 truncated: the rerun sets it aside with a warning naming
    it and checkpoint 2, redoes steps 3 and 4 and ends with the same parameters. The workdir's
    tokenizer is replaced as well: a resumed run takes the checkpoint's."""
    original, seen = checkpointed_run
    work = tmp_path / "work"
    shutil.copytree(original, work)
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [2, 4]
    damaged = [f for f in (work / "checkpoints" / "4" / "state").rglob("*") if f.is_file()]
    assert damaged
    for f in damaged:
        f.write_bytes(b"")
    train_tokenizer(
        {"en": [f"word{i} other{i % 7}" for i in range(200)]},
        work / "tokenizer.model",
        vocab_size=40,
    )
    caplog.set_level("WARNING")
    resumed: dict[int, dict] = {}
    nmt.train_and_evaluate(
        _checkpointed_config(), work, on_step=lambda s, st: resumed.__setitem__(s, _params(st))
    )
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"checkpoint 4 in {(work / 'checkpoints').resolve()} cannot be restored" in warnings[0]
    assert "falling back to checkpoint 2" in warnings[0]
    assert sorted(resumed) == [3, 4]  # redone from step 2
    for name, value in seen[4].items():
        np.testing.assert_array_equal(resumed[4][name], value, err_msg=name)
    assert (work / "checkpoints_unreadable" / "4" / "state").is_dir()  # kept for inspection
    with Checkpointer(work / "checkpoints", read_only=True) as ck:
        assert ck.all_steps() == [2, 4]


def test_resuming_with_other_settings_is_refused(checkpointed_run):
    """The model is rebuilt from the checkpoint: a changed setting that made it is refused,
    naming each difference, before anything is built, and nothing in the workdir changes."""
    workdir, _ = checkpointed_run
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    where = f"checkpoint 4 in {(workdir / 'checkpoints').resolve()} was written by a different"
    cases = [
        ({"model.emb_dim": 48}, ["model.emb_dim: checkpoint 32 vs config 48"]),
        (
            {"init_checkpoint": "/elsewhere", "enc_layers": 1, "dec_layers": 2},
            [
                "init_checkpoint: checkpoint '' vs config '/elsewhere'",
                "enc_layers: checkpoint -1 vs config 1",
                "dec_layers: checkpoint -1 vs config 2",
            ],
        ),
        ({"tokenizer.vocab_size": 500}, ["tokenizer.vocab_size: checkpoint 300 vs config 500"]),
        ({"dropout_rng": "threefry16"}, ["dropout_rng: checkpoint '' vs config 'threefry16'"]),
    ]
    for overrides, diffs in cases:
        with pytest.raises(ValueError) as e:
            nmt.train_and_evaluate(_checkpointed_config(**overrides), workdir)
        lines = str(e.value).splitlines()
        assert lines[0].startswith(where), lines
        assert lines[1:] == [f"  {d}" for d in diffs] + [
            "rerun with the checkpoint's values, or use another workdir"
        ]
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_token_budget_trains_one_shape_per_bucket(checkpointed_run, tmp_path, caplog):
    """tokens_per_batch=410 through the loop: BT (generation, then training) on 8 rows at 48
    tokens (the shape of the runs above, compiled already) then 4 rows at 96; one compile per
    shape, nothing skipped. The finished run's tokenizer and prepared set are reused."""
    workdir, _ = checkpointed_run
    config = tiny_nmt(
        ae_steps="",
        mt_steps="",
        bt_steps="fr-en-fr",
        tokens_per_batch=410,
        max_steps=3,
        log_every=3,
        checkpoint_every=0,
        **{
            "tokenizer.path": str(workdir / "tokenizer.model"),
            "data.prepared": str(workdir / "prepared"),
        },
    )
    caplog.set_level("INFO", logger="xlm_jax.data.sentences")
    result = nmt.train_and_evaluate(config, tmp_path)
    shapes = re.findall(r"bt_fr-en-fr: batch of (\d+) rows at bucket (\d+)", caplog.text)
    assert shapes == [("8", "48"), ("4", "96")]  # each logged when first seen
    assert result["compiled_programs"] == len(shapes)  # <= len(buckets) per step kind
    assert result["train/skipped_updates"] == 0.0
    assert np.isfinite(result["train/bt_fr-en-fr/loss"])


@orbax_threads_wind_down
def test_disk_full_during_a_save_resumes_from_the_previous_checkpoint(checkpointed_run, tmp_path):
    """Checkpoint 4 cannot be written: the error says so and that checkpoint 2 is untouched; the
    rerun resumes from 2 and ends with the parameters of the run that had room."""
    _, seen = checkpointed_run
    work = tmp_path / "work"
    with disk_full_for(work, "/4.orbax-checkpoint-tmp"), pytest.raises(OSError) as e:
        nmt.train_and_evaluate(_checkpointed_config(), work)
    msg = str(e.value)
    assert f"checkpoint 4 could not be written to {(work / 'checkpoints').resolve()}" in msg, msg
    assert "the disk is full" in msg and "newest complete checkpoint, 2, is untouched" in msg, msg
    assert committed_steps(work / "checkpoints") == [2]
    resumed: dict[int, dict] = {}
    nmt.train_and_evaluate(
        _checkpointed_config(), work, on_step=lambda s, st: resumed.__setitem__(s, _params(st))
    )
    assert sorted(resumed) == [3, 4]
    for name, value in seen[4].items():
        np.testing.assert_array_equal(resumed[4][name], value, err_msg=name)
    assert committed_steps(work / "checkpoints") == [2, 4]
