"""Cross-lingual LM pretraining (MLM, TLM, CLM), a task of the one loop (`core/loop.py`).

Read top to bottom: step functions (pure: batch in, sums out) → data (text, tokenizer,
iterators) → compiled steps and evaluation → `setup`, which hands the loop XLM's alternation of
CLM/MLM/TLM updates, each its own optimizer step.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from xlm_jax.core import evaluators, loop, parallel, train_state
from xlm_jax.core.metrics import summarize
from xlm_jax.core.train_state import (
    TrainState,
    apply_gradients,
    keyed_by_step,
    learning_rate,
    make_optimizer,
)
from xlm_jax.data import batches as batches_lib
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data import prepare as prepare_lib
from xlm_jax.data import prepared as prepared_lib
from xlm_jax.data import sentences
from xlm_jax.data.corpus import lang_list
from xlm_jax.model import objectives, pretrained
from xlm_jax.model.encoder import ModelConfig, XLMEncoder, xlm_flops_per_token
from xlm_jax.tasks import retrieval, xnli
from xlm_jax.text.tokenizer import PAD_ID, Tokenizer

Sums = dict[str, jax.Array]
Batch = dict[str, np.ndarray]


# --- steps: pure functions of (state, batch, rng) ----------------------------------------------


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, n_langs=len(lang_list(config)), **config.model.to_dict()
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """How a batch becomes inputs and targets (``PROGRAMS[program]``), and its scoring.

    Scoring runs under ``shard_map`` over ``mesh``: rows split over ``batch_axes``, vocabulary
    over ``vocab_axes`` (``objectives.sharded_token_loss_sums``).
    """

    program: str
    vocab_size: int
    mesh: Mesh
    batch_axes: tuple[str, ...] = ()
    vocab_axes: tuple[str, ...] = ()
    word_pred: float = 0.15
    mask_keep_rand: tuple[float, float, float] = (0.8, 0.1, 0.1)
    context: int = 0  # CLM: the first positions of a row are context only (XLM's context_size)
    log_weights: jax.Array | None = dataclasses.field(default=None, compare=False)

    @property
    def causal(self) -> bool:
        return PROGRAMS[self.program].causal

    def prepare(self, batch, rng):
        """Adds ``targets`` and ``weights`` (and, for MLM/TLM, corrupts tokens, ``pred_index``)."""
        return PROGRAMS[self.program].prepare(self, batch, rng)

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
            segments=batch.get("segments"),  # packed TLM rows (tlm_pack); else None
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


def eval_step(params, batch, rng, *, model, objective: Objective) -> Sums:
    k_mask, k_drop = jax.random.split(rng)
    return objective.loss_sums(
        model, params, objective.prepare(batch, k_mask), k_drop, deterministic=True
    )


# --- setup --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """Everything the loop reads: iterators per step key, fixed evaluation batches, sizes."""

    train: dict[str, batches_lib.EpochIterator]  # step key -> StreamBatches, TLM pairs' batches
    evals: dict[str, dict[str, list[Batch]]]  # "valid" / "test" -> step key -> batches
    sizes: dict[str, int]  # step key -> training tokens (for language sampling)
    token_counts: np.ndarray  # training-token frequencies (for sample_alpha)
    root: str = ""  # where the sources were read (data.root, or the toy corpus)


def build_steps(config: ml_collections.ConfigDict) -> list[list[batches_lib.StepSpec]]:
    langs = lang_list(config)
    return [
        batches_lib.parse_steps("clm", config.clm_steps, langs),
        batches_lib.parse_steps("mlm", config.mlm_steps, langs),
    ]


def check_steps_have_text(step_lists: list[list[batches_lib.StepSpec]], prepared_set) -> None:
    have = prepared_set.keys("train")
    for spec in (s for steps in step_lists for s in steps):
        key = f"{spec.lang1}-{spec.lang2}" if spec.lang2 else spec.lang1
        if key not in have:
            raise corpus_lib.DataError(
                f"{'clm' if spec.objective == 'clm' else 'mlm'}_steps lists {key!r} but "
                f"data.train has no {'parallel' if spec.lang2 else 'monolingual'} text for it "
                f"(prepared in {prepared_set.path}: {sorted(have)})"
            )


def open_prepared(
    config: ml_collections.ConfigDict, workdir: Path, root: str
) -> tuple[Tokenizer, prepared_lib.PreparedSet]:
    """The prepared tokens this run reads, and their tokenizer (also the workdir's).

    ``data.prepared`` names a directory prepared beforehand; else process 0 prepares into
    ``WORKDIR/prepared`` unless what is there is still the preparation of this config's sources
    with the workdir's tokenizer (a restart tokenizes nothing).
    """
    tokenizer_path = workdir / "tokenizer.model"
    if not config.data.prepared:
        out = workdir / "prepared"
        parallel.on_first_process(
            lambda: prepare_lib.ensure(
                config,
                out,
                root=root,
                tokenizer_path=tokenizer_path,
                workers=config.data.prepare_workers,
            ),
            "xlm_jax: data prepared",
        )
        opened = prepared_lib.PreparedSet.open(out, background=True)
        return Tokenizer.load(tokenizer_path), opened
    prepared_set = prepared_lib.PreparedSet.open(config.data.prepared, background=True)
    prepare_lib.check_same_text(prepared_set, config)
    tokenizer = Tokenizer.load(prepared_set.path / prepared_lib.TOKENIZER)
    if tokenizer_path.exists():
        mine = Tokenizer.load(tokenizer_path)
        if mine.sha256 != tokenizer.sha256:
            raise corpus_lib.DataError(
                f"{prepared_set.path} was prepared with tokenizer sha256 {tokenizer.sha256[:12]}, "
                f"but this workdir's ({tokenizer_path}) is {mine.sha256[:12]}: its ids would "
                "mean other pieces; prepare again with --tokenizer=" + str(tokenizer_path)
            )
    else:
        tokenizer.save(tokenizer_path)
    return tokenizer, prepared_set


def build_data(
    config: ml_collections.ConfigDict,
    workdir: Path,
    step_lists: list[list[batches_lib.StepSpec]],
    *,
    rows_of: Callable[[int], tuple[int, int]] = lambda n: (0, n),
    row_multiple: int = 1,
) -> tuple[Tokenizer, Data, prepared_lib.PreparedSet]:
    """The prepared tokens (prepared first if need be), the tokenizer, the iterators.

    ``rows_of(n)`` is the slice of a global batch of ``n`` rows that this process feeds: its
    iterators read only those rows, so the global batches do not depend on the number of hosts.
    ``row_multiple``: a TLM token budget's rows per bucket are a multiple of it
    (``tlm_row_multiple``).
    """
    corpus_lib.checked_langs(config)
    root = prepare_lib.root_or_toy(config, workdir)
    tokenizer, prepared_set = open_prepared(config, workdir, root)
    check_steps_have_text(step_lists, prepared_set)
    data = Data({}, {}, {}, np.zeros(tokenizer.vocab_size, np.int64), root)
    try:  # while the shards are verified in the background
        for spec in (s for steps in step_lists for s in steps):
            if spec.lang2 is None:
                add_stream(data, spec, config, prepared_set, rows_of)
            else:
                add_pairs(data, spec, config, prepared_set, rows_of, row_multiple)
    except Exception:
        prepared_set.verified()  # a damaged shard explains a failure best
        raise
    return tokenizer, data, prepared_set.verified()  # before any batch is read


def eval_splits(config: ml_collections.ConfigDict, prepared_set, key: str) -> list[str]:
    """The evaluation splits with data for ``key``: XLM evaluates valid and, when given, test."""
    return [s for s in ("valid", "test") if config.data[s].strip() and key in prepared_set.keys(s)]


def _eval_rows(batches: list[Batch], config, rows_of) -> list[Batch]:
    """This process's rows of each validation batch."""
    start, stop = rows_of(config.eval_batch_size)
    return [{k: v[start:stop] for k, v in b.items()} for b in batches]


def add_stream(data: Data, spec, config, prepared_set, rows_of) -> None:
    """An MLM/CLM entry: the language's stream cut into ``bptt`` windows."""
    lid = lang_list(config).index(spec.lang1)
    stream = prepared_set.stream("train", spec.lang1)
    data.train[spec.key] = batches_lib.StreamBatches(
        stream,
        lang_id=lid,
        batch_size=config.batch_size,
        length=config.bptt,
        seed=config.seed,
        name=spec.key,
        rows=rows_of(config.batch_size),
    )
    data.sizes[spec.key] = len(stream)
    data.token_counts += prepared_set.counts("train", spec.lang1, len(data.token_counts))
    for split in eval_splits(config, prepared_set, spec.lang1):
        batches = batches_lib.eval_stream_batches(
            prepared_set.stream(split, spec.lang1).array(),
            lang_id=lid,
            batch_size=config.eval_batch_size,
            length=config.bptt,
        )
        data.evals.setdefault(split, {})[spec.key] = _eval_rows(batches, config, rows_of)


MIN_TLM_ROW = 6  # </s> w </s></s> w </s>: a TLM row's fewest tokens


def tlm_buckets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """TLM row lengths: ``tlm_buckets`` (none above ``tlm_length``), then ``tlm_length``."""
    spec = str(config.tlm_buckets)
    try:
        given = {int(b) for b in spec.split(",") if b.strip()}
    except ValueError:
        raise ValueError(f"tlm_buckets={spec!r}: expected row lengths like '32,64'") from None
    bad = sorted(b for b in given if not MIN_TLM_ROW <= b <= config.tlm_length)
    if bad:
        raise ValueError(
            f"tlm_buckets={spec!r}: {bad} outside {MIN_TLM_ROW}..tlm_length={config.tlm_length} "
            f"(a pair's row has at least {MIN_TLM_ROW} tokens; tlm_length is the longest bucket)"
        )
    return tuple(sorted(given | {config.tlm_length}))


def tlm_row_multiple(config: ml_collections.ConfigDict, mesh: Mesh, rules) -> int:
    """A TLM budget's rows split over the data shards, then into ``accum_steps`` micro-batches
    that each split over them again."""
    return parallel.data_parallel_size(mesh, rules) * config.accum_steps


def check_tlm_rows(config: ml_collections.ConfigDict, row_multiple: int = 1) -> None:
    """``tlm_buckets`` and ``tlm_tokens_per_batch`` that cannot work, refused before any read."""
    buckets, budget = tlm_buckets(config), config.tlm_tokens_per_batch
    if budget <= 0 and budget != -1:
        raise ValueError(f"tlm_tokens_per_batch={budget}: -1 (off) or a number of tokens > 0")
    if config.tlm_pack and (budget > 0 or len(buckets) > 1):
        raise ValueError(
            f"tlm_pack=True with tlm_buckets={config.tlm_buckets!r}, tlm_tokens_per_batch="
            f"{budget}: packing already removes the padding these cut; set tlm_pack=False, or "
            "tlm_buckets='' and tlm_tokens_per_batch=-1"
        )
    if budget > 0:
        sentences.check_budget(
            budget,
            buckets,
            row_multiple,
            setting="tlm_tokens_per_batch",
            or_else="a shorter tlm_length",
        )


def tlm_batches(
    config: ml_collections.ConfigDict,
    src: Sequence[np.ndarray],
    tgt: Sequence[np.ndarray],
    *,
    name: str,
    rows_of: Callable[[int], tuple[int, int]] = lambda n: (0, n),
    row_multiple: int = 1,
    **ids: int,
) -> batches_lib.EpochIterator:
    """A TLM entry's training batches (``src_lang``/``tgt_lang`` in ``ids``): one pair per
    ``tlm_length`` row, several (``tlm_pack``), or one per row padded to ``tlm_buckets`` with
    ``tlm_batch_size`` rows or a ``tlm_tokens_per_batch`` budget."""
    common = dict(ids, batch_size=config.tlm_batch_size, seed=config.seed, name=name)
    buckets, budget = tlm_buckets(config), config.tlm_tokens_per_batch
    if budget <= 0 and len(buckets) == 1:
        pairs = batches_lib.PackedPairBatches if config.tlm_pack else batches_lib.PairBatches
        return pairs(src, tgt, length=buckets[0], rows=rows_of(config.tlm_batch_size), **common)
    it = sentences.BucketedPairBatches(
        src,
        tgt,
        buckets=buckets,
        rows_of=rows_of,
        tokens_per_batch=budget,
        row_multiple=row_multiple,
        **common,
    )
    if budget > 0:  # the shapes the TLM step compiles for
        logging.info(
            "%s: tlm_tokens_per_batch=%d: rows per bucket length %s; %d batches per epoch",
            name,
            budget,
            it.bucket_rows,
            it.epoch_batches(),
        )
    return it


def add_pairs(data: Data, spec, config, prepared_set, rows_of, row_multiple: int = 1) -> None:
    """A TLM (or CLM pair) entry: sentence pairs in ``tlm_length`` rows, one per row or several
    (``tlm_pack``), or one per row in ``tlm_buckets`` (``tlm_batches``).

    Validation rows stay one pair each in ``tlm_length`` rows, packed or bucketed or not: the
    same batches (and scores) either way.
    """
    langs = lang_list(config)
    key = f"{spec.lang1}-{spec.lang2}"
    src, tgt = prepared_set.sentences("train", key)
    ids = {"src_lang": langs.index(spec.lang1), "tgt_lang": langs.index(spec.lang2)}
    it = tlm_batches(
        config, src, tgt, name=spec.key, rows_of=rows_of, row_multiple=row_multiple, **ids
    )
    empty = sum(prepared_set.keys("train")[key]["dropped"].values())
    if it.n_dropped or empty:
        logging.warning(
            "%s: dropped %d of %d pairs (%d with an empty side, %d longer than tlm_length=%d)",
            spec.key,
            it.n_dropped + empty,
            len(src) + empty,
            empty,
            it.n_dropped,
            config.tlm_length,
        )
    data.train[spec.key] = it
    data.sizes[spec.key] = it.tokens
    for split in eval_splits(config, prepared_set, key):
        vs, vt = prepared_set.sentences(split, key)
        batches = batches_lib.eval_pair_batches(
            vs, vt, **ids, batch_size=config.eval_batch_size, length=config.tlm_length
        )
        data.evals.setdefault(split, {})[spec.key] = _eval_rows(batches, config, rows_of)


def config_fingerprint(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: model shape and vocabulary."""
    return {
        "model": model_config(config, tokenizer.vocab_size).__dict__ | {"langs": lang_list(config)},
        "tokenizer_sha256": tokenizer.sha256,
    }


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    diffs = pretrained.setting_differences(saved, current, ["model"])
    if saved["tokenizer_sha256"] != current["tokenizer_sha256"]:
        diffs.append("the tokenizer differs from the one the checkpoint was trained with")
    if diffs:
        raise ValueError(f"{where} was written by a different config:\n  " + "\n  ".join(diffs))


# --- the objectives: one table -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """A compiled step that objectives share: how it prepares a batch on device."""

    causal: bool
    prepare: Callable[[Objective, Batch, jax.Array], Batch]


PROGRAMS = {
    "clm": Program(True, lambda obj, batch, rng: objectives.causal_targets(batch, obj.context)),
    "masked": Program(
        False,
        lambda obj, batch, rng: objectives.mask_tokens(
            batch,
            rng,
            vocab_size=obj.vocab_size,
            word_pred=obj.word_pred,
            mask_keep_rand=obj.mask_keep_rand,
            log_weights=obj.log_weights,
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class Kind:
    """A pretraining objective: its program, its rows, its loss weight, and the share of tokens
    at which the output layer runs (model FLOPs for MFU)."""

    program: str  # a PROGRAMS key
    pairs: bool  # rows of sentence pairs (TLM), or windows of one language's stream
    batch_setting: str
    length_setting: str
    lambda_setting: str
    pred_fraction: Callable[[ml_collections.ConfigDict], float]

    def rows(self, config: ml_collections.ConfigDict) -> tuple[int, int]:
        return config[self.batch_setting], config[self.length_setting]


# The ``objective`` of a ``clm_steps`` / ``mlm_steps`` entry (batches.StepSpec) -> its kind.
OBJECTIVES = {
    "mlm": Kind("masked", False, "batch_size", "bptt", "lambda_mlm", lambda c: c.word_pred),
    # XLM: TLM is an mlm_steps entry (a language pair), weighted by lambda_mlm
    "tlm": Kind(
        "masked", True, "tlm_batch_size", "tlm_length", "lambda_mlm", lambda c: c.word_pred
    ),
    "clm": Kind("clm", False, "batch_size", "bptt", "lambda_clm", lambda c: 1.0),
    # XLM: a pair in clm_steps is CLM over TLM's rows (its batches), weighted by lambda_clm
    "clm_pairs": Kind("clm", True, "tlm_batch_size", "tlm_length", "lambda_clm", lambda c: 1.0),
}


def kind_of(spec: batches_lib.StepSpec) -> str:
    """The OBJECTIVES entry of a step: its objective, or ``clm_pairs`` for a CLM pair."""
    return "clm_pairs" if spec.objective == "clm" and spec.lang2 else spec.objective


class Steps:
    """The compiled step functions, one per program; shapes fixed, so each compiles once."""

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
                program=kind,
                vocab_size=vocab,
                mesh=mesh,
                batch_axes=parallel.mesh_axes_of("batch", rules),
                vocab_axes=parallel.mesh_axes_of("vocab", rules),
                word_pred=config.word_pred,
                context=config.context_size,
                mask_keep_rand=split,
                log_weights=log_weights,
            )
            for kind in PROGRAMS
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
        return OBJECTIVES[kind_of(spec)].program

    def compilations(self) -> int:
        """Number of compiled programs so far (tests check the alternation never recompiles)."""
        return sum(f._cache_size() for f in (*self.train.values(), *self.eval.values()))


# --- evaluation ---------------------------------------------------------------------------------


def eval_metric_names(data: Data) -> list[str]:
    """The names ``evaluate`` reports for this data, known before anything runs."""
    names = []
    for split, keys in data.evals.items():
        names += [f"{split}/{key}/{stat}" for key in keys for stat in ("loss", "acc", "ppl")]
        names += [f"{split}/{kind}_ppl" for kind in {key.split("_", 1)[0] for key in keys}]
    return sorted(names)


def evaluate(steps: Steps, params, data: Data, n_rows: int) -> dict[str, float]:
    """Loss/accuracy/perplexity per step key of each evaluation split (valid, and test when
    given), with the same masks at every evaluation."""
    out: dict[str, float] = {}
    for split, keys in data.evals.items():
        scalars = summarize(
            {key: _eval_sums(steps, params, key, b, n_rows) for key, b in keys.items()}
        )
        for kind in OBJECTIVES:
            ppls = [
                v for k, v in scalars.items() if k.startswith(f"{kind}_") and k.endswith("/ppl")
            ]
            if ppls:
                scalars[f"{kind}_ppl"] = float(np.mean(ppls))
        out.update({f"{split}/{k}": v for k, v in scalars.items()})
    return out


def _eval_sums(steps: Steps, params, key: str, batches: list[Batch], n_rows: int) -> dict:
    kind = OBJECTIVES[key.split("_", 1)[0]].program
    with parallel.mesh_context(steps.mesh, steps.rules):
        out = [
            steps.eval[kind](
                params, parallel.global_batch(b, steps.batch_sharding, n_rows), np.int32(i)
            )
            for i, b in enumerate(batches)
        ]
    totals = jax.device_get(out)
    return {k: float(sum(t[k] for t in totals)) for k in totals[0]}


# --- the task -----------------------------------------------------------------------------------


def batch_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Every fixed batch the mesh must split, micro-batches of ``accum_steps`` included (a TLM
    token budget sets its own rows: ``check_tlm_rows``)."""
    fixed = ("batch_size",) + (() if config.tlm_tokens_per_batch > 0 else ("tlm_batch_size",))
    sizes = {what: config[what] for what in (*fixed, "eval_batch_size")}
    for what in fixed:
        if config[what] % config.accum_steps:
            raise ValueError(
                f"{what}={config[what]} does not split into {config.accum_steps} accum_steps"
            )
        sizes[f"{what} / accum_steps"] = config[what] // config.accum_steps
    return sizes


EVALUATORS = ("valid", "retrieval")  # config.evals picks among them (core/evaluators.py)


def check(config: ml_collections.ConfigDict) -> None:
    """Settings that cannot work, refused before anything is read."""
    evaluators.parse(config.evals, EVALUATORS)
    retrieval.check_layer(config.probe_layer, config.model.n_layers, "probe_layer")
    train_state.check_optimizer(config.optimizer)
    corpus_lib.checked_langs(config)
    if not 0 <= config.context_size < min(config.bptt, config.tlm_length):
        raise ValueError(
            f"context_size={config.context_size}: 0 (off) or fewer positions than a row has "
            f"(bptt={config.bptt}, tlm_length={config.tlm_length})"
        )
    for name in ("bptt", "tlm_length"):  # a row's positions must have embeddings
        if not 1 <= config[name] <= config.model.max_positions:
            raise ValueError(
                f"{name}={config[name]}: rows need 1..model.max_positions="
                f"{config.model.max_positions} positions"
            )
    check_tlm_rows(config, config.accum_steps)  # the mesh's batch split is checked in setup
    batches_lib.lambda_steps_per_point(config.lambda_unit, None, 1)  # a known unit
    prepare_lib.records_of(config, expected="text")  # sentences, not NLI records


def read_probe(config: ml_collections.ConfigDict, data: Data, tokenizer) -> retrieval.Probe:
    """The retrieval evaluator's pairs (``probe_pairs``), read from the training text's root."""
    if not config.probe_pairs.strip():
        raise ValueError("evals lists retrieval but probe_pairs is empty: give 'xx-en: SRC|EN'")
    where = ml_collections.ConfigDict(
        {**config.data.to_dict(), "root": data.root, "pairs": config.probe_pairs}
    )
    return retrieval.Probe.read(where, tokenizer, config.model.max_positions, lang_list(config))


def source_paths(config: ml_collections.ConfigDict, data: Data, probe) -> list[Path]:
    """The files the run reads (``Plan.sources``): data.train, valid and test, the probe's pairs."""
    splits = {f"data.{s}": config.data[s] for s in ("train", "valid", "test") if config.data[s]}
    if probe is not None:
        splits["probe_pairs"] = config.probe_pairs
    return corpus_lib.split_paths(
        splits, root=data.root, data_dir=config.data.tfds_data_dir or None
    )


def programs_of(config, env, model, tx, data: Data, probe) -> Callable[[Any], loop.Programs]:
    """The compiled steps and the evaluators ``config.evals`` chose, for the state's shardings."""
    chosen = evaluators.parse(config.evals, EVALUATORS)

    def compile_programs(shardings) -> loop.Programs:
        steps = Steps(config, model, tx, env.mesh, env.rules, shardings, data.token_counts)
        built = {
            "valid": lambda params, step: evaluate(steps, params, data, config.eval_batch_size)
        }
        if probe is not None:
            runner = xnli.Runner(env.mesh, env.rules)
            langs = lang_list(config)
            built["retrieval"] = probe.evaluator(
                model,
                shardings.params,
                runner,
                langs,
                config.eval_batch_size,
                layer=config.probe_layer,
            )
        evaluate_all = evaluators.combine(chosen, built, config.eval_every)
        return loop.Programs(steps.train, evaluate_all, steps.compilations)

    return compile_programs


def setup(config: ml_collections.ConfigDict, env: loop.Env) -> loop.Plan:
    """Text, tokenizer and iterators; XLM's schedule of CLM/MLM/TLM updates; the encoder."""
    row_multiple = tlm_row_multiple(config, env.mesh, env.rules)
    check_tlm_rows(config, row_multiple)  # with the mesh's batch split, before any read
    tokenizer_path = env.workdir / "tokenizer.model"
    if env.saved is not None and not tokenizer_path.exists():
        # The checkpoint carries its vocabulary: a resumed run never retrains it.
        Tokenizer.from_bytes(base64.b64decode(env.saved["tokenizer"])).save(tokenizer_path)
    step_lists = build_steps(config)
    tokenizer, data, prepared_set = build_data(
        config, env.workdir, step_lists, rows_of=env.rows_of, row_multiple=row_multiple
    )
    fingerprint = config_fingerprint(config, tokenizer)
    if env.saved is not None:
        check_compatible(env.saved["fingerprint"], fingerprint, env.where)
    schedule = batches_lib.Schedule(
        step_lists, data.sizes, sampling_factor=config.lg_sampling_factor, seed=config.seed
    )
    saved = env.saved["config"] if env.saved is not None else None
    lambdas = batches_lib.Lambdas(
        {k: config[o.lambda_setting] for k, o in OBJECTIVES.items()},
        batches_lib.lambda_steps_per_point(config.lambda_unit, saved, schedule.iteration_length),
    )
    mcfg = model_config(config, tokenizer.vocab_size)
    model, tx = XLMEncoder(mcfg), make_optimizer(config.optimizer)
    pred_fraction = {k: o.pred_fraction(config) for k, o in OBJECTIVES.items()}

    def flops_per_token(objective: str, length: int) -> float:
        # MFU: model FLOPs of a token at its batch's row length (padding counts as waste)
        return xlm_flops_per_token(mcfg, length, pred_fraction[objective])

    def update(step: int) -> loop.Update:
        spec = schedule(step)
        it = data.train[spec.key]
        return loop.Update(
            key=spec.key,
            program=Steps.kind(spec),
            lam=lambdas(kind_of(spec), step),
            rows=it.next_rows(),  # the global rows of the batch fetch returns
            fetch=lambda: next(it),
            flops_per_token=functools.partial(flops_per_token, kind_of(spec)),
        )

    chosen = evaluators.parse(config.evals, EVALUATORS)
    probe = read_probe(config, data, tokenizer) if "retrieval" in chosen else None
    metric_names = eval_metric_names(data) if "valid" in chosen else []
    metric_names += probe.metric_names() if probe is not None else []

    meta = loop.run_meta(config, tokenizer.serialized, fingerprint=fingerprint)
    return loop.Plan(
        model=model,
        tx=tx,
        compile=programs_of(config, env, model, tx, data, probe),
        update=update,
        cadence=loop.Cadence.of(config, schedule.iteration_length),
        meta=meta,
        describe=f"pretraining: vocab {tokenizer.vocab_size}, langs {lang_list(config)}, "
        f"schedule of {schedule.iteration_length} steps per iteration "
        f"{schedule.probs or '(shuffled lists)'}",
        pad_id=PAD_ID,
        iterators=data.train,
        metric_names=metric_names,
        lr=lambda updates: learning_rate(config, updates),
        sources=source_paths(config, data, probe),
        # the sources' hashes taken when they were prepared: not read again while unchanged
        known_sources=prepared_set.manifest["sources"],
        finish=lambda loop_state, last: _log_reads(data, last),
    )


def _log_reads(data: Data, last: dict) -> dict:
    reads = records_read(data)
    logging.info(
        "process %d of %d read %d stream windows and %d sentence pairs of prepared data",
        jax.process_index(),
        jax.process_count(),
        reads["windows"],
        reads["pairs"],
    )
    return last


def records_read(data: Data) -> dict[str, int]:
    """How many stream windows and sentence pairs this process read from the prepared data (its
    rows only: with two processes, about half each)."""
    windows = sum(it.stream.reads for it in data.train.values() if hasattr(it, "stream"))
    pairs = sum(it.src.reads for it in data.train.values() if hasattr(it, "src"))
    return {"windows": windows, "pairs": pairs}


TASK = loop.Task("pretrain", setup, batch_sizes, check=check)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_step: Callable[[int, TrainState], None] | None = None,
) -> dict[str, float]:
    """Pretrains as ``config`` says, resuming from ``workdir`` if it holds a checkpoint.

    Returns the last logged training and validation scalars (and ``compiled_programs``).
    """
    return loop.run(TASK, config, workdir, on_step=on_step)
