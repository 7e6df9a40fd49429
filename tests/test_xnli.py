"""XNLI fine-tuning: the classifier, the loop, the sweep, the configs."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tests.conftest import (
    CPU_ENV,
    SHARED_DATA,
    TENSORBOARD,
    XNLI_DIR,
    needs_xnli,
    override,
    xla_flags,
)
from tests.test_faults import committed_steps, disk_full_for, orbax_threads_wind_down
from xlm_jax.core import parallel, train_state
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.metrics import read_jsonl
from xlm_jax.core.preemption import EXIT_PREEMPTED, Preempted
from xlm_jax.data import nli, sources
from xlm_jax.data.sources import DataError
from xlm_jax.model import pretrained as pretrained_lib
from xlm_jax.model.classifier import XNLIClassifier
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.tasks import xnli
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

REPO = Path(__file__).resolve().parents[1]
# a failed orbax save (the disk-full test) leaves a coroutine unawaited; Python reports it in
# whichever test runs next
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")


def _tiny_model(**kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=60, n_langs=3, emb_dim=16, n_layers=2, n_heads=2, max_positions=32, **kw
    )


def _inputs(rng, batch=3, length=10):
    tokens = rng.integers(14, 60, (batch, length)).astype(np.int32)
    tokens[:, 0] = EOS_ID
    tokens[0, 6:] = PAD_ID
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    langs = np.full(tokens.shape, 1, np.int32)
    return tokens, positions, langs


# --- the classifier -----------------------------------------------------------------------------


def test_classifier_head_reads_the_last_layer_at_position_zero():
    cfg = _tiny_model()
    model = XNLIClassifier(cfg, n_classes=3, dropout=0.1)
    tokens, positions, langs = _inputs(np.random.default_rng(0))
    variables = model.init({"params": jax.random.key(0)}, tokens, positions, langs)
    params = nn.meta.unbox(variables)["params"]
    assert set(params) == {"encoder", "head"}
    assert params["head"]["kernel"].shape == (16, 3) and params["head"]["bias"].shape == (3,)
    specs = nn.get_partition_spec(variables)["params"]["head"]
    assert tuple(specs["kernel"]) == ("embed", "classes")

    logits = model.apply({"params": params}, tokens, positions, langs)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32

    # The same numbers from the bare encoder's last layer at position 0, fed to the head.
    hidden = XLMEncoder(cfg).apply(
        {"params": params["encoder"]}, tokens, positions, langs, method=XLMEncoder.encode
    )
    via_encoder = model.apply({"params": params}, hidden[:, 0], method=XNLIClassifier.classify)
    np.testing.assert_allclose(logits, via_encoder, rtol=1e-6, atol=1e-6)
    other = model.apply({"params": params}, hidden[:, 1], method=XNLIClassifier.classify)
    assert not np.allclose(logits, other)  # position 0, not any position

    # pooling="mean": the head reads the mean over each row's non-pad positions (row 0 has 6)
    mean_model = XNLIClassifier(cfg, n_classes=3, dropout=0.1, pooling="mean")
    mean_logits = mean_model.apply({"params": params}, tokens, positions, langs)
    means = np.stack([hidden[0, :6].mean(0), hidden[1].mean(0), hidden[2].mean(0)])
    via_mean = model.apply({"params": params}, means, method=XNLIClassifier.classify)
    np.testing.assert_allclose(mean_logits, via_mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling='max': one of"):
        XNLIClassifier(cfg, pooling="max").init(jax.random.key(0), tokens, positions, langs)

    # The pretraining encoder's parameter tree drops in unchanged under 'encoder'.
    enc_params = XLMEncoder(cfg).init({"params": jax.random.key(1)}, tokens, positions, langs)
    assert jax.tree.structure(nn.meta.unbox(enc_params)["params"]) == jax.tree.structure(
        params["encoder"]
    )


def test_classifier_dropout_only_in_training():
    cfg = _tiny_model(dropout=0.0, attention_dropout=0.0)
    model = XNLIClassifier(cfg, dropout=0.5)
    tokens, positions, langs = _inputs(np.random.default_rng(1))
    params = model.init({"params": jax.random.key(0)}, tokens, positions, langs)["params"]
    a = model.apply({"params": params}, tokens, positions, langs)
    b = model.apply({"params": params}, tokens, positions, langs)
    np.testing.assert_array_equal(a, b)
    c = model.apply(
        {"params": params},
        tokens,
        positions,
        langs,
        deterministic=False,
        rngs={"dropout": jax.random.key(2)},
    )
    assert not np.allclose(a, c)


# --- finetune_layers and weighted_training (XLM's glue-xnli.py flags) ----------------------------


def _options_config(**overrides):
    c = xnli.default_config()
    c.data.train, c.data.valid = "en: t.tsv", "en: v.tsv"  # never read: check() only
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.parametrize(
    "spec, expected",
    [("0:_1", (0, 2)), ("1:_1", (1, 2)), ("_1:_1", (2, 2)), ("0:-1", (0, 2)), ("_3:0", (0, 0))],
)
def test_finetune_layers_reads_xlm_indices(spec, expected):
    assert xnli.layer_range(spec, n_layers=2) == expected


@pytest.mark.parametrize("spec", ["3:1", "0:5", "_6:_1", "1", "a:_1", "1:2:3", ""])
def test_a_bad_finetune_layers_is_refused_by_the_check(spec):
    with pytest.raises(ValueError, match=r"^finetune_layers="):
        xnli.TASK.check(_options_config(finetune_layers=spec))  # model.n_layers = 4
    xnli.TASK.check(_options_config(finetune_layers="_4:4"))


def _labels_by_group(labels) -> dict[str, str]:
    """{'encoder/layer_0': label, ...}: the one label of each parameter group."""
    out: dict[str, set[str]] = {}
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        out.setdefault("/".join(k.key for k in path[:2]), set()).add(label)
    return {k: v.pop() if len(v) == 1 else "mixed" for k, v in out.items()}


def test_finetune_layers_labels_map_xlm_indices_to_parameters():
    model = XNLIClassifier(_tiny_model(), n_classes=3)
    inputs = _inputs(np.random.default_rng(0))
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, *inputs))["params"]
    params = nn.meta.unbox(boxed)
    embeddings = ["position_embeddings", "lang_embeddings", "layer_norm_emb", "embeddings"]
    expected = {f"encoder/{k}": "frozen" for k in [*embeddings, "pred_bias"]}
    expected |= {"encoder/layer_0": "encoder", "encoder/layer_1": "encoder"}
    expected |= {"head/bias": "head", "head/kernel": "head"}
    assert _labels_by_group(xnli.param_labels(params, "1:_1")) == expected
    assert _labels_by_group(xnli.param_labels(boxed, "1:_1")) == expected  # one label per box
    only_first = xnli.param_labels(params, "0:1")  # the embeddings and the first block
    assert _labels_by_group(only_first) == expected | {
        **{f"encoder/{k}": "encoder" for k in embeddings},
        "encoder/layer_1": "frozen",
    }
    # everything: the label prefix of runs before the setting (their optimizer state resumes)
    assert xnli.param_labels(params, "0:_1") == {"encoder": "encoder", "head": "head"}


TRAIN_LABELS = np.array([0] * 6 + [1] * 3 + [2])  # XLM's weights: 1/6, 1/3, 1 -> 0.1, 0.2, 0.7


def _xlm_weighted_loss(logits, labels, weights, train_labels):
    """glue.py: w = 1 / count per class, normalised to sum 1; F.cross_entropy(weight=w) is
    sum_i w[y_i] * nll_i / sum_i w[y_i] over the batch (its real rows here)."""
    w = 1.0 / np.bincount(train_labels, minlength=3)
    w = w / w.sum()
    nll = -jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]
    wy = jnp.asarray(w, jnp.float32)[labels] * weights
    return jnp.sum(wy * nll) / jnp.sum(wy)


def _one_device():
    rules = parallel.rules_from_config(parallel.DEFAULT_RULES)
    return parallel.make_mesh((1, 1, 1), jax.devices()[:1]), rules


def test_a_step_leaves_frozen_parameters_bit_identical_and_without_adam_state():
    config = _options_config(finetune_layers="2:_1")  # the last of 2 blocks + the head
    config.optimizer_e.lr, config.optimizer_e.weight_decay = 1e-2, 0.1  # decay: not on frozen
    model = XNLIClassifier(_tiny_model(), n_classes=3)
    mesh, rules = _one_device()
    tx = xnli.make_optimizer(config)
    state, shardings = train_state.init_state(model, tx, jax.random.key(0), mesh, rules, 1)
    before = jax.device_get(state.params)
    labels = xnli.param_labels(before, config.finetune_layers)
    weights = xnli.weights_by_class(TRAIN_LABELS, 3)
    step_fn, _ = xnli.make_steps(config, model, tx, mesh, rules, shardings, weights)
    tokens, positions, langs = _inputs(np.random.default_rng(0), batch=4)
    tokens[3] = PAD_ID  # a filler row: all padding, weight 0
    batch = {"tokens": tokens, "positions": positions, "langs": langs}
    batch["labels"] = np.array([[0], [1], [2], [0]], np.int32)
    batch["weights"] = np.array([[1], [1], [1], [0]], np.float32)
    with parallel.mesh_context(mesh, rules):
        state, sums = step_fn(state, batch, np.int32(0), np.float32(1.0))
    assert float(sums["nonfinite"]) == 0.0
    assert float(sums["n_pred"]) == 1.0 + 2.0 + 6.0  # the class weights reach the loss
    after = jax.device_get(state.params)
    for (path, label), a, b in zip(
        jax.tree_util.tree_leaves_with_path(labels),
        jax.tree.leaves(before),
        jax.tree.leaves(after),
        strict=True,
    ):
        if label == "frozen":
            assert a.tobytes() == b.tobytes(), path
        elif a.ndim > 1:
            assert not np.array_equal(a, b), path
    # Adam's two moments for the trained parameters only (the counts are scalars)
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(labels), strict=True)
    trained = sum(a.size for a, label in pairs if label != "frozen")
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moments == 2 * trained
    assert set(state.opt_state.inner_states) == {"encoder", "head", "frozen"}
    default = xnli.make_optimizer(_options_config()).init(before)
    assert set(default.inner_states) == {"encoder", "head"}  # as before the setting


def test_weighted_loss_is_xlm_weighted_cross_entropy():
    mesh, rules = _one_device()
    axes = parallel.mesh_axes_of("batch", rules)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    labels, weights = np.array([0, 1, 2, 2, 1]), np.array([1.0, 1, 1, 1, 0])  # a filler row
    batch = {"labels": labels[:, None].astype(np.int32), "weights": weights[:, None]}
    cw = xnli.weights_by_class(TRAIN_LABELS, 3)
    np.testing.assert_allclose(cw, [1.0, 2.0, 6.0])  # the most frequent class weighs 1
    sums = xnli.pair_loss_sums(logits, batch, cw, mesh=mesh, batch_axes=axes)
    reference = _xlm_weighted_loss(logits, labels, weights, TRAIN_LABELS)
    np.testing.assert_allclose(sums["loss_sum"] / sums["n_pred"], reference, rtol=1e-6)
    # the filler row counts nothing, whatever its logits
    other = xnli.pair_loss_sums(logits.at[4].set(50.0), batch, cw, mesh=mesh, batch_axes=axes)
    assert float(other["loss_sum"]) == float(sums["loss_sum"])
    plain = xnli.pair_loss_sums(logits, batch, None, mesh=mesh, batch_axes=axes)  # unweighted
    np.testing.assert_allclose(
        plain["loss_sum"] / plain["n_pred"], _xlm_weighted_loss(logits, labels, weights, [0, 1, 2])
    )

    # An update on two frequent-class pairs, whose XLM weights sum to 0.3: exactly -grad of
    # XLM's weighted mean, not of a sum cut short by apply_gradients' max(n_pred, 1).
    labels, weights = np.array([0, 1, 1]), np.array([1.0, 1, 0])
    batch = {"labels": labels[:, None].astype(np.int32), "weights": weights[:, None]}
    tx = optax.sgd(1.0)

    def update(params):
        def loss(p):
            sums = xnli.pair_loss_sums(p["logits"], batch, cw, mesh=mesh, batch_axes=axes)
            return sums["loss_sum"], sums

        grads, sums = jax.grad(loss, has_aux=True)(params)
        state = train_state.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        return train_state.apply_gradients(state, grads, sums, jnp.float32(1.0), tx)[0].params

    with parallel.mesh_context(mesh, rules):
        new = jax.jit(update)({"logits": logits[:3]})["logits"]
    grad = jax.grad(_xlm_weighted_loss)(logits[:3], labels, weights, TRAIN_LABELS)
    np.testing.assert_allclose(new, logits[:3] - grad, rtol=1e-5, atol=1e-7)


def test_top_class_share_tells_a_constant_classifier():
    assert xnli.top_class_share(np.array([2, 2, 2, 2])) == 100.0
    assert xnli.top_class_share(np.array([0, 1, 2, 1])) == 50.0
    assert xnli.top_class_share(np.array([0, 1, 2])) == pytest.approx(100 / 3)


def test_a_resume_under_other_training_settings_is_refused():
    saved = _options_config().to_dict()
    for key in xnli.TRAINING_DEFAULTS:
        del saved[key]  # a checkpoint from before the settings: their defaults
    xnli.check_resumable(saved, _options_config(), "checkpoint 4")
    with pytest.raises(ValueError) as e:
        changed = {"finetune_layers": "1:_1", "weighted_training": True}
        xnli.check_resumable(
            saved, _options_config(**changed, encoder_dropout_rng="hash"), "checkpoint 4"
        )
    assert str(e.value).splitlines()[1:4] == [
        "  finetune_layers: checkpoint '0:_1' vs config '1:_1'",
        "  weighted_training: checkpoint False vs config True",
        "  encoder_dropout_rng: checkpoint '' vs config 'hash'",
    ]


def test_fine_tuning_may_change_the_pretrained_dropout_masks():
    """A checkpoint from before the hashed dropout reads as threefry16; a new fine-tuning of it
    keeps those masks unless encoder_dropout_rng asks for others (the rates stay the model's)."""
    old = ModelConfig(vocab_size=50, n_langs=2, emb_dim=16, n_heads=2, dropout_rng="threefry16")
    assert pretrained_lib.with_dropout(old, _options_config()) == old
    new = pretrained_lib.with_dropout(old, _options_config(encoder_dropout_rng="hash"))
    assert new == dataclasses.replace(old, dropout_rng="hash")
    with pytest.raises(ValueError, match="dropout_rng='bits'"):
        pretrained_lib.with_dropout(old, _options_config(encoder_dropout_rng="bits"))


# --- end to end: a tiny pretraining (conftest.pretrained), then fine-tuning -----------------------


def _finetune_config(init, **overrides):
    c = xnli.default_config()
    c.init_checkpoint = str(init)
    c.data.root = str(SHARED_DATA)
    c.data.train = "en: xnli/en.tsv@0:1990"
    c.data.valid = "en: xnli/en.tsv@1990:2240; fr: xnli/fr.tsv@1990:2240; de: xnli/de.tsv@1990:2240"
    c.max_len = 48
    c.seq_len = 96
    c.batch_size = 32
    c.eval_batch_size = 64
    c.epoch_size = -1
    c.n_epochs = 5
    c.eval_at_start = True
    c.optimizer_e.lr = 3e-3  # a 1-layer, 32-wide encoder after 4 pretraining steps learns slowly
    c.optimizer_p.lr = 3e-3
    c.encoder_dropout = 0.0
    c.encoder_attention_dropout = 0.0
    c.log_every = 1000
    c.tensorboard = TENSORBOARD
    return override(c, **overrides)


@needs_xnli
def test_finetune_beats_the_untrained_head_and_reports_every_language(pretrained, tmp_path):
    # translate-test plumbing: English text standing in for French translated to English
    config = _finetune_config(pretrained, **{"data.translate_test": "fr: xnli/en.tsv@1990:2240"})
    results = xnli.finetune(config, tmp_path / "ft")
    history = results["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4, 5]
    for h in history:
        assert {"valid/en/acc", "valid/fr/acc", "valid/de/acc"} <= set(h)
        avg = np.mean([h[f"valid/{lang}/acc"] for lang in ("en", "fr", "de")])
        assert h["valid/avg/acc"] == pytest.approx(avg)
        # the English id on English text: exactly the English validation accuracy
        assert h["translate_test/fr/acc"] == h["valid/en/acc"]
        assert 100 / 3 <= h["valid/fr/top_class"] <= 100
    untrained, chosen = history[0], results["selected"]["en"]
    assert chosen["epoch"] >= 1
    # (measured: 33.6 untrained, 42.0 at the selected epoch; the classes are balanced)
    assert chosen["valid/en/acc"] > untrained["valid/en/acc"] + 4.0, history
    assert history[-1]["train/loss"] < history[1]["train/loss"]
    assert results["compiled_programs"] == 2  # one train step, one predict: every shape fixed
    assert "tiny" not in results["init"] and "step" in results["init"]

    ft = tmp_path / "ft"
    for name in ("results.csv", "results.md", "results.png", "results.json"):
        assert (ft / name).stat().st_size > 0, name
    header = (ft / "results.csv").read_text().splitlines()[0]
    assert header == "row,epoch,en,fr,de,avg"


@needs_xnli
def test_finetune_resumes_after_an_epoch(pretrained, tmp_path):
    # translate-train: English and French pairs, each with its own language id
    train_src = "en: xnli/en.tsv@0:100; fr: xnli/fr.tsv@100:200"
    # batches of 8 padded to 64, 80 or 96 tokens (length buckets): resumed exactly all the same
    kw = {"n_epochs": 2, "data.train": train_src, "eval_at_start": False, "batch_size": 8}
    kw["length_buckets"] = "64,80"
    full = xnli.finetune(_finetune_config(pretrained, **kw), tmp_path / "full")
    assert 2 < full["compiled_programs"] <= 6  # a step and a predict per length used
    xnli.finetune(_finetune_config(pretrained, **{**kw, "n_epochs": 1}), tmp_path / "split")
    resumed = xnli.finetune(_finetune_config(pretrained, **kw), tmp_path / "split")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["mode"] == "translate-train (en,fr)" and resumed["n_train"] == 200
    for a, b in zip(full["history"], resumed["history"], strict=True):
        for key in ("valid/en/acc", "valid/fr/acc", "train/loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    # a finished run resumed again does nothing more
    again = xnli.finetune(_finetune_config(pretrained, **kw), tmp_path / "split")
    assert [h["epoch"] for h in again["history"]] == [1, 2]


# --- preemption: a checkpoint inside an epoch, resumed exactly ------------------------------------

PREEMPT_TRAIN = "en: xnli/en.tsv@0:100; fr: xnli/fr.tsv@100:200"  # 200 pairs: 7 updates of 32


def _preempt_config(pretrained, **overrides):
    """Two epochs of 7 updates (the 7th with 8 real rows), both dropouts on so the resumed run's
    dropout keys matter, a periodic checkpoint every 5 updates, the last 2 kept."""
    kw = {
        "n_epochs": 2,
        "data.train": PREEMPT_TRAIN,
        "dropout": 0.1,
        "encoder_dropout": 0.1,
        "checkpoint_every": 5,
        "keep_checkpoints": 2,
        **overrides,
    }
    return _finetune_config(pretrained, **kw)


def _sigterm_at(step: int, seen: list[int] | None = None):
    """An on_step hook: SIGTERM to this process after update ``step``, as a scheduler would."""

    def hook(s: int, state) -> None:
        if seen is not None:
            seen.append(s)
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _loop_state(checkpoints: Path, step: int) -> dict:
    """The JSON loop state saved with a checkpoint (no model needed)."""
    with ocp.CheckpointManager(
        checkpoints, item_handlers={"data_state": ocp.JsonCheckpointHandler()}
    ) as m:
        got = m.restore(step, args=ocp.args.Composite(data_state=ocp.args.JsonRestore()))
    return got["data_state"]


def _assert_same_final_state(a: Path, b: Path) -> None:
    states, steps = [], []
    for workdir in (a, b):
        with Checkpointer(workdir / "checkpoints", async_save=False) as ck:
            steps.append(ck.latest_step())
            states.append(ck.restore_numpy())
    assert steps[0] == steps[1]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])  # params + Adam: bitwise


@needs_xnli
def test_preempted_mid_epoch_resumes_exactly(pretrained, tmp_path):
    full = xnli.finetune(_preempt_config(pretrained), tmp_path / "full")
    assert [h["epoch"] for h in full["history"]] == [0, 1, 2]

    # SIGTERM after update 3 of epoch 1: a checkpoint at that update, then Preempted.
    split, ckdir = tmp_path / "split", tmp_path / "split" / "checkpoints"
    with pytest.raises(Preempted, match="stopped at step 3"):
        xnli.finetune(_preempt_config(pretrained), split, on_step=_sigterm_at(3))
    with Checkpointer(ckdir) as ck:
        assert ck.all_steps() == [3]
    saved = _loop_state(ckdir, 3)
    assert saved["epoch"] == 0 and saved["epoch_rows"] == 96 and saved["step"] == 3
    assert [h["epoch"] for h in saved["history"]] == [0]  # only evaluated epochs
    assert saved["epoch_sums"]["n_pred"] == 96.0
    # The rest of that epoch's batches depend on these: a changed one is refused.
    with pytest.raises(ValueError, match=r"inside an epoch.*batch_size=32 -> 16"):
        xnli.finetune(_preempt_config(pretrained, batch_size=16), split)

    # Resumed: update 4 comes next; SIGTERM again after update 12 (epoch 2's 5th).
    seen: list[int] = []
    with pytest.raises(Preempted, match="stopped at step 12"):
        xnli.finetune(_preempt_config(pretrained), split, on_step=_sigterm_at(12, seen))
    assert seen[0] == 4 and seen[-1] == 12
    # Retention: the last 2 (the periodic save at 10, the preemption's at 12) and the best ranked
    # one, epoch 1's end (7). Mid-epoch checkpoints carry no metrics, so they are never "best".
    with Checkpointer(ckdir, best_metric="valid/en/acc", best_mode="max") as ck:
        assert ck.all_steps() == [7, 10, 12] and ck.best_step() == 7
    assert _loop_state(ckdir, 10)["epoch_rows"] == 96  # epoch 2 after 3 of its updates

    # As if the process had died after update 12 without its checkpoint: the periodic one at
    # 10 is the newest, and resuming from it is exact as well.
    shutil.rmtree(ckdir / "12")
    seen = []
    resumed = xnli.finetune(
        _preempt_config(pretrained), split, on_step=lambda s, st: seen.append(s)
    )
    assert seen == [11, 12, 13, 14]
    assert resumed["history"] == full["history"]  # every accuracy and epoch loss, exactly
    assert resumed["selected"] == full["selected"] and resumed["complete"]
    _assert_same_final_state(tmp_path / "full", split)
    # The best checkpoint is the selected epoch's end; the selection saw evaluated epochs only.
    best = full["selected"]["en"]
    with Checkpointer(ckdir, best_metric="valid/en/acc", best_mode="max") as ck:
        assert ck.best_step() == best["step"] and best["step"] in (7, 14)


# --- non-finite updates, a damaged checkpoint, changed settings -----------------------------------

SHORT_EPOCH = {  # 4 updates of 32 pairs an epoch, validation on 64 English pairs
    "data.train": "en: xnli/en.tsv@0:128",
    "data.valid": "en: xnli/en.tsv@1990:2054",
    "n_epochs": 1,
    "eval_at_start": False,
    "dropout": 0.1,
    "encoder_dropout": 0.1,
}


@needs_xnli
def test_nonfinite_updates_are_skipped_then_stop_the_run(pretrained, tmp_path):
    """A NaN update changes nothing (parameters, Adam, update count), is counted, and stays out
    of the epoch's loss; 3 in a row stop the run, counted across a preemption and resume."""
    seen = {}
    results = xnli.finetune(
        _finetune_config(pretrained, **SHORT_EPOCH, debug_nonfinite_steps="1", log_every=1),
        tmp_path / "a",
        on_step=lambda s, st: seen.__setitem__(s, jax.device_get(st)),
    )
    # loop index 1 is update 2: skipped, so the state after it is the state after update 1
    jax.tree.map(np.testing.assert_array_equal, seen[2], seen[1])
    assert [int(seen[s].step) for s in (1, 2, 3, 4)] == [1, 1, 2, 3]
    assert not np.array_equal(seen[3].params["head"]["kernel"], seen[2].params["head"]["kernel"])
    logs = {
        r["step"]: r
        for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")
        if "train/skipped_updates" in r
    }
    assert [logs[s]["train/skipped_updates"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert "train/xnli/loss" not in logs[2]
    # the epoch's loss: the 3 trained updates' (32 pairs each), not NaN
    epoch_loss = results["history"][-1]["train/loss"]
    assert epoch_loss == pytest.approx(
        np.mean([logs[s]["train/xnli/loss"] for s in (1, 3, 4)]), rel=1e-6
    )

    # NaN at updates 2, 3, 4 with max_nonfinite_steps=3: a SIGTERM after update 3 checkpoints
    # the run of 2 skips; the resumed run's third skip stops it.
    stop = {
        **SHORT_EPOCH,
        "debug_nonfinite_steps": "1,2,3",
        "max_nonfinite_steps": 3,
        "log_every": 1,
    }
    with pytest.raises(Preempted, match="stopped at step 3"):
        xnli.finetune(_finetune_config(pretrained, **stop), tmp_path / "b", on_step=_sigterm_at(3))
    assert _loop_state(tmp_path / "b" / "checkpoints", 3)["nonfinite_run"] == 2
    with pytest.raises(FloatingPointError) as e:
        xnli.finetune(_finetune_config(pretrained, **stop), tmp_path / "b")
    assert str(e.value) == (  # 3 was saved while updates were being skipped: not good
        "3 consecutive steps with a non-finite loss or gradient before step 4; their updates "
        f"were skipped. No checkpoint in {tmp_path / 'b' / 'checkpoints'} is verified good "
        "(finite when saved, no update being skipped): steps [3]."
    )
    with Checkpointer(tmp_path / "b" / "checkpoints") as ck:
        assert ck.all_steps() == [3]
        state = ck.restore_numpy()
    # the state after update 1 (as in the first run: the same batches and dropout keys)
    jax.tree.map(np.testing.assert_array_equal, state["params"], seen[1].params)
    assert int(state["step"]) == 1


@pytest.fixture(scope="module")
def finished_run(pretrained, tmp_path_factory):
    """One epoch of 4 updates with dropout, checkpoints after update 2 (mid-epoch) and 4."""
    workdir = tmp_path_factory.mktemp("xnli_run")
    config = _finetune_config(pretrained, **SHORT_EPOCH, checkpoint_every=2, keep_checkpoints=2)
    return workdir, config, xnli.finetune(config, workdir)


@needs_xnli
def test_damaged_newest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, caplog):
    """Checkpoint 4's array files garbled: the rerun sets it aside with a warning naming it and
    the mid-epoch checkpoint 2, redoes updates 3 and 4, and ends exactly as the first run."""
    original, config, first = finished_run
    work = tmp_path / "work"
    shutil.copytree(original, work)
    damaged = [f for f in (work / "checkpoints" / "4" / "state").rglob("*") if f.is_file()]
    assert damaged
    for f in damaged:
        f.write_bytes(os.urandom(f.stat().st_size))
    caplog.set_level("WARNING")
    seen: list[int] = []
    resumed = xnli.finetune(config, work, on_step=lambda s, st: seen.append(s))
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"checkpoint 4 in {(work / 'checkpoints').resolve()} cannot be restored" in warnings[0]
    assert "falling back to checkpoint 2" in warnings[0]
    assert seen == [3, 4]
    assert resumed["history"] == first["history"]  # accuracies and the epoch's loss, exactly
    _assert_same_final_state(original, work)
    assert (work / "checkpoints_unreadable" / "4" / "state").is_dir()  # kept for inspection


@needs_xnli
def test_eval_only_reproduces_the_logged_accuracies(finished_run, tmp_path):
    """XLM's --eval_only on the epoch's checkpoint: the accuracies of its history, exactly."""
    original, config, first = finished_run
    work = tmp_path / "work"
    shutil.copytree(original, work)
    evaluated = xnli.finetune(override(config.copy_and_resolve_references(), eval_only=True), work)
    assert evaluated.pop("step") == 4
    record = first["history"][-1]
    assert {k: record[k] for k in evaluated} == evaluated
    assert set(evaluated) == {"valid/en/acc", "valid/en/top_class", "valid/avg/acc"}


@needs_xnli
def test_resuming_with_other_settings_is_refused(finished_run, tmp_path):
    """The model is rebuilt from the checkpoint: a changed setting that made it is refused,
    naming each difference, and nothing in the workdir changes."""
    workdir, config, _ = finished_run
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    other = str(tmp_path / "other_pretraining")
    cases = [
        (
            {"init_checkpoint": other},
            [f"init_checkpoint: checkpoint {config.init_checkpoint!r} vs config {other!r}"],
        ),
        (
            {"encoder_dropout": 0.3, "dropout": 0.0},
            [
                "dropout: checkpoint 0.1 vs config 0.0",
                "encoder_dropout: checkpoint 0.1 vs config 0.3",
            ],
        ),
    ]
    for overrides, diffs in cases:
        with pytest.raises(ValueError) as e:
            xnli.finetune(override(config.copy_and_resolve_references(), **overrides), workdir)
        lines = str(e.value).splitlines()
        assert lines[0] == (
            f"checkpoint 4 in {(workdir / 'checkpoints').resolve()} was written by a different "
            "config:"
        )
        assert lines[1:] == [f"  {d}" for d in diffs] + [
            "rerun with the checkpoint's values, or use another workdir"
        ]
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


@needs_xnli
@orbax_threads_wind_down
def test_disk_full_during_a_save_resumes_from_the_previous_checkpoint(finished_run, tmp_path):
    """The epoch's checkpoint (4) cannot be written: the error says so and that the mid-epoch
    checkpoint 2 is untouched; the rerun resumes from 2 and ends as the run that had room."""
    original, config, first = finished_run
    work = tmp_path / "work"
    with disk_full_for(work, "/4.orbax-checkpoint-tmp"), pytest.raises(OSError) as e:
        xnli.finetune(config, work)
    msg = str(e.value)
    assert f"checkpoint 4 could not be written to {(work / 'checkpoints').resolve()}" in msg, msg
    assert "the disk is full" in msg and "newest complete checkpoint, 2, is untouched" in msg, msg
    assert committed_steps(work / "checkpoints") == [2]
    assert not (work / "results.json").exists()
    seen: list[int] = []
    resumed = xnli.finetune(config, work, on_step=lambda s, st: seen.append(s))
    assert seen == [3, 4]
    assert resumed["history"] == first["history"]
    _assert_same_final_state(original, work)


CLI_CONFIG = """
from tests.test_xnli import _finetune_config

def get_config():
    return _finetune_config({init!r}, **{overrides!r})
"""


@pytest.mark.slow
@needs_xnli
def test_sigterm_mid_epoch_exits_75_and_the_rerun_finishes_the_same(pretrained, tmp_path):
    """The command line: SIGTERM inside an epoch -> a checkpoint and exit code 75; the same
    command again resumes and ends with what an uninterrupted run gives."""
    # 200 pairs in batches of 8: 25 updates an epoch, a progress line after each.
    overrides = {
        "data.train": "en: xnli/en.tsv@0:200",
        "n_epochs": 2,
        "batch_size": 8,
        "log_every": 1,
        "eval_at_start": False,
        "dropout": 0.1,
        "encoder_dropout": 0.1,
    }
    config_file = tmp_path / "tiny_xnli.py"
    config_file.write_text(CLI_CONFIG.format(init=str(pretrained), overrides=overrides))
    work = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "xlm_jax.main",
        "--mode=xnli",
        f"--config={config_file}",
        f"--workdir={work}",
    ]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a file: a full stderr pipe would stall the child
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=CPU_ENV, stdout=subprocess.PIPE, stderr=err, text=True
        )
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until it trains (a progress line per update)
            line = proc.stdout.readline()
            if line.startswith("step 4/") or not line:
                break
        if not line.startswith("step 4/"):
            proc.kill()
            pytest.fail(f"the run did not reach update 4: {log.read_text()[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, log.read_text()[-2000:]
    assert "checkpoint is saved, rerun to resume" in log.read_text()
    with Checkpointer(work / "checkpoints") as ck:
        step = ck.latest_step()
    assert step is not None and 4 <= step < 25, step
    assert _loop_state(work / "checkpoints", step)["epoch_rows"] == 8 * step  # inside epoch 1

    rerun = subprocess.run(cmd, cwd=REPO, env=CPU_ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = json.loads((work / "results.json").read_text())
    full = xnli.finetune(_finetune_config(pretrained, **overrides), tmp_path / "full")
    assert resumed["history"] == json.loads(json.dumps(full["history"]))
    _assert_same_final_state(tmp_path / "full", work)


@needs_xnli
def test_sweep_runs_the_grid_once(pretrained, tmp_path):
    config = _finetune_config(pretrained, **{"n_epochs": 1, "data.train": "en: xnli/en.tsv@0:96"})
    config.sweep.lrs = "1e-3"
    config.sweep.batch_sizes = "8,16"
    summary = xnli.run_sweep(config, tmp_path)
    assert [s["run"] for s in summary] == ["lr0.001_bs8", "lr0.001_bs16"]
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("run,lr,batch_size,epoch,en,fr,de,avg") and len(lines) == 3
    stamp = (tmp_path / "lr0.001_bs8" / "results.json").stat().st_mtime_ns
    xnli.run_sweep(config, tmp_path)  # complete runs are skipped
    assert (tmp_path / "lr0.001_bs8" / "results.json").stat().st_mtime_ns == stamp


# --- configs -------------------------------------------------------------------------------------


def _load_config(name: str, *args):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args), path.read_text()


@pytest.mark.parametrize(
    "name, mode", [("xnli", "xnli"), ("xnli_sweep", "xnli_sweep"), ("retrieval", "retrieval")]
)
def test_configs_build_show_their_command_and_read_their_data(name, mode):
    config, text = _load_config(name)
    assert f"--mode={mode} --config=configs/{name}.py" in text
    assert "--config.init_checkpoint=" in text
    if not (XNLI_DIR / "en.tsv").exists():
        return
    root = str(SHARED_DATA)
    if name == "retrieval":
        pairs = config.data.pairs.split("; ")
        assert len(pairs) == 14 and all("@80%:" in p for p in pairs)
        for entry in pairs:
            src, tgt = entry.split(": ", 1)[1].split("|")
            a, b = sources.read_parallel(src, tgt, root)
            assert len(a) == len(b) > 0
    else:
        valid = nli.read_sets(config.data.valid, "data.valid", root=root)
        assert list(valid) == list(nli.PAPER_LANGS)
        assert config.select_lang == "en" and config.data.train == "en: xnli/en.tsv@0:1990"
    subset, _ = _load_config(name, "en,de,fr")
    keys = subset.data.pairs if name == "retrieval" else subset.data.valid
    assert "fr" in keys and "es" not in keys


MESH_WORKER = """
import json, sys
from tests.test_xnli import _finetune_config
from xlm_jax.tasks import xnli
init, out_dir, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
for shape in shapes:
    c = _finetune_config(init, **{"data.train": "en: xnli/en.tsv@0:200", "n_epochs": 2,
                                  "batch_size": 8, "eval_batch_size": 64})
    c.mesh.shape = tuple(shape)
    out[str(shape)] = xnli.finetune(c, f"{out_dir}/{shape[0]}{shape[1]}{shape[2]}")["history"]
print("HISTORIES" + json.dumps(out))
"""


@pytest.mark.slow
@needs_xnli
def test_sharded_finetuning_matches_one_device(pretrained, tmp_path):
    """Data, FSDP and tensor parallel fine-tuning on 4 emulated devices give the one-device run
    (a pretraining checkpoint written on one device restores onto every mesh)."""
    ref = xnli.finetune(
        _finetune_config(
            pretrained,
            **{"data.train": "en: xnli/en.tsv@0:200", "n_epochs": 2, "batch_size": 8},
            eval_batch_size=64,
        ),
        tmp_path / "one",
    )["history"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = xla_flags(
        "--xla_force_host_platform_device_count=4",
        "--xla_cpu_collective_call_terminate_timeout_seconds=900",
        "--xla_cpu_collective_timeout_seconds=900",
    )
    shapes = [[4, 1, 1], [1, 4, 1], [2, 1, 2]]
    proc = subprocess.run(
        [sys.executable, "-c", MESH_WORKER, str(pretrained), str(tmp_path), json.dumps(shapes)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    histories = json.loads(proc.stdout.split("HISTORIES", 1)[1])
    for shape, history in histories.items():
        for a, b in zip(ref, history, strict=True):
            assert b["epoch"] == a["epoch"]
            if a["epoch"]:  # epoch 0 is the untrained head: no training loss
                assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4), shape
            for lang in ("en", "fr", "de"):
                key = f"valid/{lang}/acc"
                assert abs(b[key] - a[key]) <= 0.4, (shape, key)  # at most one of 250 rows


@needs_xnli
def test_random_encoder_baseline_trains_its_own_tokenizer(tmp_path):
    c = _finetune_config("", **{"data.train": "en: xnli/en.tsv@0:200", "n_epochs": 1})
    c.data.valid = "en: xnli/en.tsv@1990:2090; sw: xnli/sw.tsv@1990:2090"
    c.tokenizer.vocab_size = 400
    c.tokenizer.n_sentences = 2000
    c.model.emb_dim = 16
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.max_positions = 128
    results = xnli.finetune(c, tmp_path)
    assert results["init"] == "random init"
    assert (tmp_path / "tokenizer.model").exists()
    assert {"valid/en/acc", "valid/sw/acc"} <= set(results["history"][-1])
    # a language the encoder does not know is refused before anything trains
    c.langs = "en,fr"
    with pytest.raises(DataError, match="'sw' is not one of the model's languages"):
        xnli.finetune(c, tmp_path / "other")
