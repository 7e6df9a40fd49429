"""XNLI: zero-shot cross-lingual classification by fine-tuning a pretrained encoder.

The paper's protocol (Lample & Conneau 2019, §5.1): fine-tune the pretrained encoder and a linear
head on English NLI pairs, then classify pairs in the 14 other XNLI languages with no labels in
those languages. As XLM's ``src/evaluation/xnli.py``:

* a pair is one row ``</s> premise </s> hypothesis </s>`` (``data/nli.py``);
* the classifier reads the last layer at position 0 (``model/classifier.py``; ``pooling="mean"``:
  its mean over the row, an option for small encoders);
* the encoder and the head have their own Adam (``optimizer_e`` / ``optimizer_p``), constant
  learning rates, every encoder layer fine-tuned (or those of ``finetune_layers``), the
  encoder's own dropout active; optionally a class-weighted loss (``weighted_training``);
* an epoch is a fresh shuffle of the training pairs, cut at ``epoch_size`` pairs;
* after every epoch, accuracy on the validation pairs of every language.

Here, additionally: rows are padded to one fixed length so each step compiles once; the model is
selected by the English validation accuracy (no target-language labels), and the epoch the
language average would pick is reported beside it (``report.py``); every epoch's end, a
preemption (SIGTERM/SIGINT, at the next update) and optionally every ``checkpoint_every`` updates
are checkpointed with the loop's state, the position in the epoch's order included, so a run
resumes exactly; translate-train (training files in several languages) and translate-test
(target-language sets translated to English) run when their files are configured.

Entry points: ``finetune`` (``--mode=xnli``), ``run_sweep`` (``--mode=xnli_sweep``: a learning
rate × batch size grid); settings and their defaults: ``default_config``. The encoder's source
(a pretraining checkpoint or a random init), its settings and the device plumbing (``Runner``)
are shared with the retrieval probe (``retrieval.py``).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from xlm_jax.core import loop, parallel, train_state
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data import nli
from xlm_jax.data import prepare as prepare_lib
from xlm_jax.data.nli import LABELS, Batch
from xlm_jax.data.sentences import bucket_length
from xlm_jax.model import objectives, pretrained
from xlm_jax.model.classifier import XNLIClassifier
from xlm_jax.model.encoder import ModelConfig, xlm_flops_per_token
from xlm_jax.tasks import report
from xlm_jax.text.tokenizer import PAD_ID, Tokenizer

# --- settings ------------------------------------------------------------------------------------


def encoder_settings(c: ml_collections.ConfigDict) -> None:
    """Where the encoder comes from, the data reading options, row lengths and the mesh; shared
    by fine-tuning and the retrieval probe."""
    pretrained.source_settings(c)
    c.langs = ",".join(nli.PAPER_LANGS)  # random baseline only
    c.tokenizer.vocab_size = 8000
    c.tokenizer.n_sentences = 100_000
    c.model.emb_dim = 256
    c.model.n_layers = 4

    # Sentences are cut to max_len tokens (with their </s>), as XLM's --max_len; rows are padded
    # to seq_len (0 = the longest row in the data, rounded up to a multiple of 8) so every step
    # has one shape. A pair longer than seq_len loses tokens from its longer sentence.
    c.max_len = 256
    c.seq_len = 0
    # "" = one shape; "32,64": a batch is padded to the first of these holding its longest row
    # (else to the row length above): one compile per length, far less padding on short pairs
    c.length_buckets = ""


def default_config() -> ml_collections.ConfigDict:
    """Every fine-tuning setting; defaults are XLM's XNLI recipe (README command of
    facebookresearch/XLM, and glue-xnli.py's flag defaults where the command sets nothing)."""
    c = ml_collections.ConfigDict()
    encoder_settings(c)
    # Sources by language, "LANG: SPEC[, SPEC...]; ..." (a SPEC as in data/sources.py:
    # `xnli/en.tsv@0:1990`, or `tfds:multi_nli:train:en` / `tfds:xnli:validation:fr` when prepared).
    # train: one language = zero-shot; several = translate-train (each pair with its language id).
    c.data.train = ""
    c.data.valid = ""  # zero-shot validation, per language (model selection + the reported table)
    c.data.test = ""  # optional, reported at the selected epochs
    # Optional translate-test: "LANG: SPEC" where SPEC holds LANG's evaluation pairs machine-
    # translated into English; classified by the model with the English language id.
    c.data.translate_test = ""
    prepare_lib.add_settings(c)  # tokenized once by the encoder's tokenizer (data/prepare.py)
    c.data.records = "nli"
    c.data.prepare_splits = "train,valid,test,translate_test"

    c.select_lang = "en"  # model selection by this language's validation accuracy (the source)
    c.dropout = 0.0  # on the pooled vector before the head (glue-xnli.py --dropout default 0)
    # The pair's vector: "first" = the last layer at position 0 (XLM's), "mean" = its mean over
    # the row's tokens
    c.pooling = "first"
    # The encoder keeps the pretrained model's dropout (XLM fine-tunes in train mode);
    # a value >= 0 overrides it.
    c.encoder_dropout = -1.0
    c.encoder_attention_dropout = -1.0
    # "" = the pretrained model's masks; "hash" gives a checkpoint from before the hashed
    # dropout (its metadata says "threefry16") the faster masks for a new fine-tuning
    c.encoder_dropout_rng = ""

    # Adam per parameter group, constant learning rate (XLM: --optimizer_e / --optimizer_p
    # "adam,lr=0.000025"; PyTorch's Adam defaults otherwise). The README's grid: lr in
    # {5e-6, 2.5e-5, 1.25e-4}, batch size in {4, 8}.
    for name in ("optimizer_e", "optimizer_p"):
        o = c[name] = ml_collections.ConfigDict()
        o.lr = 2.5e-5
        o.beta1 = 0.9
        o.beta2 = 0.999
        o.eps = 1e-8
        o.weight_decay = 0.0
    c.clip_grad_norm = 0.0  # XLM does not clip when fine-tuning; > 0 = global-norm clipping
    # The encoder's parts fine-tuned, as XLM's --finetune_layers "i:j": both ends included, "_"
    # for a minus sign (negative = from the end, _1 = the last layer). Index 0 = the embeddings
    # (encoder/embeddings, position_embeddings, lang_embeddings, layer_norm_emb), k = the k-th
    # block (encoder/layer_{k-1}). The rest of the encoder and the unused MLM output layer
    # (pred_bias, pred_weight) are frozen: no update, no Adam moments, no weight decay. The head
    # always trains. "0:_1" = all (XLM's default); "1:_1" freezes the embeddings, "_2:_1" trains
    # only the last two blocks.
    c.finetune_layers = ALL_LAYERS
    # XLM's --weighted_training (its GLUE tasks; its XNLI ignores the flag): a pair's loss weighs
    # 1 / (its class's count in the training set), and a batch's loss is divided by its pairs'
    # summed weights, as F.cross_entropy(weight=...). train/loss and train/acc are then weighted.
    c.weighted_training = False

    c.batch_size = 8  # pairs per update (README: 8)
    c.eval_batch_size = 32
    c.n_epochs = 250  # README: 250
    c.epoch_size = 20_000  # pairs per epoch (README: 20000); -1 = one pass over the training set
    c.eval_at_start = False  # also evaluate the untrained head (reported as epoch 0)
    c.patience = -1  # stop after this many epochs without a better select_lang accuracy; -1 = never
    c.log_every = 50
    loop.log_settings(c)  # tensorboard
    c.peak_flops_per_device = 0.0  # for train/mfu, as pretraining's (0 = a known accelerator's)
    c.keep_checkpoints = 1  # the last N, plus the best by select_lang validation accuracy
    # Also checkpoint every N updates inside an epoch (0 = only at epoch ends and on SIGTERM /
    # SIGINT); resuming from one is exact. Only epoch checkpoints are ranked for the best one.
    c.checkpoint_every = 0
    loop.nonfinite_settings(c)  # a NaN/inf update is skipped; too many in a row stop the run
    loop.resume_settings(c)  # restart_from_scratch
    loop.eval_only_settings(c)  # XLM's --eval_only

    c.sweep = ml_collections.ConfigDict()  # --mode=xnli_sweep: every (lr, batch size) pair
    c.sweep.lrs = "5e-6,2.5e-5,1.25e-4"  # sets optimizer_e.lr and optimizer_p.lr
    c.sweep.batch_sizes = "4,8"
    return c


def row_length(needed: int, config: ml_collections.ConfigDict, model: ModelConfig) -> int:
    """The padded row length: ``seq_len``, or the longest row rounded up to a multiple of 8;
    never beyond the model's positions."""
    if config.seq_len > 0:
        if config.seq_len > model.max_positions:
            raise ValueError(
                f"seq_len={config.seq_len} exceeds the model's max_positions={model.max_positions}"
            )
        if config.seq_len < 5:
            raise ValueError(f"seq_len={config.seq_len}: a pair row needs at least 5 tokens")
        return int(config.seq_len)
    return int(min(-(-needed // 8) * 8, model.max_positions))


# --- which parameters train (finetune_layers), how much a pair weighs (weighted_training) --------

ALL_LAYERS = "0:_1"
# XLM's index 0 (SentenceEmbedder.get_parameters): everything before the first block
EMBEDDING_PARAMS = ("embeddings", "position_embeddings", "lang_embeddings", "layer_norm_emb")
# The MLM output layer's own parameters (pred_weight: untied only): no gradient in classification,
# never in XLM's fine-tuning optimizer; frozen whenever finetune_layers is set.
UNUSED_PARAMS = ("pred_bias", "pred_weight")
# The values runs made before these settings existed trained with (their checkpoints lack them).
TRAINING_DEFAULTS = {
    "finetune_layers": ALL_LAYERS,
    "weighted_training": False,
    "encoder_dropout_rng": "",
}


def layer_range(spec: str, n_layers: int | None = None) -> tuple[int, int]:
    """``finetune_layers`` read as XLM reads ``--finetune_layers``: ``"i:j"``, ``_`` for a minus.

    Without ``n_layers``, the pair as written (syntax only). With it, negative indices count from
    the end (``-1`` = ``n_layers``) and ``0 <= i <= j <= n_layers`` must hold (XLM quietly trains
    no encoder parameter for ``i > j``; here that is refused as a likely typo).
    """
    try:
        i, j = (int(part.strip().replace("_", "-")) for part in str(spec).split(":"))
    except ValueError:  # not two integers
        raise ValueError(
            f"finetune_layers={spec!r}: expected 'i:j', e.g. '0:_1' (all) or '1:_1'"
        ) from None
    if n_layers is None:
        return i, j
    lo, hi = (n_layers + k + 1 if k < 0 else k for k in (i, j))
    if not 0 <= lo <= hi <= n_layers:
        raise ValueError(
            f"finetune_layers={spec!r} is {lo}:{hi}: expected 0 <= i <= j <= {n_layers} "
            f"(0 = the embeddings, 1..{n_layers} = the encoder's layers)"
        )
    return lo, hi


def trains_everything(spec: str) -> bool:
    return layer_range(spec) == (0, -1)


def _layer_index(name: str) -> int | None:
    """XLM's index of an encoder parameter group; None for the unused MLM bias."""
    if name in EMBEDDING_PARAMS:
        return 0
    if re.fullmatch(r"layer_\d+", name):
        return int(name[len("layer_") :]) + 1
    if name in UNUSED_PARAMS:
        return None
    raise ValueError(f"finetune_layers: encoder parameter {name!r} has no XLM layer index")


def param_labels(params: Any, spec: str) -> Any:
    """Each parameter's optimizer group: ``head``, ``encoder`` (fine-tuned) or ``frozen``.

    For ``"0:_1"``, the prefix ``{"encoder", "head"}`` of runs before the setting: the same
    optimizer state, so their checkpoints resume. On a boxed tree (``nn.Partitioned``, as the
    state is created), a prefix with one label per box.
    """
    if trains_everything(spec):
        return {"encoder": "encoder", "head": "head"}
    n_layers = sum(re.fullmatch(r"layer_\d+", name) is not None for name in params["encoder"])
    lo, hi = layer_range(spec, n_layers)

    def label(path, _) -> str:
        top = path[0].key
        if top == "head":
            return "head"
        if top != "encoder":
            raise ValueError(f"finetune_layers: unexpected parameter group {top!r}")
        index = _layer_index(path[1].key)
        return "encoder" if index is not None and lo <= index <= hi else "frozen"

    # One label per box, not per array inside it: optax then masks a frozen parameter's state
    # as a whole (a MaskedNode, no shardings), as the prefix labels do.
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=boxed)


def stop_frozen(params: Any, spec: str) -> Any:
    """``params`` with the frozen ones behind ``stop_gradient``: the backward pass skips their
    gradients (zeros), so the gradient norm (clipping, the non-finite check) counts only the
    trained ones."""
    if trains_everything(spec):
        return params
    labels = param_labels(params, spec)
    return jax.tree.map(
        lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p, params, labels
    )


def weights_by_class(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``weighted_training``'s weights: XLM's ``1 / count`` per class (normalised to sum 1 there),
    here scaled so the most frequent class weighs 1. The weighted mean is scale-free, and any
    batch with a real pair sums to >= 1, which ``apply_gradients``' ``max(n_pred, 1)`` needs."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(f"weighted_training: a class has no training pair (counts {counts})")
    return (counts.max() / counts).astype(np.float32)


def class_weights_of(config: ml_collections.ConfigDict, train: Sequence[nli.Pairs]):
    """The class weights over every training language's pairs, or None (unweighted)."""
    if not config.weighted_training:
        return None
    weights = weights_by_class(np.concatenate([p.labels for p in train]), len(LABELS))
    logging.info(
        "weighted_training: class weights %s", dict(zip(LABELS, weights.tolist(), strict=True))
    )
    return weights


def pair_loss_sums(logits, batch, class_weights, *, mesh, batch_axes) -> dict[str, jax.Array]:
    """The batch's cross-entropy, weight and correct sums (exact on any mesh: per-shard sums,
    psum'd). A pair weighs its row weight (0 for filler rows) times its class weight, so
    ``loss_sum / n_pred`` is ``F.cross_entropy(weight=w)``'s ``sum w_y nll / sum w_y``."""
    weights = batch["weights"]
    if class_weights is not None:
        table = jnp.asarray(class_weights, jnp.float32)
        weights = weights * jnp.take(table, batch["labels"], mode="clip")
    return objectives.sharded_token_loss_sums(
        logits[:, None, :],
        batch["labels"],
        weights,
        mesh=mesh,
        batch_axes=batch_axes,
        vocab_axes=(),
    )


# --- steps ---------------------------------------------------------------------------------------


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam for the encoder (``optimizer_e``) and for the head (``optimizer_p``), as XLM's two
    optimizers; decoupled weight decay (if any) skips 1-D parameters, as pretraining does. The
    encoder's parameters outside ``finetune_layers`` are left out (``param_labels``)."""

    def adam(o: ml_collections.ConfigDict) -> optax.GradientTransformation:
        return optax.adamw(
            o.lr,
            b1=o.beta1,
            b2=o.beta2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=train_state.decayed_leaves,
        )

    groups = {"encoder": adam(config.optimizer_e), "head": adam(config.optimizer_p)}
    if not trains_everything(config.finetune_layers):
        groups["frozen"] = optax.set_to_zero()  # no state: frozen weights get no moments, no decay
    tx = optax.multi_transform(groups, functools.partial(param_labels, spec=config.finetune_layers))
    if config.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
    return tx


def train_step(
    state: train_state.TrainState,
    batch,
    rng,
    lam,
    *,
    model,
    tx,
    mesh,
    batch_axes,
    finetune_layers: str = ALL_LAYERS,
    class_weights: np.ndarray | None = None,
):
    """One update on ``lam`` (1, or NaN from the ``debug_nonfinite_steps`` test hook) times the
    mean cross-entropy of the batch's real rows (weight 1, or their class's: ``pair_loss_sums``); a
    non-finite loss or gradient skips it (``train_state.apply_gradients``, as pretraining and
    translation). Parameters outside ``finetune_layers`` get no gradient (``stop_frozen``).

    Sums and counts come from ``objectives.sharded_token_loss_sums`` (rows split over the batch
    axes, a psum of the per-shard sums), so they are exact whatever the mesh.
    """

    def loss_sums(params):
        logits = model.apply(
            {"params": stop_frozen(params, finetune_layers)},
            batch["tokens"],
            batch["positions"],
            batch["langs"],
            deterministic=False,
            rngs={"dropout": rng},
        )
        sums = pair_loss_sums(logits, batch, class_weights, mesh=mesh, batch_axes=batch_axes)
        return sums["loss_sum"], sums

    grads, sums = jax.grad(loss_sums, has_aux=True)(state.params)
    return train_state.apply_gradients(state, grads, sums, lam, tx)


def predict(params, batch, *, model) -> jax.Array:
    logits = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["langs"], deterministic=True
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def make_steps(
    config, model, tx, mesh: Mesh, rules, shardings, class_weights: np.ndarray | None = None
) -> tuple[Callable, Callable]:
    """The compiled update ``(state, batch, step, lam)`` and prediction ``(params, batch)``;
    ``class_weights``: ``class_weights_of`` (None = unweighted)."""
    batch_sharding = parallel.batch_sharding(mesh, rules)
    repl = parallel.replicated(mesh)
    step_fn = jax.jit(
        train_state.keyed_by_step(
            functools.partial(
                train_step,
                model=model,
                tx=tx,
                mesh=mesh,
                batch_axes=parallel.mesh_axes_of("batch", rules),
                finetune_layers=config.finetune_layers,
                class_weights=class_weights,
            ),
            config.seed,
            argnum=2,
        ),
        in_shardings=(shardings, batch_sharding, repl, repl),
        out_shardings=(shardings, repl),
        donate_argnums=0,
    )
    predict_fn = jax.jit(
        functools.partial(predict, model=model),
        in_shardings=(shardings.params, batch_sharding),
        out_shardings=repl,
    )
    return step_fn, predict_fn


class Runner:
    """Mesh, rules, batch sharding and the placement of host batches (this process's rows)."""

    def __init__(self, mesh: Mesh, rules) -> None:
        self.mesh, self.rules = mesh, rules
        self.batch_sharding: NamedSharding = parallel.batch_sharding(mesh, rules)
        self.replicated = parallel.replicated(mesh)
        self.dp = parallel.data_parallel_size(mesh, rules)

    @classmethod
    def for_config(cls, config: ml_collections.ConfigDict, batch_sizes: Mapping[str, int]):
        """The mesh of ``config.mesh``, checked to split each of ``batch_sizes``."""
        rules = parallel.rules_from_config(config.mesh.rules)
        mesh = parallel.make_mesh(config.mesh.shape)
        for what, n in batch_sizes.items():
            parallel.check_batch_size(n, mesh, rules, what)
        return cls(mesh, rules)

    def put(self, batch: Batch) -> dict[str, jax.Array]:
        n = len(batch["tokens"])
        start, stop = parallel.process_rows(self.batch_sharding, n)
        local = {k: v[start:stop] for k, v in batch.items()}
        return parallel.global_batch(local, self.batch_sharding, n)

    def context(self):
        return parallel.mesh_context(self.mesh, self.rules)


# --- fine-tuning ---------------------------------------------------------------------------------


def _check_config(config: ml_collections.ConfigDict) -> None:
    for what in ("batch_size", "eval_batch_size", "n_epochs", "max_len"):
        if config[what] < 1:
            raise ValueError(f"{what}={config[what]} must be >= 1")
    if config.max_len < 3:
        raise ValueError(f"max_len={config.max_len}: a sentence needs its two </s> and a token")
    if config.epoch_size == 0 or config.epoch_size < -1:
        raise ValueError(f"epoch_size={config.epoch_size}: a positive count, or -1 for all")
    for name in ("optimizer_e", "optimizer_p"):
        if config[name].lr < 0:
            raise ValueError(f"{name}.lr={config[name].lr}: a learning rate must be >= 0")
    for what in ("train", "valid"):
        if not config.data[what].strip():
            raise ValueError(f"data.{what} is empty: give 'LANG: SOURCE' entries")
    buckets_of(config, 2 * config.max_len)  # a malformed length_buckets fails before any reading
    _check_finetune_layers(config)
    prepare_lib.records_of(config, expected="nli")
    _check_languages(config)


def _check_finetune_layers(config: ml_collections.ConfigDict) -> None:
    """``finetune_layers`` against the encoder's depth, read from ``model`` or the checkpoint's
    metadata (no parameters): a bad range fails before any text is read."""
    if trains_everything(config.finetune_layers):
        return
    if config.init_checkpoint:
        n_layers = pretrained.source_model(config)[0].n_layers
    else:
        n_layers = config.model.n_layers
    layer_range(config.finetune_layers, n_layers)


def _check_languages(config: ml_collections.ConfigDict) -> None:
    """``langs``, the data's languages and ``select_lang`` are known codes or ``new_langs``: a
    typo fails here, not once the text is read."""
    corpus_lib.checked_langs(config)  # the random baseline's
    new = corpus_lib.codes(config.new_langs)
    for split in ("train", "valid", "test", "translate_test"):
        where = f"data.{split}"
        keys = corpus_lib.parse_sources(config.data[split], where)
        corpus_lib.check_known(list(keys), new, where)
    corpus_lib.check_known([config.select_lang], new, "select_lang")


def accuracy(
    runner: Runner, predict_fn, params, pairs: nli.Pairs, batch_size: int, *, max_len, buckets
) -> tuple[float, np.ndarray]:
    """Accuracy (%) over every pair, and the predictions; a process reads only its rows."""
    start, stop = parallel.process_rows(runner.batch_sharding, batch_size)
    lengths, outs = pairs.lengths(max_len), []
    for i in range(0, len(pairs), batch_size):
        real = np.arange(i, min(i + batch_size, len(pairs)))
        length = bucket_of(lengths[real], buckets)
        index = nli.padded(real, batch_size)
        local = nli.batch_of([pairs], index[start:stop], max_len=max_len, length=length)
        batch = parallel.global_batch(local, runner.batch_sharding, batch_size)
        outs.append(predict_fn(params, batch))
    preds = np.concatenate(jax.device_get(outs))[: len(pairs)]
    return 100.0 * float(np.mean(preds == pairs.labels)), preds


def top_class_share(preds: np.ndarray) -> float:
    """The % of pairs given the most predicted label: 100 when the classifier ignores its input,
    which a near-chance accuracy alone does not tell from weak but real predictions."""
    return 100.0 * float(np.bincount(preds).max()) / len(preds)


def evaluate_sets(
    runner: Runner,
    predict_fn,
    params,
    sets: Mapping[str, Mapping[str, nli.Pairs]],
    batch_size: int,
    **rows: int,
) -> dict[str, float]:
    """``{'valid/fr/acc': ..., 'valid/fr/top_class': ..., 'valid/avg/acc': ...}`` for every split
    and language; ``rows``: ``max_len`` and ``buckets`` (``accuracy``)."""
    out: dict[str, float] = {}
    with runner.context():
        for split, by_lang in sets.items():
            accs = []
            for lang, pairs in by_lang.items():
                acc, preds = accuracy(runner, predict_fn, params, pairs, batch_size, **rows)
                out[f"{split}/{lang}/acc"] = acc
                out[f"{split}/{lang}/top_class"] = top_class_share(preds)
                accs.append(acc)
            if accs:
                out[f"{split}/avg/acc"] = float(np.mean(accs))
    return out


def select(history: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any] | None:
    """The first fine-tuned epoch (>= 1) with the highest ``metric``."""
    candidates = [h for h in history if h["epoch"] >= 1 and metric in h]
    if not candidates:
        return None
    return max(candidates, key=lambda h: (h[metric], -h["epoch"]))


EVAL_SPLITS = ("valid", "test", "translate_test")


def split_langs(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
    """The languages of every configured split (nothing read): {split: [lang, ...]}."""
    out = {
        split: list(corpus_lib.parse_sources(config.data[split], f"data.{split}"))
        for split in ("train", *EVAL_SPLITS)
        if config.data[split].strip()
    }
    if config.select_lang not in out["valid"]:
        raise ValueError(
            f"select_lang={config.select_lang!r} has no data.valid entry "
            f"(has {out['valid']}); model selection needs its validation set"
        )
    return out


def open_sets(
    config: ml_collections.ConfigDict, prepared_set, source: pretrained.EncoderSource
) -> dict[str, dict[str, nli.Pairs]]:
    """{split: {lang: Pairs}} over the prepared set; training sets must have the three classes.
    Translate-test pairs hold English text (translations of ``lang``'s rows): English's id."""
    out: dict[str, dict[str, nli.Pairs]] = {}
    for split, langs in split_langs(config).items():
        for lang in langs:
            lid = source.lang_id("en" if split == "translate_test" else lang, f"data.{split}")
            labels = prepared_set.labels(split, lang)
            if split == "train":
                nli.check_three_classes(labels, f"data.train {lang}")
            sides = prepared_set.sentences(split, lang)
            out.setdefault(split, {})[lang] = nli.Pairs(*sides, labels, lid)
    return out


def source_paths(config: ml_collections.ConfigDict) -> list[Path]:
    """The files the run reads (``Plan.sources``): those of ``read_text``'s splits."""
    return corpus_lib.split_paths(
        {f"data.{s}": config.data[s] for s in ("train", "valid", "test", "translate_test")},
        root=config.data.root,
        data_dir=config.data.tfds_data_dir or None,
    )


def check_resumable(saved_config: Mapping[str, Any], config, where: str) -> None:
    """Refuses a resume under another source, dropout (rates or masks), ``finetune_layers`` (the
    optimizer state's layout) or ``weighted_training`` (the loss); a checkpoint written before
    the ``TRAINING_DEFAULTS`` settings has their defaults."""
    keys = ("dropout", "encoder_dropout", "encoder_attention_dropout", *TRAINING_DEFAULTS)
    pretrained.check_same_source({**TRAINING_DEFAULTS, **saved_config}, config, where, *keys)


def source_of(config: ml_collections.ConfigDict, env: loop.Env) -> pretrained.EncoderSource:
    """The encoder: the checkpoint's own (resuming), a pretraining run's, or a random init."""
    saved = env.saved
    if saved is not None:
        check_resumable(saved["config"], config, env.where)
        return pretrained.EncoderSource(
            Tokenizer.from_bytes(base64.b64decode(saved["tokenizer"])),
            ModelConfig.from_saved(saved["model"]),
            list(saved["langs"]),
            None,
            saved["init"],
        )
    if config.init_checkpoint:
        source = pretrained.load_pretrained(config.init_checkpoint, config.init_step)
    else:
        train = prepare_lib.streamed_tokenizer(config, env.workdir)  # premises and hypotheses
        source = pretrained.random_source(config, env.workdir, train=train)
    source.model = pretrained.with_dropout(source.model, config)
    return source


def buckets_of(config: ml_collections.ConfigDict, length: int) -> tuple[int, ...]:
    """The padded lengths a batch may have: ``length_buckets`` below ``length``, then ``length``."""
    try:
        wanted = [int(x) for x in str(config.length_buckets).split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"length_buckets={config.length_buckets!r}: integers, e.g. '32,64'"
        ) from None
    if any(b < 5 for b in wanted):
        raise ValueError(f"length_buckets={config.length_buckets!r}: a pair row needs 5 tokens")
    return (*sorted({b for b in wanted if b < length}), length)


def bucket_of(row_lengths: np.ndarray, buckets: Sequence[int]) -> int:
    """The first bucket holding the longest row (cut to the last bucket if longer)."""
    return bucket_length(min(int(row_lengths.max()), buckets[-1]), buckets)


def length_of(config: ml_collections.ConfigDict, model: ModelConfig, sets: dict) -> int:
    """The longest padded row length, for every set (``buckets_of`` adds shorter ones)."""
    lengths = np.concatenate(
        [p.lengths(config.max_len) for by in sets.values() for p in by.values()]
    )
    length = row_length(int(lengths.max()), config, model)
    n_cut = int((lengths > length).sum())
    if n_cut:
        logging.warning(
            "%d pairs are longer than seq_len=%d: their longer sentence is cut", n_cut, length
        )
    logging.info(
        "XNLI rows of %d tokens; training pairs: %s",
        length,
        ", ".join(f"{k} {len(v)}" for k, v in sets["train"].items()),
    )
    return length


class Epochs:
    """Loop step ``s`` ↔ (epoch, batch): epoch ``s // steps_per_epoch + 1`` is a fresh
    permutation of the training rows (a function of seed and epoch) cut into batches, so the
    batches of a resumed run are those of an uninterrupted one, mid-epoch included."""

    def __init__(
        self, config: ml_collections.ConfigDict, train: Sequence[nli.Pairs], buckets: Sequence[int]
    ) -> None:
        self.config, self.train, self.buckets = config, list(train), tuple(buckets)
        self.lengths = np.concatenate([p.lengths(config.max_len) for p in self.train])
        self.n_pairs = len(self.lengths)
        self.n_rows = len(nli.epoch_order(self.n_pairs, 0, config.seed, config.epoch_size))
        self.steps = -(-self.n_rows // config.batch_size)  # per epoch
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            c = self.config
            self._order = (epoch, nli.epoch_order(self.n_pairs, epoch, c.seed, c.epoch_size))
        return self._order[1]

    def batch(self, step: int, rows: tuple[int, int]) -> Batch:
        """Rows ``[start, stop)`` of update ``step``'s batch: only their pairs are read."""
        epoch, k = divmod(step, self.steps)
        i, bs = k * self.config.batch_size, self.config.batch_size
        index = self.order(epoch + 1)[i : i + bs]
        length = bucket_of(self.lengths[index], self.buckets)  # the whole batch's, on every host
        index = nli.padded(index, bs)[rows[0] : rows[1]]
        return nli.batch_of(self.train, index, max_len=self.config.max_len, length=length)

    def rows_done(self, step: int) -> int:
        """Pairs of the current epoch's order trained after ``step`` steps (0 at its end)."""
        return min(step % self.steps * self.config.batch_size, self.n_rows)


def _mode(langs: Sequence[str]) -> str:
    return "zero-shot" if len(langs) == 1 else f"translate-train ({','.join(langs)})"


SUM_KEYS = ("loss_sum", "n_pred", "n_correct")


def new_loop_state(order_inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The loop's state, saved in every checkpoint (JSON) and enough to continue exactly.

    ``epoch`` counts the evaluated epochs; ``epoch_rows`` / ``epoch_sums`` are the progress of the
    next one (pairs of its order trained, its training loss sums so far), 0 at an epoch's end.
    The order and the dropout keys are functions of (seed, epoch) and ``step``, so nothing random
    is stored; ``order_inputs`` (what the order and the batches depend on) is compared on resume.
    """
    return {
        "epoch": 0,
        "step": 0,
        "bad_epochs": 0,
        "stopped": False,
        "history": [],  # one record per evaluated epoch: all that select() and results read
        "epoch_rows": 0,
        "epoch_sums": {k: 0.0 for k in SUM_KEYS},
        "order_inputs": dict(order_inputs),
        "nonfinite_run": 0,  # skipped updates in a row so far (loop.count_nonfinite)
    }


def check_mid_epoch_resume(
    saved: Mapping[str, Any], current: Mapping[str, Any], where: str
) -> None:
    """A checkpoint taken inside an epoch continues that epoch's order where it stopped: that is
    exact only with the settings that made the order and cut it into batches."""
    keys = list(current) + [k for k in saved if k not in current]  # a setting unset since, too
    changed = [
        f"{k}={saved.get(k)} -> {current.get(k)}" for k in keys if saved.get(k) != current.get(k)
    ]
    if changed:
        raise ValueError(
            f"{where} was taken inside an epoch; its batches depend on settings that changed "
            f"({', '.join(changed)}): resume with the original values or use another workdir"
        )


def saved_loop(epochs: Epochs, loop_state: dict[str, Any]) -> dict[str, Any]:
    """The loop state in XNLI's checkpoint layout (``new_loop_state``), which older runs wrote
    and still resume from."""
    step = loop_state["step"]
    return {
        "epoch": step // epochs.steps,
        "step": step,
        "bad_epochs": loop_state["bad_evals"],
        "stopped": bool(loop_state.get("stopped")),
        "history": loop_state["history"],
        "epoch_rows": epochs.rows_done(step),
        "epoch_sums": loop_state["epoch_sums"],
        "order_inputs": loop_state["order_inputs"],
        "nonfinite_run": loop_state["nonfinite_run"],
    }


def resumed_loop(epochs: Epochs, saved: dict, latest: int, order_inputs: dict) -> dict[str, Any]:
    """A checkpoint's XNLI loop state as the loop's, checked to continue exactly."""
    saved = {**new_loop_state(order_inputs), **saved}  # older versions lack the mid-epoch keys
    where = f"checkpoint {latest}"
    if saved["epoch_rows"]:
        check_mid_epoch_resume(saved["order_inputs"], order_inputs, where)
    bs = order_inputs["batch_size"]
    if saved["step"] != saved["epoch"] * epochs.steps + -(-saved["epoch_rows"] // bs):
        raise ValueError(
            f"{where} holds {saved['epoch']} epochs and {saved['epoch_rows']} pairs in "
            f"{saved['step']} updates, which epochs of {epochs.steps} updates of {bs} pairs do "
            "not give: resume with the original batch_size and epoch_size, or another workdir"
        )
    return {
        "step": saved["step"],
        "best": None,  # the caller's metric picks it from the history
        "bad_evals": saved["bad_epochs"],
        "nonfinite_run": saved["nonfinite_run"],
        "stopped": saved["stopped"],
        "history": saved["history"],
        "epoch_sums": saved["epoch_sums"],
        "order_inputs": order_inputs,
    }


def epoch_record(loop_state: dict, step: int, metrics: dict, epochs: Epochs) -> dict[str, Any]:
    """The history record of an evaluated epoch (epoch 0: before fine-tuning), with the epoch's
    training loss and accuracy; starts the next epoch's sums."""
    record = {"epoch": step // epochs.steps, "step": step, **metrics}
    if step > 0:
        total, loop_state["epoch_sums"] = loop_state["epoch_sums"], {k: 0.0 for k in SUM_KEYS}
        n = max(total["n_pred"], 1.0)
        record["train/loss"] = total["loss_sum"] / n
        record["train/acc"] = 100.0 * total["n_correct"] / n
    loop_state["history"].append(record)
    return record


def open_data(config: ml_collections.ConfigDict, env: loop.Env):
    """The encoder's source, the NLI sets prepared with its tokenizer, those sets (``open_sets``)
    and the longest padded row length."""
    split_langs(config)  # select_lang checked before anything is read
    source = source_of(config, env)
    prepared_set = prepare_lib.open_for_model(config, env.workdir, source.tokenizer)
    sets = open_sets(config, prepared_set, source)
    return source, prepared_set, sets, length_of(config, source.model, sets)


def classifier_of(config: ml_collections.ConfigDict, encoder: ModelConfig) -> XNLIClassifier:
    return XNLIClassifier(
        encoder, n_classes=len(LABELS), dropout=config.dropout, pooling=config.pooling
    )


def setup(config: ml_collections.ConfigDict, env: loop.Env) -> loop.Plan:
    """The encoder's source, the NLI sets tokenized once by its tokenizer (``data/prepare.py``);
    one update per batch of an epoch's order, evaluation of every validation language at each
    epoch's end (``steps_per_epoch`` steps)."""
    source, prepared_set, sets, length = open_data(config, env)
    eval_sets = {k: v for k, v in sets.items() if k != "train"}
    model = classifier_of(config, source.model)
    buckets = buckets_of(config, length)
    tx, epochs = make_optimizer(config), Epochs(config, list(sets["train"].values()), buckets)
    weights = class_weights_of(config, list(sets["train"].values()))
    best_metric = f"valid/{config.select_lang}/acc"
    order_inputs = order_inputs_of(config, epochs.n_pairs)
    rows = env.rows_of(config.batch_size)
    # FLOPs per token at a row length (the head's few left out)
    flops = functools.partial(xlm_flops_per_token, source.model, n_pred_fraction=0.0)

    def update(step: int) -> loop.Update:
        fetch = functools.partial(epochs.batch, step, rows)
        return loop.Update("xnli", "xnli", 1.0, config.batch_size, fetch, flops)

    def compile_programs(shardings) -> loop.Programs:
        step_fn, predict_fn = make_steps(config, model, tx, env.mesh, env.rules, shardings, weights)
        runner, n = Runner(env.mesh, env.rules), config.eval_batch_size
        evaluate = functools.partial(evaluate_sets, max_len=config.max_len, buckets=buckets)
        return loop.Programs(
            {"xnli": step_fn},
            lambda params, step: evaluate(runner, predict_fn, params, eval_sets, n),
            lambda: step_fn._cache_size() + predict_fn._cache_size(),
        )

    def init_params(state: train_state.TrainState) -> train_state.TrainState:
        if source.params is None:
            return state
        encoder = pretrained.place_params(
            source.params, state.params["encoder"], source.description
        )
        source.params = None  # the host copy is no longer needed
        return state.replace(params={**state.params, "encoder": encoder})

    def on_eval(loop_state: dict, step: int, metrics: dict) -> dict[str, float]:
        record = epoch_record(loop_state, step, metrics, epochs)
        summary = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if "/avg/" in k)
        logging.info(
            "epoch %d: %s %.1f, %s", record["epoch"], best_metric, record[best_metric], summary
        )
        return {k: v for k, v in record.items() if isinstance(v, float)}

    def restore(plan: loop.Plan, saved: dict, latest: int) -> dict:
        resumed = resumed_loop(epochs, saved, latest, order_inputs)
        best = select(resumed["history"], best_metric)
        return {**resumed, "best": best[best_metric] if best else None}

    def observe(loop_state: dict, key: str, sums: dict) -> None:
        for k in SUM_KEYS:
            loop_state["epoch_sums"][k] += sums[k]

    meta = loop.run_meta(
        config,
        source.tokenizer.serialized,
        model=source.model.to_dict(),
        langs=source.langs,
        init=source.info,
        row_length=length,
    )
    return loop.Plan(
        model=model,
        tx=tx,
        compile=compile_programs,
        update=update,
        cadence=loop.Cadence(
            config.n_epochs * epochs.steps, config.log_every, epochs.steps, config.checkpoint_every
        ),
        meta=meta,
        describe=f"fine-tuning {source.description}: {config.n_epochs} epochs x {epochs.steps} "
        f"steps of {config.batch_size} pairs; evaluating "
        f"{ {split: sorted(v) for split, v in eval_sets.items()} }",
        pad_id=PAD_ID,
        init_params=init_params,
        loop={
            "stopped": False,
            "history": [],
            "epoch_sums": {k: 0.0 for k in SUM_KEYS},
            "order_inputs": order_inputs,
        },
        save_state=lambda plan, loop_state: saved_loop(epochs, loop_state),
        restore_state=restore,
        observe=observe,
        on_eval=on_eval,
        eval_at_start=config.eval_at_start,
        sources=source_paths(config),
        known_sources=prepared_set.manifest["sources"],
        finish=lambda loop_state, last: final_results(
            summary_of(config, source, list(sets["train"]), epochs.n_pairs, length),
            loop_state,
            last,
            config,
            env.workdir,
        ),
    )


def order_inputs_of(config: ml_collections.ConfigDict, n_train: int) -> dict[str, Any]:
    """What the epochs' order and its batches depend on (compared when resuming mid-epoch);
    ``length_buckets`` (their shapes, hence dropout masks) only when set, as older runs saved."""
    keys = ["epoch_size", "batch_size"] + (["length_buckets"] if config.length_buckets else [])
    return {"seed": config.seed, "n_train": n_train} | {k: config[k] for k in keys}


def summary_of(config, source, train_langs, n_train: int, length: int) -> dict[str, Any]:
    return {
        "init": source.description,
        "mode": _mode(train_langs),
        "train_langs": list(train_langs),
        "n_train": n_train,
        "row_length": length,
        "lr_e": config.optimizer_e.lr,
        "lr_p": config.optimizer_p.lr,
        "batch_size": config.batch_size,
        "select_lang": config.select_lang,
        "finetune_layers": config.finetune_layers,
        "weighted_training": config.weighted_training,
    }


def final_results(
    summary: dict, loop_state: dict, last: dict, config: ml_collections.ConfigDict, workdir: Path
) -> dict[str, Any]:
    """The run's results (``results.{json,csv,md,png}``): the history and the epochs selected by
    ``select_lang`` and by the average."""
    history, best_metric = loop_state["history"], f"valid/{config.select_lang}/acc"
    results = {
        **summary,
        "history": history,
        "selected": {
            config.select_lang: select(history, best_metric),
            "avg": select(history, "valid/avg/acc"),
        },
        "complete": sum(h["epoch"] >= 1 for h in history) >= config.n_epochs
        or bool(loop_state.get("stopped")),
        "compiled_programs": last["compiled_programs"],
    }
    if jax.process_index() == 0:
        report.write_results(workdir, results)
    return results


TASK = loop.Task(
    "xnli",
    setup,
    lambda c: {"batch_size": c.batch_size, "eval_batch_size": c.eval_batch_size},
    best=lambda c: (f"valid/{c.select_lang}/acc", "max"),
    check=_check_config,
)


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_step: Callable[[int, train_state.TrainState], None] | None = None,
) -> dict[str, Any]:
    """Fine-tunes and evaluates as ``config`` says, resuming from ``workdir`` if it holds a
    checkpoint. Writes ``results.{json,csv,md,png}`` and returns the results dict (``history``:
    one record per evaluated epoch; ``selected``: the epochs picked by ``select_lang`` and by the
    average; ``compiled_programs``).

    On SIGTERM/SIGINT it checkpoints at the next update and raises ``Preempted``; rerunning
    resumes inside the epoch with the same batches, dropout keys and updates as an uninterrupted
    run. ``on_step(step, state)`` runs after every update (tests).
    """
    return loop.run(TASK, config, workdir, on_step=on_step)


# --- sweep ---------------------------------------------------------------------------------------


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}={text!r}: expected comma-separated numbers") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def run_dir_name(lr: float, batch_size: int) -> str:
    return f"lr{lr:g}_bs{batch_size}"


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[dict]:
    """Fine-tunes every (learning rate, batch size) of ``config.sweep`` in
    ``workdir/lr{lr}_bs{bs}/`` (runs with complete results are skipped, an interrupted one
    resumes), then writes ``sweep.csv`` / ``sweep.md``: each run's selected-epoch numbers.
    """
    if config.eval_only:
        raise ValueError("eval_only evaluates one run: --mode=xnli --workdir=SWEEP/lr{lr}_bs{bs}")
    workdir = Path(workdir)
    lrs = _numbers(config.sweep.lrs, float, "sweep.lrs")
    sizes = _numbers(config.sweep.batch_sizes, int, "sweep.batch_sizes")
    summary = []
    for lr in lrs:
        for bs in sizes:
            run = workdir / run_dir_name(lr, bs)
            done = run / "results.json"
            results = json.loads(done.read_text()) if done.exists() else None
            if results is None or not results.get("complete"):
                c = config.copy_and_resolve_references()
                c.optimizer_e.lr = lr
                c.optimizer_p.lr = lr
                c.batch_size = bs
                logging.info("sweep: lr %g, batch size %d -> %s", lr, bs, run)
                results = finetune(c, run)
            else:
                logging.info("sweep: %s is complete, skipped", run)
            summary.append({"run": run.name, "lr": lr, "batch_size": bs, "results": results})
    if jax.process_index() == 0:
        report.write_sweep(workdir, summary, config.select_lang)
    return summary
