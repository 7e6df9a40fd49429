"""Cross-lingual LM pretraining: the train state, optimizer, compiled steps and the loop.

Read top to bottom: optimizer and schedules → step functions (pure: batch in, sums out) → setup
(tokenizer, data, mesh, state, checkpoint) → the training loop (XLM's alternation of CLM/MLM/TLM
steps, each its own update) with periodic evaluation and checkpoints.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from xlm_jax.core import mfu, parallel
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.core.metrics import MetricWriter, summarize
from xlm_jax.core.preemption import Preempted, PreemptionGuard
from xlm_jax.data import batches as batches_lib
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data.corpus import lang_list
from xlm_jax.data.toy import write_toy_corpus
from xlm_jax.model import objectives
from xlm_jax.model.encoder import RUNTIME_FIELDS, ModelConfig, XLMEncoder, xlm_flops_per_token
from xlm_jax.text.tokenizer import PAD_ID, Tokenizer, load_or_train

Sums = dict[str, jax.Array]


# --- optimizer ---------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates applied so far
    params: Any
    opt_state: Any


def inverse_sqrt_schedule(lr: float, warmup_steps: int, warmup_init_lr: float) -> optax.Schedule:
    """XLM's ``adam_inverse_sqrt``: linear warmup to ``lr``, then ``lr * sqrt(warmup / step)``."""
    warmup_steps = max(1, warmup_steps)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32) + 1.0  # XLM counts updates from 1
        warm = warmup_init_lr + (lr - warmup_init_lr) * step / warmup_steps
        decay = lr * jnp.sqrt(warmup_steps / step)
        return jnp.where(step < warmup_steps, warm, decay)

    return schedule


def learning_rate(config: ml_collections.ConfigDict, updates: int) -> float:
    """The learning rate of the ``updates``-th update (for the log)."""
    o = config.optimizer
    return float(inverse_sqrt_schedule(o.lr, o.warmup_steps, o.warmup_init_lr)(max(updates - 1, 0)))


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with XLM's schedule, global-norm clipping and optional decoupled weight decay.

    Weight decay skips biases and LayerNorm parameters (1-D leaves), the usual practice.
    """
    schedule = inverse_sqrt_schedule(cfg.lr, cfg.warmup_steps, cfg.warmup_init_lr)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_grad_norm)
        if cfg.clip_grad_norm > 0
        else optax.identity(),
        optax.adamw(
            schedule,
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )


# --- steps: pure functions of (state, batch, rng) ----------------------------------------------


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, n_langs=len(lang_list(config)), **config.model.to_dict()
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """How a batch becomes inputs and targets (masked MLM/TLM or causal CLM), and its scoring.

    Scoring runs under ``shard_map`` over ``mesh``: rows split over ``batch_axes``, vocabulary
    over ``vocab_axes`` (``objectives.sharded_token_loss_sums``).
    """

    causal: bool
    vocab_size: int
    mesh: Mesh
    batch_axes: tuple[str, ...] = ()
    vocab_axes: tuple[str, ...] = ()
    word_pred: float = 0.15
    mask_keep_rand: tuple[float, float, float] = (0.8, 0.1, 0.1)
    log_weights: jax.Array | None = dataclasses.field(default=None, compare=False)

    def prepare(self, batch, rng):
        """Adds ``targets`` and ``weights`` (and, for MLM/TLM, corrupts tokens, ``pred_index``)."""
        if self.causal:
            return objectives.causal_targets(batch)
        return objectives.mask_tokens(
            batch,
            rng,
            vocab_size=self.vocab_size,
            word_pred=self.word_pred,
            mask_keep_rand=self.mask_keep_rand,
            log_weights=self.log_weights,
        )

    def loss_sums(self, model: XLMEncoder, params, batch, rng, *, deterministic: bool) -> Sums:
        """A prepared batch → loss sums (``rng`` is the dropout key)."""
        logits = model.apply(
            {"params": params},
            batch["tokens"],
            batch["positions"],
            batch["langs"],
            causal=self.causal,
            deterministic=deterministic,
            pred_index=batch.get("pred_index"),
            rngs={"dropout": rng},
        )
        return objectives.sharded_token_loss_sums(
            logits,
            batch["targets"],
            batch["weights"],
            mesh=self.mesh,
            batch_axes=self.batch_axes,
            vocab_axes=self.vocab_axes,
        )


def micro_batches(batch, k: int):
    """``(B, ...)`` arrays → ``(k, B/k, ...)``: micro-batch i takes rows i, i+k, i+2k, ...

    Strided rows keep every micro-batch spread over all data shards, so splitting needs no
    communication.
    """

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState, batch, rng, lam, *, model, objective: Objective, tx, accum_steps: int = 1
) -> tuple[TrainState, Sums]:
    """One update on one objective: loss = lam * (mean cross-entropy over predicted tokens).

    With ``accum_steps > 1`` the (already masked) batch is scanned in micro-batches whose
    gradients of the summed loss are added, then divided by the total number of predictions:
    the same update as the whole batch at once, in a fraction of the activation memory.
    """
    k_mask, k_drop = jax.random.split(rng)
    batch = objective.prepare(batch, k_mask)

    def grad_of_sum(params, micro, key):
        def f(p):
            sums = objective.loss_sums(model, p, micro, key, deterministic=False)
            return sums["loss_sum"], sums

        return jax.grad(f, has_aux=True)(params)

    if accum_steps == 1:
        grads, sums = grad_of_sum(state.params, batch, k_drop)
    else:

        def body(carry, xs):
            micro, i = xs
            grads, sums = grad_of_sum(state.params, micro, jax.random.fold_in(k_drop, i))
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = (
            jax.tree.map(jnp.zeros_like, state.params),
            {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "n_pred", "n_correct")},
        )
        (grads, sums), _ = jax.lax.scan(
            body, zeros, (micro_batches(batch, accum_steps), jnp.arange(accum_steps))
        )
    return apply_gradients(state, grads, sums, lam, tx)


def apply_gradients(
    state: TrainState, grads, sums: Sums, lam: jax.Array, tx
) -> tuple[TrainState, Sums]:
    """The update from gradients of a *summed* loss: scaled to ``lam`` × the mean over
    ``sums["n_pred"]`` predictions, clipped and applied by ``tx``.

    A non-finite loss or gradient skips the update (counted in ``sums["nonfinite"]``); params and
    the optimizer state stay as they were.
    """
    scale = lam / jnp.maximum(sums["n_pred"], 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(sums["loss_sum"] * scale) & jnp.isfinite(grad_norm)

    def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    params, opt_state = jax.lax.cond(
        finite, update, lambda _: (state.params, state.opt_state), None
    )
    sums = {
        **sums,
        "grad_norm": jnp.where(finite, grad_norm, 0.0),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    step = state.step + finite.astype(state.step.dtype)
    return TrainState(step=step, params=params, opt_state=opt_state), sums


def keyed_by_step(fn: Callable, seed: int, argnum: int) -> Callable:
    """``fn`` with its key argument (position ``argnum``) replaced by a step number (a host
    int32): the key ``fold_in(key(seed), step)`` is computed inside the compiled program.

    Why: the loops used to call ``fold_in`` eagerly between steps, a small device computation of
    its own. Besides the dispatch, with 8 emulated CPU devices it could deadlock XLA:CPU (the
    eager op held a pool thread waiting for a sharded step whose collective waited for a thread).
    The keys are the same as before, so runs and checkpoints are unchanged."""

    def with_key(*args):
        args = list(args)
        args[argnum] = jax.random.fold_in(jax.random.key(seed), args[argnum])
        return fn(*args)

    return with_key


def eval_step(params, batch, rng, *, model, objective: Objective) -> Sums:
    k_mask, k_drop = jax.random.split(rng)
    return objective.loss_sums(
        model, params, objective.prepare(batch, k_mask), k_drop, deterministic=True
    )


# --- setup --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """Everything the loop reads: iterators per step key, fixed validation batches, sizes."""

    train: dict[str, Any]  # step key -> StreamBatches | PairBatches
    valid: dict[str, list[dict[str, np.ndarray]]]  # step key -> batches
    sizes: dict[str, int]  # step key -> training tokens (for language sampling)
    token_counts: np.ndarray  # training-token frequencies (for sample_alpha)


def resolve_root(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """``data.root`` or, when empty, the generated toy corpus (so the demo needs no data)."""
    if config.data.root:
        return config.data.root
    logging.info("data.root is empty: using the generated toy corpus (synthetic text)")
    return str(write_toy_corpus(workdir / "toy_corpus", langs=tuple(lang_list(config))))


def build_steps(config: ml_collections.ConfigDict) -> list[list[batches_lib.StepSpec]]:
    langs = lang_list(config)
    return [
        batches_lib.parse_steps("clm", config.clm_steps, langs),
        batches_lib.parse_steps("mlm", config.mlm_steps, langs),
    ]


def build_data(
    config: ml_collections.ConfigDict,
    workdir: Path,
    tokenizer_path: Path,
    step_lists: list[list[batches_lib.StepSpec]],
    *,
    rows_of: Callable[[int], tuple[int, int]] = lambda n: (0, n),
) -> tuple[Tokenizer, Data]:
    """Reads and checks all text, trains (or reuses) the tokenizer, builds the iterators.

    ``rows_of(n)`` is the slice of a global batch of ``n`` rows that this process feeds: its
    iterators build only those rows, so the global batches do not depend on the number of hosts.
    """
    langs = lang_list(config)
    corpus_lib.check_langs(langs)
    root = resolve_root(config, workdir)
    read_kw = {
        **corpus_lib.read_options(config.data),
        "manual_dir": config.data.tfds_manual_dir or None,  # prepares the local TFDS builders
    }
    train = corpus_lib.read_split(
        config.data.train, langs, root=root, where="data.train", **read_kw
    )
    valid = corpus_lib.read_split(
        config.data.valid, langs, root=root, where="data.valid", **read_kw
    )

    for spec in (s for steps in step_lists for s in steps):
        have = train.para if spec.lang2 else train.mono
        if ((spec.lang1, spec.lang2) if spec.lang2 else spec.lang1) not in have:
            raise corpus_lib.DataError(
                f"{'clm' if spec.objective == 'clm' else 'mlm'}_steps lists "
                f"{spec.key.split('_', 1)[1]!r} but data.train has no "
                f"{'parallel' if spec.lang2 else 'monolingual'} text for it"
            )

    tok = config.tokenizer
    tokenizer = load_or_train(
        tokenizer_path,
        lambda: corpus_lib.tokenizer_texts(train),
        vocab_size=tok.vocab_size,
        alpha=tok.alpha,
        n_sentences=tok.n_sentences,
        seed=config.seed,
        character_coverage=tok.character_coverage,
    )
    train_tok = corpus_lib.tokenize_split(train, tokenizer)
    valid_tok = corpus_lib.tokenize_split(valid, tokenizer)

    seed = config.seed

    def eval_rows(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        start, stop = rows_of(config.eval_batch_size)
        return [{k: v[start:stop] for k, v in b.items()} for b in batches]

    data = Data({}, {}, {}, np.zeros(tokenizer.vocab_size, np.int64))
    for spec in (s for steps in step_lists for s in steps):
        lid = langs.index(spec.lang1)
        if spec.lang2 is None:
            stream = batches_lib.make_stream(train_tok.mono[spec.lang1])
            data.train[spec.key] = batches_lib.StreamBatches(
                stream,
                lang_id=lid,
                batch_size=config.batch_size,
                length=config.bptt,
                seed=seed,
                name=spec.key,
                rows=rows_of(config.batch_size),
            )
            data.sizes[spec.key] = len(stream)
            data.token_counts += np.bincount(stream, minlength=tokenizer.vocab_size)
            if spec.lang1 in valid_tok.mono:
                data.valid[spec.key] = eval_rows(
                    batches_lib.eval_stream_batches(
                        batches_lib.make_stream(valid_tok.mono[spec.lang1]),
                        lang_id=lid,
                        batch_size=config.eval_batch_size,
                        length=config.bptt,
                    )
                )
        else:
            pair = (spec.lang1, spec.lang2)
            src, tgt = train_tok.para[pair]
            it = batches_lib.PairBatches(
                src,
                tgt,
                src_lang=lid,
                tgt_lang=langs.index(spec.lang2),
                batch_size=config.tlm_batch_size,
                length=config.tlm_length,
                seed=seed,
                name=spec.key,
                rows=rows_of(config.tlm_batch_size),
            )
            if it.n_dropped:
                logging.warning(
                    "%s: dropped %d of %d pairs (an empty side, or longer than tlm_length=%d)",
                    spec.key,
                    it.n_dropped,
                    len(src),
                    config.tlm_length,
                )
            data.train[spec.key] = it
            data.sizes[spec.key] = int(
                sum(len(s) + len(t) + 4 for s, t in zip(it.src, it.tgt, strict=True))
            )
            if pair in valid_tok.para:
                vs, vt = valid_tok.para[pair]
                data.valid[spec.key] = eval_rows(
                    batches_lib.eval_pair_batches(
                        vs,
                        vt,
                        src_lang=lid,
                        tgt_lang=langs.index(spec.lang2),
                        batch_size=config.eval_batch_size,
                        length=config.tlm_length,
                    )
                )
    return tokenizer, data


def config_fingerprint(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: model shape and vocabulary."""
    return {
        "model": model_config(config, tokenizer.vocab_size).__dict__ | {"langs": lang_list(config)},
        "tokenizer_sha256": tokenizer.sha256,
    }


def _plain(x: Any) -> Any:
    """Tuples as lists, as they come back from a checkpoint's JSON."""
    return [_plain(v) for v in x] if isinstance(x, list | tuple) else x


def setting_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str], prefix: str = ""
) -> list[str]:
    """``"KEY: checkpoint A vs config B"`` for each of ``keys`` whose values differ; a group
    (a dict, e.g. ``model``) is compared entry by entry. A key one side lacks counts as None."""
    diffs = []
    for key in keys:
        if prefix == "model." and key in RUNTIME_FIELDS:
            continue  # how the model runs (attention kernel, remat), not what it computes
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            a, b = a or {}, b or {}
            diffs += setting_differences(a, b, sorted(set(a) | set(b)), f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            diffs.append(f"{prefix}{key}: checkpoint {a!r} vs config {b!r}")
    return diffs


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    diffs = setting_differences(saved, current, ["model"])
    if saved["tokenizer_sha256"] != current["tokenizer_sha256"]:
        diffs.append("the tokenizer differs from the one the checkpoint was trained with")
    if diffs:
        raise ValueError(f"{where} was written by a different config:\n  " + "\n  ".join(diffs))


def check_same_source(
    saved_config: Mapping[str, Any], config: ml_collections.ConfigDict, where: str, *keys: str
) -> None:
    """Refuses to resume a fine-tuning or translation checkpoint made with other values of the
    settings that shaped its model, listing each difference. Such a run rebuilds its model from
    the checkpoint's metadata, so a changed setting would otherwise be ignored without a word.

    Compared: the encoder's source (``init_checkpoint``, ``init_step``, and for a random init
    ``langs``, ``model`` and ``tokenizer``) and the mode's own ``keys``.
    """
    names = ["init_checkpoint", "init_step", *keys]
    if not saved_config.get("init_checkpoint"):
        names += ["langs", "model", "tokenizer"]
    diffs = setting_differences(saved_config, config.to_dict(), names)
    if diffs:
        raise ValueError(
            f"{where} was written by a different config:\n  "
            + "\n  ".join(diffs)
            + "\nrerun with the checkpoint's values, or use another workdir"
        )


class Steps:
    """The compiled step functions, one per objective kind; shapes fixed, so each compiles once."""

    def __init__(self, config, model, tx, mesh, rules, state_shardings, token_counts):
        self.mesh, self.rules = mesh, rules
        vocab = model.config.vocab_size
        split = tuple(float(x) for x in str(config.word_mask_keep_rand).split(","))
        if len(split) != 3 or not math.isclose(sum(split), 1.0):
            raise ValueError(
                f"word_mask_keep_rand={config.word_mask_keep_rand!r}: three numbers summing to 1"
            )
        log_weights = (
            jnp.asarray(objectives.token_log_weights(token_counts, config.sample_alpha))
            if config.sample_alpha > 0
            else None
        )
        self.objectives = {
            kind: Objective(
                causal=kind == "clm",
                vocab_size=vocab,
                mesh=mesh,
                batch_axes=parallel.mesh_axes_of("batch", rules),
                vocab_axes=parallel.mesh_axes_of("vocab", rules),
                word_pred=config.word_pred,
                mask_keep_rand=split,
                log_weights=log_weights,
            )
            for kind in ("clm", "masked")
        }
        batch_sh = parallel.batch_sharding(mesh, rules)
        repl = parallel.replicated(mesh)
        self.train = {
            kind: jax.jit(
                keyed_by_step(
                    functools.partial(
                        train_step,
                        model=model,
                        objective=obj,
                        tx=tx,
                        accum_steps=config.accum_steps,
                    ),
                    config.seed,
                    argnum=2,
                ),
                in_shardings=(state_shardings, batch_sh, repl, repl),
                out_shardings=(state_shardings, repl),
                donate_argnums=0,
            )
            for kind, obj in self.objectives.items()
        }
        self.eval = {
            kind: jax.jit(
                # the same masks at every evaluation: keys from the batch index, not the step
                keyed_by_step(
                    functools.partial(eval_step, model=model, objective=obj),
                    config.seed + 1,
                    argnum=2,
                ),
                in_shardings=(state_shardings.params, batch_sh, repl),
                out_shardings=repl,
            )
            for kind, obj in self.objectives.items()
        }
        self.batch_sharding = batch_sh

    @staticmethod
    def kind(spec: batches_lib.StepSpec) -> str:
        return "clm" if spec.objective == "clm" else "masked"

    def compilations(self) -> int:
        """Number of compiled programs so far (tests check the alternation never recompiles)."""
        return sum(f._cache_size() for f in (*self.train.values(), *self.eval.values()))


def abstract_state(
    model: nn.Module, tx, mesh, rules, dp: int, example: Callable[[int], tuple] | None = None
) -> tuple[Any, Any, Callable]:
    """The train state's shapes with their shardings (nothing allocated), the shardings, and the
    init function that creates it. ``dp`` is the batch split, which the dummy input must divide;
    ``example(dp)`` gives the dummy arguments of ``model.init`` (default: an encoder's three).
    """

    def boxed_init(rng):
        if example is None:
            dummy = jnp.zeros((dp, 8), jnp.int32)
            args: tuple = (dummy, dummy, dummy)
        else:
            args = example(dp)
        params = model.init({"params": rng}, *args)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    key = jax.random.key(0)  # made outside the mesh: it may hold devices that cannot run it
    with parallel.mesh_context(mesh, rules):
        boxed = jax.eval_shape(boxed_init, key)
        shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings, boxed_init


def init_state(
    model: nn.Module, tx, rng, mesh, rules, dp: int, example: Callable[[int], tuple] | None = None
) -> tuple[TrainState, Any]:
    """Creates the state directly with its shardings: parameters never sit whole on one device."""
    _, shardings, boxed_init = abstract_state(model, tx, mesh, rules, dp, example)
    with parallel.mesh_context(mesh, rules):
        state = jax.jit(lambda r: nn.meta.unbox(boxed_init(r)), out_shardings=shardings)(rng)
    return state, shardings


# --- evaluation ---------------------------------------------------------------------------------


def eval_metric_names(data: Data) -> list[str]:
    """The names ``evaluate`` reports for this data, known before anything runs."""
    names = [f"valid/{key}/{stat}" for key in data.valid for stat in ("loss", "acc", "ppl")]
    kinds = {key.split("_", 1)[0] for key in data.valid}
    return sorted(names + [f"valid/{kind}_ppl" for kind in kinds])


def evaluate(steps: Steps, params, data: Data, n_rows: int) -> dict[str, float]:
    """Validation loss/accuracy/perplexity per step key, with the same masks at every evaluation."""
    sums: dict[str, dict[str, float]] = {}
    with parallel.mesh_context(steps.mesh, steps.rules):
        for key, batches in data.valid.items():
            kind = "clm" if key.startswith("clm_") else "masked"
            out = [
                steps.eval[kind](
                    params,
                    parallel.global_batch(b, steps.batch_sharding, n_rows),
                    np.int32(i),
                )
                for i, b in enumerate(batches)
            ]
            totals = jax.device_get(out)
            sums[key] = {k: float(sum(t[k] for t in totals)) for k in totals[0]}
    scalars = summarize(sums)
    for kind in ("mlm", "tlm", "clm"):
        ppls = [v for k, v in scalars.items() if k.startswith(f"{kind}_") and k.endswith("/ppl")]
        if ppls:
            scalars[f"{kind}_ppl"] = float(np.mean(ppls))
    return {f"valid/{k}": v for k, v in scalars.items()}


# --- the loop -----------------------------------------------------------------------------------


def nonfinite_settings(c: ml_collections.ConfigDict) -> None:
    """The settings of the non-finite step guard (``apply_gradients``, ``count_nonfinite``)."""
    c.max_nonfinite_steps = 20  # stop after this many consecutive skipped (NaN/inf) updates
    c.debug_nonfinite_steps = ""  # test hook: "5,6" makes those steps' loss NaN


def poisoned_steps(config: ml_collections.ConfigDict) -> set[int]:
    """The loop steps whose loss ``debug_nonfinite_steps`` makes NaN (a test hook)."""
    return {int(x) for x in str(config.debug_nonfinite_steps).split(",") if x.strip()}


def count_nonfinite(
    flags: Iterable[float],
    loop: dict[str, Any],
    config: ml_collections.ConfigDict,
    step: int,
    ckpt: Checkpointer,
) -> None:
    """Follows the steps' ``nonfinite`` flags, in order, in ``loop["nonfinite_run"]`` (the current
    run of skipped updates, saved with the loop state so a resume counts on); raises
    ``FloatingPointError`` after ``max_nonfinite_steps`` skips in a row."""
    for flag in flags:
        loop["nonfinite_run"] = loop["nonfinite_run"] + 1 if flag else 0
        if loop["nonfinite_run"] >= config.max_nonfinite_steps:
            ckpt.wait()  # the checkpoint named below is complete, not a save still in flight
            latest = ckpt.latest_step()
            raise FloatingPointError(
                f"{loop['nonfinite_run']} consecutive steps with a non-finite loss or gradient "
                f"before step {step}; their updates were skipped. "
                + (
                    f"The last checkpoint ({latest}) holds finite parameters."
                    if latest is not None
                    else "No checkpoint was written yet."
                )
            )


def log_window(
    writer: MetricWriter,
    step: int,
    window: Mapping[str, list[Sums]],
    nonfinite: list[jax.Array],
    tokens: int,
    loop: dict[str, Any],
    config: ml_collections.ConfigDict,
    ckpt: Checkpointer,
    state: TrainState,
    *,
    flops: float = 0.0,
    since: float | None = None,
    peak: float | None = None,
) -> dict[str, float]:
    """Pulls a logging window's sums to the host (the only regular host sync), stops the run after
    ``max_nonfinite_steps`` consecutive skipped updates, logs, and returns ``train/*`` scalars.

    With ``since`` (the ``time.perf_counter()`` at which the window started; None for a window
    that includes compilation) it also logs tokens/s and, given the window's model ``flops``,
    TFLOP/s per device and MFU against ``peak`` (`xlm_jax.core.mfu`)."""
    totals, flags = jax.device_get((dict(window), nonfinite))
    count_nonfinite(flags, loop, config, step, ckpt)
    keys = ("loss_sum", "n_pred", "n_correct")
    scalars = summarize(
        {k: {n: float(sum(s[n] for s in v)) for n in keys} for k, v in totals.items()}
    )
    for k, v in totals.items():
        scalars[f"{k}/grad_norm"] = float(np.mean([s["grad_norm"] for s in v]))
    scalars["skipped_updates"] = float(sum(flags))
    scalars["lr"] = learning_rate(config, int(state.step))
    if since is not None and flops > 0:  # the device_get above waited for the window's steps
        seconds = time.perf_counter() - since
        scalars.update(mfu.throughput(tokens, flops, seconds, jax.device_count(), peak))
    writer.progress(step, scalars, tokens=tokens)
    writer.write(step, scalars, prefix="train/")
    return {f"train/{k}": v for k, v in scalars.items()}


def save_or_stop(
    step: int,
    metrics: Mapping[str, float] | None,
    stop: bool,
    guard: PreemptionGuard,
    config: ml_collections.ConfigDict,
    save: Callable[..., None],
    to_close: tuple[Checkpointer, MetricWriter],
) -> None:
    """Checkpoints after an evaluation, every ``checkpoint_every`` steps, at the end, and when a
    preemption signal arrived, then raises ``Preempted`` (after the save is complete)."""
    preempted = guard.should_stop(step)
    final = step == config.max_steps or stop or preempted
    if metrics is not None or step % config.checkpoint_every == 0 or final:
        save(metrics, force=final)
    if preempted:
        for closable in to_close:
            closable.close()  # the Checkpointer waits for the save first
        raise Preempted(step)


def track_best(loop: dict[str, Any], value: float, config: ml_collections.ConfigDict) -> bool:
    """Updates ``loop``'s best value and count of evaluations without improvement (both go into
    every checkpoint); True when ``config.patience`` says to stop."""
    better = loop["best"] is None or (
        value < loop["best"] if config.best_mode == "min" else value > loop["best"]
    )
    loop["best"], loop["bad_evals"] = (
        (value, 0) if better else (loop["best"], loop["bad_evals"] + 1)
    )
    if config.patience > 0 and loop["bad_evals"] >= config.patience:
        logging.info(
            "stopping: %s did not improve for %d evaluations", config.best_metric, config.patience
        )
        return True
    return False


def _tokens(batch: Mapping[str, np.ndarray]) -> int:
    return int(np.count_nonzero(batch["tokens"] != PAD_ID))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_step: Callable[[int, TrainState], None] | None = None,
) -> dict[str, float]:
    """Pretrains as ``config`` says, resuming from ``workdir`` if it holds a checkpoint.

    Returns the last logged training and validation scalars (and ``compiled_programs``).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_primary = jax.process_index() == 0

    # Mesh and batch checks come first: they fail in milliseconds.
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    for what in ("batch_size", "tlm_batch_size", "eval_batch_size"):
        parallel.check_batch_size(config[what], mesh, rules, what)
    for what in ("batch_size", "tlm_batch_size"):
        if config[what] % config.accum_steps:
            raise ValueError(
                f"{what}={config[what]} does not split into {config.accum_steps} accum_steps"
            )
        parallel.check_batch_size(
            config[what] // config.accum_steps, mesh, rules, f"{what} / accum_steps"
        )
    batch_sharding = parallel.batch_sharding(mesh, rules)

    ckpt = Checkpointer(
        workdir / "checkpoints",
        keep_last=config.keep_checkpoints,
        best_metric=config.best_metric or None,
        best_mode=config.best_mode,
    )
    tokenizer_path = workdir / "tokenizer.model"
    newest = ckpt.newest_readable_meta()
    latest, saved_meta = newest if newest is not None else (None, None)
    if saved_meta is not None and not tokenizer_path.exists():
        # The checkpoint carries its vocabulary: a resumed run never retrains it.
        Tokenizer.from_bytes(base64.b64decode(saved_meta["tokenizer"])).save(tokenizer_path)

    step_lists = build_steps(config)
    tokenizer, data = build_data(
        config,
        workdir,
        tokenizer_path,
        step_lists,
        rows_of=lambda n: parallel.process_rows(batch_sharding, n),
    )
    if config.best_metric and config.best_metric not in eval_metric_names(data):
        raise ValueError(
            f"best_metric {config.best_metric!r} will not be measured; the evaluation reports "
            f"{eval_metric_names(data)}"
        )
    fingerprint = config_fingerprint(config, tokenizer)
    if saved_meta is not None:
        check_compatible(
            saved_meta["fingerprint"], fingerprint, f"checkpoint {latest} in {ckpt.directory}"
        )
    schedule = batches_lib.Schedule(
        step_lists, data.sizes, sampling_factor=config.lg_sampling_factor, seed=config.seed
    )
    lambdas = {
        "clm": batches_lib.parse_lambda(config.lambda_clm),
        "mlm": batches_lib.parse_lambda(config.lambda_mlm),
        "tlm": batches_lib.parse_lambda(config.lambda_mlm),  # XLM: TLM is an mlm_steps entry
    }

    mcfg = model_config(config, tokenizer.vocab_size)
    model = XLMEncoder(mcfg)
    tx = make_optimizer(config.optimizer)
    state, shardings = init_state(
        model,
        tx,
        jax.random.key(config.seed),
        mesh,
        rules,
        parallel.data_parallel_size(mesh, rules),
    )
    steps = Steps(config, model, tx, mesh, rules, shardings, data.token_counts)

    loop = {"step": 0, "best": None, "bad_evals": 0, "nonfinite_run": 0}
    if latest is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )  # the state just built: restoring reads straight into its shardings
        _, state, data_state, _ = ckpt.restore_newest_readable(abstract)
        loop = {"nonfinite_run": 0, **data_state["loop"]}
        for key, it_state in data_state["iterators"].items():
            data.train[key].restore(it_state)
        logging.info("resumed from step %d (%d updates)", loop["step"], int(state.step))

    meta = {
        "config": config.to_dict(),
        "fingerprint": fingerprint,
        "tokenizer": base64.b64encode(tokenizer.serialized).decode("ascii"),
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }
    writer = MetricWriter(workdir, total_steps=config.max_steps, is_primary=is_primary)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "model: %d parameters, vocab %d, langs %s; mesh %s; schedule of %d steps per iteration %s",
        n_params,
        tokenizer.vocab_size,
        lang_list(config),
        dict(mesh.shape),
        schedule.iteration_length,
        schedule.probs or "(shuffled lists)",
    )

    def save(metrics: Mapping[str, float] | None = None, force: bool = False) -> None:
        data_state = {
            "loop": loop,
            "iterators": {k: it.state() for k, it in data.train.items()},
        }
        ckpt.save(
            loop["step"], state, data_state=data_state, meta=meta, metrics=metrics, force=force
        )

    poisoned = poisoned_steps(config)
    window: dict[str, list[Sums]] = {}
    nonfinite: list[jax.Array] = []  # per step, in order: runs of skipped updates are counted
    window_tokens = 0
    # MFU: model FLOPs of the tokens each objective processes (padding counts as waste)
    flops_per_token = {
        "clm": xlm_flops_per_token(mcfg, config.bptt, 1.0),
        "mlm": xlm_flops_per_token(mcfg, config.bptt, config.word_pred),
        "tlm": xlm_flops_per_token(mcfg, config.tlm_length, config.word_pred),
    }
    peak = mfu.peak_flops_per_device(config.peak_flops_per_device)
    window_flops, window_start = 0.0, None  # the first window includes compilation: no rates
    last: dict[str, float] = {}
    stop = False
    with parallel.mesh_context(mesh, rules), PreemptionGuard() as guard:
        while loop["step"] < config.max_steps and not stop:
            spec = schedule(loop["step"])
            lam = batches_lib.lambda_at(lambdas[spec.objective], loop["step"])
            if loop["step"] in poisoned:
                lam = float("nan")  # test hook: this step's loss and gradients are NaN
            if lam != 0:  # XLM skips an objective whose lambda is 0
                it = data.train[spec.key]
                batch = next(it)
                # this process's rows, scaled to the global batch (an estimate for the log)
                tokens = _tokens(batch) * it.batch_size // len(batch["tokens"])
                window_tokens += tokens
                window_flops += tokens * flops_per_token[spec.objective]
                state, sums = steps.train[Steps.kind(spec)](
                    state,
                    parallel.global_batch(batch, steps.batch_sharding, it.batch_size),
                    np.int32(loop["step"]),  # the dropout/masking key's step
                    np.float32(lam),
                )
                window.setdefault(spec.key, []).append(sums)
                nonfinite.append(sums["nonfinite"])
            loop["step"] += 1
            step = loop["step"]
            if on_step is not None:
                on_step(step, state)

            if step % config.log_every == 0 or step == config.max_steps:
                last.update(
                    log_window(
                        writer,
                        step,
                        window,
                        nonfinite,
                        window_tokens,
                        loop,
                        config,
                        ckpt,
                        state,
                        flops=window_flops,
                        since=window_start,
                        peak=peak,
                    )
                )
                window, window_tokens, nonfinite = {}, 0, []
                window_flops, window_start = 0.0, time.perf_counter()

            metrics = None
            if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
                metrics = evaluate(steps, state.params, data, config.eval_batch_size)
                writer.write(step, metrics)
                logging.info(
                    "eval step %d: %s",
                    step,
                    ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())),
                )
                last.update(metrics)
                if config.best_metric:
                    stop = track_best(loop, metrics[config.best_metric], config)
            save_or_stop(step, metrics, stop, guard, config, save, (ckpt, writer))
    ckpt.close()  # waits for pending saves first
    writer.close()
    last["compiled_programs"] = steps.compilations()
    logging.info("compiled programs: %d", last["compiled_programs"])
    return last
