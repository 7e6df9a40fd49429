"""XNLI: zero-shot cross-lingual classification by fine-tuning a pretrained encoder.

The paper's protocol (Lample & Conneau 2019, §5.1): fine-tune the pretrained encoder and a linear
head on English NLI pairs, then classify pairs in the 14 other XNLI languages with no labels in
those languages. As XLM's ``src/evaluation/xnli.py``:

* a pair is one row ``</s> premise </s> hypothesis </s>`` (``data/nli.py``);
* the classifier reads the last layer at position 0 (``model/classifier.py``);
* the encoder and the head have their own Adam (``optimizer_e`` / ``optimizer_p``), constant
  learning rates, every encoder layer fine-tuned, the encoder's own dropout active;
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from xlm_jax.core import parallel
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.metrics import MetricWriter
from xlm_jax.core.preemption import Preempted, PreemptionGuard
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data import nli
from xlm_jax.data.nli import LABELS, Batch, Rows
from xlm_jax.model import objectives, pretrained
from xlm_jax.model.classifier import XNLIClassifier
from xlm_jax.model.encoder import ModelConfig
from xlm_jax.tasks import pretrain as train
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

    c.select_lang = "en"  # model selection by this language's validation accuracy (the source)
    c.dropout = 0.0  # on the pooled vector before the head (glue-xnli.py --dropout default 0)
    # The encoder keeps the pretrained model's dropout (XLM fine-tunes in train mode);
    # a value >= 0 overrides it.
    c.encoder_dropout = -1.0
    c.encoder_attention_dropout = -1.0

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

    c.batch_size = 8  # pairs per update (README: 8)
    c.eval_batch_size = 32
    c.n_epochs = 250  # README: 250
    c.epoch_size = 20_000  # pairs per epoch (README: 20000); -1 = one pass over the training set
    c.eval_at_start = False  # also evaluate the untrained head (reported as epoch 0)
    c.patience = -1  # stop after this many epochs without a better select_lang accuracy; -1 = never
    c.log_every = 50
    c.keep_checkpoints = 1  # the last N, plus the best by select_lang validation accuracy
    # Also checkpoint every N updates inside an epoch (0 = only at epoch ends and on SIGTERM /
    # SIGINT); resuming from one is exact. Only epoch checkpoints are ranked for the best one.
    c.checkpoint_every = 0
    train.nonfinite_settings(c)  # a NaN/inf update is skipped; too many in a row stop the run

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


# --- steps ---------------------------------------------------------------------------------------


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam for the encoder (``optimizer_e``) and for the head (``optimizer_p``), as XLM's two
    optimizers; decoupled weight decay (if any) skips 1-D parameters, as pretraining does."""

    def adam(o: ml_collections.ConfigDict) -> optax.GradientTransformation:
        return optax.adamw(
            o.lr,
            b1=o.beta1,
            b2=o.beta2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
        )

    tx = optax.multi_transform(
        {"encoder": adam(config.optimizer_e), "head": adam(config.optimizer_p)},
        {"encoder": "encoder", "head": "head"},  # a prefix of the parameter tree
    )
    if config.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
    return tx


def train_step(state: train.TrainState, batch, rng, lam, *, model, tx, mesh, batch_axes):
    """One update on ``lam`` (1, or NaN from the ``debug_nonfinite_steps`` test hook) times the
    mean cross-entropy of the batch's real rows (weight 1); a non-finite loss or gradient skips
    it (``train.apply_gradients``, as pretraining and translation).

    Sums and counts come from ``objectives.sharded_token_loss_sums`` (rows split over the batch
    axes, a psum of the per-shard sums), so they are exact whatever the mesh.
    """

    def loss_sums(params):
        logits = model.apply(
            {"params": params},
            batch["tokens"],
            batch["positions"],
            batch["langs"],
            deterministic=False,
            rngs={"dropout": rng},
        )
        sums = objectives.sharded_token_loss_sums(
            logits[:, None, :],
            batch["labels"],
            batch["weights"],
            mesh=mesh,
            batch_axes=batch_axes,
            vocab_axes=(),
        )
        return sums["loss_sum"], sums

    grads, sums = jax.grad(loss_sums, has_aux=True)(state.params)
    return train.apply_gradients(state, grads, sums, lam, tx)


def predict(params, batch, *, model) -> jax.Array:
    logits = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["langs"], deterministic=True
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def make_steps(config, model, tx, mesh: Mesh, rules, shardings) -> tuple[Callable, Callable]:
    """The compiled update ``(state, batch, step, lam)`` and prediction ``(params, batch)``."""
    batch_sharding = parallel.batch_sharding(mesh, rules)
    repl = parallel.replicated(mesh)
    step_fn = jax.jit(
        train.keyed_by_step(
            functools.partial(
                train_step,
                model=model,
                tx=tx,
                mesh=mesh,
                batch_axes=parallel.mesh_axes_of("batch", rules),
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

    def __init__(self, config: ml_collections.ConfigDict, batch_sizes: Mapping[str, int]):
        self.rules = parallel.rules_from_config(config.mesh.rules)
        self.mesh: Mesh = parallel.make_mesh(config.mesh.shape)
        for what, n in batch_sizes.items():
            parallel.check_batch_size(n, self.mesh, self.rules, what)
        self.batch_sharding: NamedSharding = parallel.batch_sharding(self.mesh, self.rules)
        self.replicated = parallel.replicated(self.mesh)
        self.dp = parallel.data_parallel_size(self.mesh, self.rules)

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
    for what in ("train", "valid"):
        if not config.data[what].strip():
            raise ValueError(f"data.{what} is empty: give 'LANG: SOURCE' entries")


def accuracy(
    runner: Runner, predict_fn, params, rows: Rows, batch_size: int
) -> tuple[float, np.ndarray]:
    """Accuracy (%) over the real rows, and the predictions."""
    outs = [predict_fn(params, runner.put(b)) for b in nli.eval_batches(rows, batch_size)]
    preds = np.concatenate(jax.device_get(outs))[: len(rows)]
    return 100.0 * float(np.mean(preds == rows.labels)), preds


def evaluate_sets(
    runner: Runner,
    predict_fn,
    params,
    sets: Mapping[str, Mapping[str, Rows]],
    batch_size: int,
) -> dict[str, float]:
    """``{'valid/fr/acc': ..., 'valid/avg/acc': ...}`` for every split and language."""
    out: dict[str, float] = {}
    with runner.context():
        for split, by_lang in sets.items():
            accs = []
            for lang, rows in by_lang.items():
                acc, _ = accuracy(runner, predict_fn, params, rows, batch_size)
                out[f"{split}/{lang}/acc"] = acc
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


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_epoch: Callable[[int, train.TrainState], None] | None = None,
    on_step: Callable[[int, train.TrainState], None] | None = None,
) -> dict[str, Any]:
    """Fine-tunes and evaluates as ``config`` says, resuming from ``workdir`` if it holds a
    checkpoint. Writes ``results.{json,csv,md,png}`` and returns the results dict (``history``:
    one record per evaluated epoch; ``selected``: the epochs picked by ``select_lang`` and by the
    average; ``compiled_programs``).

    On SIGTERM/SIGINT (``PreemptionGuard``) it checkpoints at the next update and raises
    ``Preempted``; rerunning resumes inside the epoch with the same batches, dropout keys and
    updates as an uninterrupted run. A non-finite loss or gradient skips its update (counted in
    ``train/skipped_updates``); ``max_nonfinite_steps`` skips in a row stop the run with
    ``FloatingPointError``. ``on_step(step, state)`` runs after every update (tests).
    """
    _check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_primary = jax.process_index() == 0
    runner = Runner(
        config, {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}
    )

    # Text first: a bad file fails in seconds, before any checkpoint is read.
    root, kw = config.data.root, corpus_lib.read_options(config.data)
    train_sets = nli.read_sets(config.data.train, "data.train", root=root, **kw)
    for lang, examples in train_sets.items():
        nli.check_three_classes(examples, f"data.train {lang}")
    eval_text = {
        split: nli.read_sets(config.data[split], f"data.{split}", root=root, **kw)
        for split in ("valid", "test", "translate_test")
        if config.data[split].strip()
    }
    if config.select_lang not in eval_text["valid"]:
        raise ValueError(
            f"select_lang={config.select_lang!r} has no data.valid entry "
            f"(has {sorted(eval_text['valid'])}); model selection needs its validation set"
        )

    best_metric = f"valid/{config.select_lang}/acc"
    ckpt = Checkpointer(
        workdir / "checkpoints",
        keep_last=config.keep_checkpoints,
        best_metric=best_metric,
        best_mode="max",
    )
    # A damaged newest checkpoint is skipped (with a warning) for the previous one, as pretraining.
    newest = ckpt.newest_readable_meta()
    latest, saved = newest if newest is not None else (None, None)
    if saved is not None:
        train.check_same_source(
            saved["config"],
            config,
            f"checkpoint {latest} in {ckpt.directory}",
            "dropout",
            "encoder_dropout",
            "encoder_attention_dropout",
        )
        source = pretrained.EncoderSource(
            Tokenizer.from_bytes(base64.b64decode(saved["tokenizer"])),
            ModelConfig.from_dict(saved["model"]),
            list(saved["langs"]),
            None,
            saved["init"],
        )
    elif config.init_checkpoint:
        source = pretrained.load_pretrained(config.init_checkpoint, config.init_step)
        source.model = pretrained.with_dropout(source.model, config)
    else:
        source = pretrained.random_source(
            config,
            workdir,
            lambda: {
                lang: [s for ex in exs for s in (ex.premise, ex.hypothesis)]
                for lang, exs in train_sets.items()
            },
        )
        source.model = pretrained.with_dropout(source.model, config)
    tokenizer, mcfg = source.tokenizer, source.model

    # Rows: one padded length for every set, so each step compiles once.
    train_tok = {lang: nli.tokenize_pairs(exs, tokenizer, lang) for lang, exs in train_sets.items()}
    eval_tok = {
        # translate-test sets hold English text (translations of `lang`'s rows)
        split: {
            lang: nli.tokenize_pairs(exs, tokenizer, "en" if split == "translate_test" else lang)
            for lang, exs in by_lang.items()
        }
        for split, by_lang in eval_text.items()
    }
    pair_lengths = [
        nli.pair_length(p, h, config.max_len)
        for tok in [*train_tok.values(), *(t for by in eval_tok.values() for t in by.values())]
        for p, h in zip(tok[0], tok[1], strict=True)
    ]
    length = row_length(max(pair_lengths), config, mcfg)
    n_cut = sum(n > length for n in pair_lengths)
    if n_cut:
        logging.warning(
            "%d pairs are longer than seq_len=%d: their longer sentence is cut", n_cut, length
        )
    pack = functools.partial(nli.pack_rows, max_len=config.max_len, length=length)
    en_id = source.lang_id("en", "data.translate_test") if "translate_test" in eval_tok else 0
    train_rows = Rows.concat(
        [
            pack(*tok, train_sets[lang], source.lang_id(lang, "data.train"))
            for lang, tok in train_tok.items()
        ]
    )
    eval_rows = {
        split: {
            lang: pack(
                *tok,
                eval_text[split][lang],
                en_id if split == "translate_test" else source.lang_id(lang, f"data.{split}"),
            )
            for lang, tok in by_lang.items()
        }
        for split, by_lang in eval_tok.items()
    }
    logging.info(
        "XNLI rows of %d tokens; training pairs: %s",
        length,
        ", ".join(f"{k} {len(v)}" for k, v in train_sets.items()),
    )

    model = XNLIClassifier(mcfg, n_classes=len(LABELS), dropout=config.dropout)
    tx = make_optimizer(config)
    state, shardings = train.init_state(
        model, tx, jax.random.key(config.seed), runner.mesh, runner.rules, runner.dp
    )
    step_fn, predict_fn = make_steps(config, model, tx, runner.mesh, runner.rules, shardings)

    order_inputs = {
        "seed": config.seed,
        "n_train": len(train_rows),
        "epoch_size": config.epoch_size,
        "batch_size": config.batch_size,
    }
    loop = new_loop_state(order_inputs)
    if latest is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        latest, state, saved_loop, _ = ckpt.restore_newest_readable(abstract)
        loop = {**loop, **saved_loop}  # checkpoints of older versions lack the mid-epoch keys
        if loop["epoch_rows"]:
            check_mid_epoch_resume(loop["order_inputs"], order_inputs, f"checkpoint {latest}")
            logging.info(
                "resumed in epoch %d after %d of its pairs (%d updates)",
                loop["epoch"] + 1,
                loop["epoch_rows"],
                loop["step"],
            )
        else:
            logging.info("resumed after epoch %d (%d updates)", loop["epoch"], loop["step"])
        loop["order_inputs"] = order_inputs
    elif source.params is not None:
        encoder = pretrained.place_params(
            source.params, state.params["encoder"], source.description
        )
        state = state.replace(params={**state.params, "encoder": encoder})
        source.params = None  # the host copy is no longer needed

    meta = {
        "config": config.to_dict(),
        "tokenizer": base64.b64encode(tokenizer.serialized).decode("ascii"),
        "model": mcfg.to_dict(),
        "langs": source.langs,
        "init": source.info,
        "row_length": length,
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }
    n_epoch_rows = len(nli.epoch_order(len(train_rows), 0, config.seed, config.epoch_size))
    steps_per_epoch = -(-n_epoch_rows // config.batch_size)
    writer = MetricWriter(
        workdir, total_steps=config.n_epochs * steps_per_epoch, is_primary=is_primary
    )
    logging.info(
        "fine-tuning %s: %d epochs x %d steps of %d pairs; evaluating %s",
        source.description,
        config.n_epochs,
        steps_per_epoch,
        config.batch_size,
        {split: sorted(v) for split, v in eval_rows.items()},
    )

    def evaluate(epoch: int) -> dict[str, Any]:
        metrics = evaluate_sets(runner, predict_fn, state.params, eval_rows, config.eval_batch_size)
        summary = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if "/avg/" in k)
        logging.info("epoch %d: %s %.1f, %s", epoch, best_metric, metrics[best_metric], summary)
        writer.write(loop["step"], metrics)
        return {"epoch": epoch, "step": loop["step"], **metrics}

    if latest is None and config.eval_at_start:
        loop["history"].append(evaluate(0))

    def save(metrics: Mapping[str, float] | None, force: bool) -> None:
        # Keyed by update, so mid-epoch saves and epoch ends share one increasing sequence;
        # only an epoch's save carries metrics: the best-checkpoint ranking sees evaluated epochs.
        ckpt.save(loop["step"], state, data_state=loop, meta=meta, metrics=metrics, force=force)

    def stop_for_preemption() -> None:
        ckpt.wait()
        ckpt.close()
        writer.close()
        raise Preempted(loop["step"])

    window = _Window(
        loop["epoch_sums"],
        lambda flags: train.count_nonfinite(flags, loop, config, loop["step"], ckpt),
    )
    poisoned = train.poisoned_steps(config)
    with runner.context(), PreemptionGuard() as guard:
        while loop["epoch"] < config.n_epochs and not loop["stopped"]:
            epoch = loop["epoch"] + 1
            order = nli.epoch_order(len(train_rows), epoch, config.seed, config.epoch_size)
            for i in range(loop["epoch_rows"], len(order), config.batch_size):
                batch = train_rows.batch(order[i : i + config.batch_size], config.batch_size)
                # The dropout key is a function of the update count alone, so it survives resumes.
                state, sums = step_fn(
                    state,
                    runner.put(batch),
                    np.int32(loop["step"]),
                    np.float32("nan" if loop["step"] in poisoned else 1.0),
                )
                loop["step"] += 1
                loop["epoch_rows"] = min(i + config.batch_size, len(order))
                step = loop["step"]
                window.add(sums)
                if on_step is not None:
                    on_step(step, state)
                if step % config.log_every == 0:
                    window.log(writer, step, batch_tokens=batch)
                if loop["epoch_rows"] == len(order):
                    break  # the epoch's end: its evaluated checkpoint, then the guard (below)
                preempted = guard.should_stop(step)
                if preempted or (
                    config.checkpoint_every > 0 and step % config.checkpoint_every == 0
                ):
                    window.count()  # the epoch's training sums so far go into the checkpoint
                    save(None, force=preempted)
                if preempted:
                    window.log(writer, step, batch_tokens=None)  # this process ends: log it now
                    stop_for_preemption()
            window.log(writer, loop["step"], batch_tokens=None)
            record = evaluate(epoch)
            total = loop["epoch_sums"]
            n = total["n_pred"]
            record["train/loss"] = total["loss_sum"] / max(n, 1.0)
            record["train/acc"] = 100.0 * total["n_correct"] / max(n, 1.0)
            best = select(loop["history"], best_metric)
            improved = best is None or record[best_metric] > best[best_metric]
            loop["bad_epochs"] = 0 if improved else loop["bad_epochs"] + 1
            loop["history"].append(record)
            loop["epoch"] = epoch
            loop["epoch_rows"] = 0
            loop["epoch_sums"] = window.reset()
            if config.patience > 0 and loop["bad_epochs"] >= config.patience:
                logging.info(
                    "stopping: %s did not improve for %d epochs", best_metric, config.patience
                )
                loop["stopped"] = True
            save({k: v for k, v in record.items() if isinstance(v, float)}, force=True)
            if on_epoch is not None:
                on_epoch(epoch, state)
            # The epoch's last update is a step boundary too; its checkpoint is the one above.
            unfinished = loop["epoch"] < config.n_epochs and not loop["stopped"]
            if guard.should_stop(loop["step"]) and unfinished:
                stop_for_preemption()
    ckpt.wait()
    ckpt.close()
    writer.close()

    results = {
        "init": source.description,
        "mode": _mode(train_sets),
        "train_langs": list(train_sets),
        "n_train": len(train_rows),
        "row_length": length,
        "lr_e": config.optimizer_e.lr,
        "lr_p": config.optimizer_p.lr,
        "batch_size": config.batch_size,
        "select_lang": config.select_lang,
        "history": loop["history"],
        "selected": {
            config.select_lang: select(loop["history"], best_metric),
            "avg": select(loop["history"], "valid/avg/acc"),
        },
        "complete": loop["epoch"] >= config.n_epochs or loop["stopped"],
        "compiled_programs": step_fn._cache_size() + predict_fn._cache_size(),
    }
    if is_primary:
        report.write_results(workdir, results)
    return results


def _mode(train_sets: Mapping[str, Any]) -> str:
    langs = list(train_sets)
    return "zero-shot" if len(langs) == 1 else f"translate-train ({','.join(langs)})"


SUM_KEYS = ("loss_sum", "n_pred", "n_correct")


class _Window:
    """The step sums since the last log line, and the epoch's running training sums.

    Device values are fetched (the loop's only regular host sync) when a log line is due or a
    checkpoint needs the epoch's sums; every step is added to those sums once and in order, so a
    run resumed from a mid-epoch checkpoint reports bitwise the same epoch loss. A skipped
    (non-finite) update is left out of the sums, which it would make NaN; each step's skip flag
    goes to ``on_counted`` once, in order.
    """

    def __init__(
        self, epoch_sums: dict[str, float], on_counted: Callable[[list[float]], None]
    ) -> None:
        self.epoch_sums = epoch_sums  # the loop state's dict, updated in place
        self.on_counted = on_counted
        self.steps: list[Any] = []  # device sums, or host dicts once fetched
        self.counted = 0  # the first `counted` steps are already in epoch_sums

    def add(self, sums: Mapping[str, jax.Array]) -> None:
        self.steps.append(sums)

    def count(self) -> list[dict[str, float]]:
        """Fetches the window and adds its uncounted steps to the epoch's sums."""
        got = [{k: float(v) for k, v in s.items()} for s in jax.device_get(self.steps)]
        new = got[self.counted :]
        for s in new:
            if not s["nonfinite"]:
                for k in SUM_KEYS:
                    self.epoch_sums[k] += s[k]
        self.steps, self.counted = got, len(got)
        self.on_counted([s["nonfinite"] for s in new])
        return got

    def log(self, writer: MetricWriter, step: int, batch_tokens: Batch | None) -> None:
        """Counts and logs the window, then starts a new one."""
        if not self.steps:
            return
        got = self.count()
        done = [s for s in got if not s["nonfinite"]]
        scalars = {"skipped_updates": float(len(got) - len(done))}
        if done:
            n = sum(s["n_pred"] for s in done)
            scalars = {
                "xnli/loss": sum(s["loss_sum"] for s in done) / max(n, 1.0),
                "xnli/acc": 100.0 * sum(s["n_correct"] for s in done) / max(n, 1.0),
                "xnli/grad_norm": float(np.mean([s["grad_norm"] for s in done])),
                **scalars,
            }
        if batch_tokens is not None:
            n_tok = int(np.count_nonzero(batch_tokens["tokens"] != PAD_ID)) * len(got)
            writer.progress(step, scalars, tokens=n_tok)
        writer.write(step, scalars, prefix="train/")
        self.steps, self.counted = [], 0

    def reset(self) -> dict[str, float]:
        """A new epoch: zero sums (a new dict, which the loop state takes over)."""
        self.epoch_sums = {k: 0.0 for k in SUM_KEYS}
        return self.epoch_sums


def new_loop_state(order_inputs: Mapping[str, int]) -> dict[str, Any]:
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
        "nonfinite_run": 0,  # skipped updates in a row so far (train.count_nonfinite)
    }


def check_mid_epoch_resume(
    saved: Mapping[str, int], current: Mapping[str, int], where: str
) -> None:
    """A checkpoint taken inside an epoch continues that epoch's order where it stopped: that is
    exact only with the settings that made the order and cut it into batches."""
    changed = [f"{k}={saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v]
    if changed:
        raise ValueError(
            f"{where} was taken inside an epoch; its batches depend on settings that changed "
            f"({', '.join(changed)}): resume with the original values or use another workdir"
        )


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
