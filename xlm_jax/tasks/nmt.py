"""Translation: XLM's MT, denoising auto-encoding (AE) and online back-translation (BT).

As XLM (Lample & Conneau 2019, §4.2; `src/trainer.py` `mt_step` / `bt_step`):

* an encoder-decoder whose two halves are initialised from a pretrained cross-lingual LM
  (`model/seq2seq.py`), or randomly (`init_checkpoint=""`, the baseline);
* each loop step is one objective on one language (pair), in XLM's order: every `ae_steps`
  entry, every `mt_steps` entry, every `bt_steps` entry, then again;
* MT: teacher-forced cross-entropy on parallel pairs (optional label smoothing);
* AE: the same on (noise(x) → x) in one language, XLM's noise on device (`noise.py`);
* BT (`l1-l2-l1`): translate a batch of l1 sentences into l2 with the current parameters
  (inference mode, greedy, no gradient), then train l2 → l1 to reconstruct the original;
* evaluation: teacher-forced perplexity and BLEU of every direction of the validation and test
  pairs (sacreBLEU on detokenized text, and multi-bleu on 13a-tokenized text), the best
  checkpoint by `best_metric` (default: mean validation BLEU).

Batches are sentence rows `</s> w1 ... wn </s>` padded to length buckets (`data/sentences.py`),
so each step kind compiles once per bucket: `batch_size` rows, or with `tokens_per_batch` (XLM's
token budget) one row count per bucket. Entry points: `train_and_evaluate` (`--mode=nmt`),
`Translator` (`python -m xlm_jax.translate`).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from xlm_jax.core import loop, parallel, train_state
from xlm_jax.core.files import write_atomic
from xlm_jax.core.metrics import summarize
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data import prepare as prepare_lib
from xlm_jax.data import prepared as prepared_lib
from xlm_jax.data import sentences
from xlm_jax.data.batches import Lambdas, lambda_steps_per_point
from xlm_jax.data.sources import DataError
from xlm_jax.model import decoding, objectives, pretrained
from xlm_jax.model.encoder import ModelConfig
from xlm_jax.model.seq2seq import EncoderDecoder, init_from_pretrained, seq2seq_flops_per_token
from xlm_jax.tasks import pretrain_config as config_lib
from xlm_jax.text import bleu, noise
from xlm_jax.text.tokenizer import BOS_ID, EOS_ID, PAD_ID, XLM_BPE_MAGIC, Tokenizer

Batch = dict[str, Any]
Sums = dict[str, jax.Array]


# --- settings ------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
    """Every translation setting; defaults follow XLM's unsupervised MT command (README of
    facebookresearch/XLM: `--ae_steps 'en,fr' --bt_steps 'en-fr-en,fr-en-fr'
    --lambda_ae '0:1,100000:0.1,300000:0' --word_shuffle 3 --word_dropout 0.1 --word_blank 0.1`)."""
    c = ml_collections.ConfigDict()
    pretrained.source_settings(c)  # init_checkpoint, langs/tokenizer/model (random init), mesh
    c.dropout = -1.0  # -1 = the pretrained model's; XLM's UNMT uses 0.1
    c.attention_dropout = -1.0
    c.dropout_rng = ""  # "" = the pretrained model's masks; "hash" for an older checkpoint's
    # Depths; -1 = the source model's. A pretrained half takes the source's first N layers:
    # N < the source's makes the decoder read a middle layer, which aligns languages best in a
    # small pretrained encoder (docs/results.md, "alignment, layer by layer").
    c.enc_layers = -1
    c.dec_layers = -1

    # Sources, "KEY: SPEC; ..." as pretraining (data/corpus.py): languages for AE/BT, pairs for
    # MT; valid/test pairs are scored in both directions.
    c.data.train = "en: train.en@0:14500; fr: train.fr@14500:29000"
    c.data.valid = "en-fr: val.en|val.fr"
    c.data.test = "en-fr: test_2016_flickr.en|test_2016_flickr.fr"
    prepare_lib.add_settings(c)
    c.data.prepare_splits = "train"  # valid and test are read as text: BLEU needs it
    c.eval_directions = ""  # e.g. "en-de": only these; "" = both directions of every pair

    # --- objectives (XLM's flags) ---
    c.ae_steps = "en,fr"  # denoising auto-encoding per language
    c.mt_steps = ""  # supervised "src-tgt" pairs
    c.bt_steps = "en-fr-en,fr-en-fr"  # "l1-l2-l1": l1 → l2 (generated) → l1 (trained)
    # Loss weights: constant, or a schedule "ITER:VALUE,..." (linear in between) counted in XLM's
    # iterations, one pass over ae_steps + mt_steps + bt_steps (so 4 loop steps here)
    c.lambda_ae = "0:1,100000:0.1,300000:0"
    c.lambda_unit = "iterations"  # what schedules count: "iterations" (XLM's), or "steps"
    c.lambda_mt = "1"
    c.lambda_bt = "1"
    c.word_shuffle = 3.0  # AE noise: local shuffle (words move < k positions)
    c.word_dropout = 0.1
    c.word_blank = 0.1
    c.whole_word_noise = False  # noise whole words (SentencePiece ▁ pieces), not single pieces
    c.label_smoothing = 0.0
    c.bt_max_len = "1.3,5"  # a,b: a BT translation has at most a * source_length + b tokens

    # --- batches: sentences per step (global), padded to the smallest fitting bucket ---
    c.batch_size = 32
    c.length_buckets = "16,32,64,128"  # a longer training sentence is dropped (and counted)
    c.tokens_per_batch = -1  # XLM's: > 0 = bucket L gets this // L rows (data.md); -1 = batch_size
    c.eval_batch_size = 64

    # --- decoding in evaluation ---
    c.beam_size = 1
    c.length_penalty = 1.0
    c.early_stopping = False
    c.eval_max_len = "1.5,10"  # a,b: at most a * source_length + b tokens (XLM's evaluator)
    # Which source_length bt_max_len and eval_max_len use: "row" = each sentence's own (its
    # output never depends on the batch it is in), "batch" = the batch's longest, as XLM (then a
    # short sentence batched with long ones may be translated longer)
    c.max_len_rule = "row"

    c.optimizer = config_lib.optimizer_config()
    c.max_steps = 100_000  # loop steps (each one objective's update)
    loop.epoch_settings(c)  # epoch_size, max_epoch: XLM's units
    c.log_every = 100  # loop steps
    loop.log_settings(c)  # tensorboard
    c.peak_flops_per_device = 0.0  # for train/mfu, as pretraining's (0 = a known accelerator's)
    c.eval_every = 2_000  # loop steps; 0 = never
    c.checkpoint_every = 2_000  # loop steps; 0 = after evaluations and at the end only
    c.keep_checkpoints = 3
    # Mean sacreBLEU over the validation directions; "" = none. A list, e.g.
    # "valid/en-fr/bleu,valid/fr-en/bleu" (XLM's validation_metrics), keeps a best checkpoint per
    # metric (an optional :min/:max each); the first one is patience's (XLM's stopping_criterion).
    c.best_metric = "valid/bleu"
    c.best_mode = "max"
    c.patience = -1
    loop.nonfinite_settings(c)
    loop.resume_settings(c)  # restart_from_scratch
    loop.eval_only_settings(c)  # XLM's --eval_only
    return c


def _two_floats(text: str, what: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"{what}={text!r}: expected 'a,b' (two numbers)") from None
    return a, b


def max_len_of(length: int, a: float, b: float) -> int:
    """XLM's `int(a * length + b)`: the longest output (tokens, both </s> included)."""
    return int(a * length + b)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One loop step: an objective and its languages (`lang2` = target / intermediate)."""

    objective: str  # 'ae', 'mt' or 'bt'
    lang1: str
    lang2: str

    @property
    def key(self) -> str:
        if self.objective == "ae":
            return f"ae_{self.lang1}"
        if self.objective == "mt":
            return f"mt_{self.lang1}-{self.lang2}"
        return f"bt_{self.lang1}-{self.lang2}-{self.lang1}"


def parse_entries(config: ml_collections.ConfigDict, langs: Sequence[str]) -> list[Entry]:
    """`ae_steps`, `mt_steps`, `bt_steps` → the loop's cycle of steps (XLM's order)."""

    def items(name: str) -> list[list[str]]:
        out = []
        for item in filter(None, (s.strip() for s in str(config[name]).split(","))):
            parts = item.split("-")
            bad = [p for p in parts if p not in langs]
            if bad:
                raise ValueError(f"{name}: {item!r} names {bad}, not in langs {list(langs)}")
            out.append(parts)
        return out

    entries = []
    for parts in items("ae_steps"):
        if len(parts) != 1:
            raise ValueError(f"ae_steps: {'-'.join(parts)!r} must be one language, e.g. 'en'")
        entries.append(Entry("ae", parts[0], parts[0]))
    for parts in items("mt_steps"):
        if len(parts) != 2 or parts[0] == parts[1]:
            raise ValueError(f"mt_steps: {'-'.join(parts)!r} must be 'src-tgt', e.g. 'en-de'")
        entries.append(Entry("mt", parts[0], parts[1]))
    for parts in items("bt_steps"):
        if len(parts) != 3 or parts[0] != parts[2] or parts[0] == parts[1]:
            raise ValueError(f"bt_steps: {'-'.join(parts)!r} must be 'l1-l2-l1', e.g. 'en-fr-en'")
        entries.append(Entry("bt", parts[0], parts[1]))
    if not entries:
        raise ValueError("no training step: set ae_steps, mt_steps and/or bt_steps")
    keys = [e.key for e in entries]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"steps listed twice: {dup}")
    return entries


# --- device functions: batches → sequence-to-sequence batches → loss ------------------------------


def positions_of(tokens: jax.Array) -> jax.Array:
    """0, 1, 2, ... at real tokens, 0 at pads (rows are left-aligned)."""
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jnp.where(tokens != PAD_ID, pos, 0)


def pair_batch(src: jax.Array, src_lang: jax.Array, tgt: jax.Array, tgt_lang: jax.Array) -> Batch:
    """Source and target token rows → a `src_*`/`tgt_*` batch with positions and languages."""
    return {
        "src_tokens": src,
        "src_positions": positions_of(src),
        "src_langs": jnp.broadcast_to(src_lang, src.shape).astype(jnp.int32),
        "tgt_tokens": tgt,
        "tgt_positions": positions_of(tgt),
        "tgt_langs": jnp.broadcast_to(tgt_lang, tgt.shape).astype(jnp.int32),
    }


def loss_sums(
    model: EncoderDecoder, params, batch: Batch, rng, *, deterministic: bool, loss_kw: Mapping
) -> Sums:
    """Teacher forcing: position t of the target predicts token t+1 (the first </s> is given)."""
    logits = model.apply(
        {"params": params}, batch, deterministic=deterministic, rngs={"dropout": rng}
    )[:, :-1]
    targets = batch["tgt_tokens"][:, 1:]
    weights = (targets != PAD_ID).astype(jnp.float32)
    return objectives.sharded_token_loss_sums(logits, targets, weights, **loss_kw)


def generate(
    model: EncoderDecoder,
    params,
    batch: Batch,
    tgt_lang: jax.Array,
    *,
    max_len: tuple[float, float],
    beam_size: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    eos_allowed: bool = True,
    kv_cache: bool = True,
    max_len_rule: str = "row",
) -> tuple[jax.Array, jax.Array]:
    """Translations `(batch, T)` of `src_*` rows into `tgt_lang`, with their lengths.

    `T = int(a * src_len + b)` from the padded source length (static, so one compile per
    bucket). `max_len_rule="row"` stops each row at `int(a * its_length + b)`, so a sentence's
    output does not depend on the batch it shares; `"batch"` is XLM's rule (its evaluator and
    `bt_step`): every row stops at `int(a * longest_source_in_the_batch + b)`, so a short source
    batched with a long one may run longer. Greedy for `beam_size=1`. `kv_cache=False`
    recomputes the decoder over the prefix at every step (for measurements).
    """
    src = batch["src_tokens"]
    n, src_len = src.shape
    a, b = max_len
    total = max_len_of(src_len, a, b)
    lengths = jnp.sum(src != PAD_ID, axis=1)
    if max_len_rule == "batch":  # the global batch's longest source, over every shard
        lengths = jnp.broadcast_to(jnp.max(lengths), lengths.shape)
    elif max_len_rule != "row":
        raise ValueError(f"max_len_rule={max_len_rule!r}: expected 'row' or 'batch'")
    limit = jnp.minimum((a * lengths + b).astype(jnp.int32), total)
    tgt_langs = jnp.broadcast_to(tgt_lang, (n,)).astype(jnp.int32)
    cache = model.apply(
        {"params": params},
        src,
        batch["src_positions"],
        batch["src_langs"],
        tgt_langs,
        total,
        kv_cache,
        beam_size,
        method=EncoderDecoder.init_cache,
    )

    def step_fn(tokens, index, cache):
        logits, cache = model.apply(
            {"params": params}, tokens, index, cache, method=EncoderDecoder.step
        )
        # A generated <pad> or <s> would break the row layout (and means nothing): never emit them.
        return logits.at[:, (PAD_ID, BOS_ID)].set(-jnp.inf), cache

    kw = dict(max_len=total - 1, bos_id=EOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
    if beam_size == 1:
        return decoding.greedy_decode(
            step_fn, cache, batch_size=n, max_lengths=limit, eos_allowed=eos_allowed, **kw
        )
    tokens, lengths, _ = decoding.beam_search(
        step_fn,
        cache,
        reordered=EncoderDecoder.BEAM_REORDERED,
        batch_size=n,
        beam_size=beam_size,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_lengths=limit,
        eos_allowed=eos_allowed,
        **kw,
    )
    return tokens, lengths


@dataclasses.dataclass(frozen=True)
class Objectives:
    """How each step kind turns its host batch into a sequence-to-sequence batch (on device)."""

    model: EncoderDecoder
    noise_kw: Mapping[str, Any]
    word_start: jax.Array | None
    bt_max_len: tuple[float, float]
    max_len_rule: str = "row"

    def prepare(self, kind: str, params, batch: Batch, rng, lang2: jax.Array) -> Batch:
        if kind == "mt":
            return batch
        tokens, langs = batch["tokens"], batch["langs"][:, 0]
        if kind == "ae":
            noisy = noise.add_noise(rng, tokens, word_start=self.word_start, **self.noise_kw)
            return pair_batch(noisy, langs[:, None], tokens, langs[:, None])
        # bt: the current model translates (inference mode, no gradient) into lang2 ...
        src = pair_batch(tokens, langs[:, None], tokens, langs[:, None])
        generated, _ = generate(
            self.model,
            jax.lax.stop_gradient(params),
            src,
            lang2,
            max_len=self.bt_max_len,
            max_len_rule=self.max_len_rule,
        )
        # ... and learns to translate that back into the original.
        return pair_batch(generated, lang2, tokens, langs[:, None])


def train_step(
    state: train_state.TrainState,
    batch: Batch,
    rng,
    lam,
    lang2,
    *,
    kind: str,
    objectives_: Objectives,
    tx,
    loss_kw: Mapping,
) -> tuple[train_state.TrainState, Sums]:
    k_prep, k_drop = jax.random.split(rng)
    s2s = objectives_.prepare(kind, state.params, batch, k_prep, lang2)
    model = objectives_.model

    def f(params):
        sums = loss_sums(model, params, s2s, k_drop, deterministic=False, loss_kw=loss_kw)
        return sums["loss_sum"], sums

    grads, sums = jax.grad(f, has_aux=True)(state.params)
    return train_state.apply_gradients(state, grads, sums, lam, tx)


# --- setup --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train: dict[str, Any]  # entry key -> SentenceBatches | ParallelBatches
    eval: dict[str, dict[tuple[str, str], tuple[list[str], list[str]]]]  # split -> dir -> text


def _buckets(config: ml_collections.ConfigDict) -> list[int]:
    try:
        buckets = sorted({int(x) for x in str(config.length_buckets).split(",") if x.strip()})
    except ValueError:
        raise ValueError(
            f"length_buckets={config.length_buckets!r}: integers, e.g. '16,32,64'"
        ) from None
    if not buckets or buckets[0] < 3:
        raise ValueError(f"length_buckets={config.length_buckets!r}: sizes of at least 3 tokens")
    return buckets


def check_lengths(config: ml_collections.ConfigDict, max_positions: int) -> None:
    """Every generated length must have a position embedding: fail before compiling."""
    longest = max(_buckets(config))
    for what in ("bt_max_len", "eval_max_len"):
        n = max_len_of(longest, *_two_floats(config[what], what))
        if n > max_positions:
            raise ValueError(
                f"{what}={config[what]!r} allows {n} tokens for the {longest}-token bucket, but "
                f"the model has {max_positions} positions; lower it or the buckets"
            )


def read_eval_text(
    config: ml_collections.ConfigDict, langs: Sequence[str]
) -> dict[str, corpus_lib.Split]:
    """The valid and test text, whole: BLEU needs the raw references (small sets)."""
    read_kw = corpus_lib.read_options(config.data)
    return {
        split: corpus_lib.read_split(
            config.data[split], langs, root=config.data.root or "", where=f"data.{split}", **read_kw
        )
        for split in ("valid", "test")
        if config.data[split]
    }


def check_entries_have_text(config: ml_collections.ConfigDict, entries: Sequence[Entry]) -> None:
    """Every AE/BT language has monolingual text in data.train, and every MT pair parallel text
    (either way): checked on the setting, before anything is read."""
    have = corpus_lib.parse_sources(config.data.train, "data.train")
    for e in entries:
        if e.objective == "mt":
            if f"{e.lang1}-{e.lang2}" not in have and f"{e.lang2}-{e.lang1}" not in have:
                raise DataError(
                    f"mt_steps lists {e.lang1}-{e.lang2} but data.train has no parallel text for it"
                )
        elif e.lang1 not in have:
            raise DataError(
                f"{e.objective}_steps lists {e.lang1!r} but data.train has no monolingual "
                f"text for it"
            )


def source_paths(config: ml_collections.ConfigDict) -> list[Path]:
    """The files the run reads (``Plan.sources``): those of data.train, data.valid, data.test."""
    return corpus_lib.split_paths(
        {f"data.{split}": config.data[split] for split in ("train", "valid", "test")},
        root=config.data.root or "",
        data_dir=config.data.tfds_data_dir or None,
    )


def directions(
    split: corpus_lib.Split, only: str = "", where: str = "eval_directions"
) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """(src, tgt) → (source lines, reference lines): both directions of every pair, or those
    listed in ``only`` ("en-de,de-en"), each of which must have a pair."""
    out = {}
    for (l1, l2), (a, b) in split.para.items():
        out[(l1, l2)] = (a, b)
        out[(l2, l1)] = (b, a)
    if not only:
        return out
    wanted = [tuple(d.strip().split("-")) for d in only.split(",") if d.strip()]
    missing = [f"{a}-{b}" for a, b in wanted if (a, b) not in out]
    if missing:
        raise DataError(f"{where} lists {missing}, which no evaluation pair provides")
    return {d: out[d] for d in wanted}


def build_iterators(
    config: ml_collections.ConfigDict,
    entries: Sequence[Entry],
    prepared_set: prepared_lib.PreparedSet,
    lang_id: Callable[[str], int],
    rows_of: Callable[[int], tuple[int, int]],
    data_parallel: int = 1,
) -> dict[str, Any]:
    """The training iterators by entry key: `batch_size` rows, or a token budget's rows per
    bucket (a multiple of `data_parallel`), this process's rows of each batch (`rows_of`)."""
    buckets = _buckets(config)
    have = prepared_set.keys("train")
    iterators: dict[str, Any] = {}
    common = dict(
        batch_size=config.batch_size,
        buckets=buckets,
        seed=config.seed,
        rows_of=rows_of,
        tokens_per_batch=config.tokens_per_batch,
        row_multiple=data_parallel,
    )
    for e in entries:
        if e.objective == "mt":
            if f"{e.lang1}-{e.lang2}" in have:
                a, b = prepared_set.sentences("train", f"{e.lang1}-{e.lang2}")
            else:
                b, a = prepared_set.sentences("train", f"{e.lang2}-{e.lang1}")
            it = sentences.ParallelBatches(
                a,
                b,
                src_lang=lang_id(e.lang1),
                tgt_lang=lang_id(e.lang2),
                name=e.key,
                **common,
            )
        else:
            it = sentences.SentenceBatches(
                prepared_set.sentences("train", e.lang1)[0],
                lang_id=lang_id(e.lang1),
                name=e.key,
                **common,
            )
        if it.n_dropped:
            logging.warning(
                "%s: dropped %d sentences (empty, or longer than %d tokens)",
                e.key,
                it.n_dropped,
                max(buckets) - 2,
            )
        iterators[e.key] = it
    if config.tokens_per_batch > 0:  # the shapes the steps compile for
        logging.info(
            "tokens_per_batch=%d: rows per bucket length %s; batches per epoch %s",
            config.tokens_per_batch,
            it.bucket_rows,
            {k: i.epoch_batches() for k, i in iterators.items()},
        )
    return iterators


def seq2seq_configs(
    encoder: ModelConfig, config: ml_collections.ConfigDict
) -> tuple[ModelConfig, ModelConfig]:
    """The encoder's and the decoder's configs, from the source encoder's and the settings."""
    source = pretrained.with_dropout(encoder, config, prefix="")

    def depth(n: int) -> ModelConfig:
        return source if n < 0 else dataclasses.replace(source, n_layers=n)

    return depth(config.enc_layers), depth(config.dec_layers)


def example_batch(dp: int) -> tuple[Batch]:
    z = jnp.zeros((dp, 8), jnp.int32)
    return (
        {f"{side}_{k}": z for side in ("src", "tgt") for k in ("tokens", "positions", "langs")},
    )


class Steps:
    """The compiled functions: one train step per objective kind, evaluation and translation.

    Each compiles once per batch shape (length bucket, and with `tokens_per_batch` that bucket's
    rows); languages are runtime arguments.
    """

    def __init__(self, config, model, tx, mesh, rules, state_shardings, word_start):
        self.mesh, self.rules, self.model = mesh, rules, model
        loss_kw = dict(
            mesh=mesh,
            batch_axes=parallel.mesh_axes_of("batch", rules),
            vocab_axes=parallel.mesh_axes_of("vocab", rules),
            label_smoothing=config.label_smoothing,
        )
        objs = Objectives(
            model,
            {
                "shuffle_k": config.word_shuffle,
                "dropout": config.word_dropout,
                "blank": config.word_blank,
            },
            word_start,
            _two_floats(config.bt_max_len, "bt_max_len"),
            config.max_len_rule,
        )
        self.batch_sharding = parallel.batch_sharding(mesh, rules)
        repl = parallel.replicated(mesh)
        self.train = {
            kind: jax.jit(
                train_state.keyed_by_step(
                    functools.partial(
                        train_step, kind=kind, objectives_=objs, tx=tx, loss_kw=loss_kw
                    ),
                    config.seed,
                    argnum=2,
                ),
                in_shardings=(state_shardings, self.batch_sharding, repl, repl, repl),
                out_shardings=(state_shardings, repl),
                donate_argnums=0,
            )
            for kind in ("ae", "mt", "bt")
        }
        self.eval_loss = jax.jit(
            lambda params, batch: loss_sums(
                model, params, batch, jax.random.key(0), deterministic=True, loss_kw=loss_kw
            ),
            in_shardings=(state_shardings.params, self.batch_sharding),
            out_shardings=repl,
        )
        self.translate = jax.jit(
            functools.partial(
                generate,
                model,
                max_len=_two_floats(config.eval_max_len, "eval_max_len"),
                max_len_rule=config.max_len_rule,
                beam_size=config.beam_size,
                length_penalty=config.length_penalty,
                early_stopping=config.early_stopping,
            ),
            in_shardings=(state_shardings.params, self.batch_sharding, repl),
            out_shardings=(
                self.batch_sharding,
                NamedSharding(mesh, PartitionSpec(self.batch_sharding.spec[0])),
            ),
        )

    def compilations(self) -> int:
        fns = (*self.train.values(), self.eval_loss, self.translate)
        return sum(f._cache_size() for f in fns)


def to_host(x: jax.Array) -> np.ndarray:
    """A global (possibly multi-host) array, whole, on this host."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- evaluation ---------------------------------------------------------------------------------


def translate_lines(
    translate: Callable,
    batch_sharding: NamedSharding,
    params,
    lines: Sequence[str],
    *,
    tokenizer: Tokenizer,
    src: tuple[str, int],
    tgt: tuple[str, int],
    batch_size: int,
    buckets: Sequence[int],
    rows_of: Callable[[int], tuple[int, int]] = lambda n: (0, n),
) -> list[str]:
    """Translations of `lines` from `src` to `tgt` (each `(code, id)`), in their order; sources
    longer than the largest bucket are cut, with a warning."""
    out: list[str] = [""] * len(lines)
    batches = sentences.eval_sentence_batches(
        tokenizer.encode_many(lines, src[0]), lang_id=src[1], batch_size=batch_size, buckets=buckets
    )
    start, stop = rows_of(batch_size)
    for batch, index in batches:
        src = pair_inputs(batch)
        local = {k: v[start:stop] for k, v in src.items()}
        tokens, lengths = translate(
            params,
            parallel.global_batch(local, batch_sharding, batch_size),
            np.int32(tgt[1]),
        )
        tokens, lengths = to_host(tokens), to_host(lengths)
        for row, i in enumerate(index):
            if i >= 0:
                out[i] = tokenizer.decode(tokens[row, 1 : max(lengths[row] - 1, 1)], tgt[0])
    return out


def pair_inputs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A monolingual sentence batch as the source side of a translation batch."""
    return {
        "src_tokens": batch["tokens"],
        "src_positions": batch["positions"],
        "src_langs": batch["langs"],
    }


def evaluate(
    steps: Steps,
    params,
    data: Data,
    *,
    tokenizer: Tokenizer,
    lang_id: Callable[[str], int],
    config: ml_collections.ConfigDict,
    rows_of: Callable[[int], tuple[int, int]],
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Perplexity, accuracy and BLEU per direction of every evaluation split; and the
    translations (for the workdir's hypothesis files)."""
    buckets = _buckets(config)
    n = config.eval_batch_size
    start, stop = rows_of(n)
    metrics: dict[str, float] = {}
    hypotheses: dict[str, list[str]] = {}
    with parallel.mesh_context(steps.mesh, steps.rules):
        for split, dirs in data.eval.items():
            scores = []
            for (l1, l2), (src_lines, ref_lines) in dirs.items():
                name = f"{l1}-{l2}"
                batches = sentences.eval_parallel_batches(
                    tokenizer.encode_many(src_lines, l1),
                    tokenizer.encode_many(ref_lines, l2),
                    src_lang=lang_id(l1),
                    tgt_lang=lang_id(l2),
                    batch_size=n,
                    buckets=buckets,
                )
                sums = [
                    steps.eval_loss(
                        params,
                        parallel.global_batch(
                            {k: v[start:stop] for k, v in b.items()}, steps.batch_sharding, n
                        ),
                    )
                    for b, _ in batches
                ]
                totals = jax.device_get(sums)
                loss = {k: float(sum(t[k] for t in totals)) for k in totals[0]}
                for stat, value in summarize({name: loss}).items():
                    metrics[f"{split}/{stat}"] = value
                hyps = translate_lines(
                    steps.translate,
                    steps.batch_sharding,
                    params,
                    src_lines,
                    tokenizer=tokenizer,
                    src=(l1, lang_id(l1)),
                    tgt=(l2, lang_id(l2)),
                    batch_size=n,
                    buckets=buckets,
                    rows_of=rows_of,
                )
                sacre = bleu.sacre_bleu(hyps, ref_lines)
                metrics[f"{split}/{name}/bleu"] = sacre.score
                metrics[f"{split}/{name}/tok_bleu"] = bleu.tokenized_bleu(hyps, ref_lines, l2).score
                logging.info("%s %s: %s", split, name, sacre)
                hypotheses[f"{split}.{name}"] = hyps
                scores.append(sacre.score)
            metrics[f"{split}/bleu"] = float(np.mean(scores))
    return metrics, hypotheses


def eval_metric_names(data: Data) -> list[str]:
    names = []
    for split, dirs in data.eval.items():
        names.append(f"{split}/bleu")
        for l1, l2 in dirs:
            names += [f"{split}/{l1}-{l2}/{s}" for s in ("bleu", "tok_bleu", "loss", "acc", "ppl")]
    return sorted(names)


# --- the task -----------------------------------------------------------------------------------


def load_source(config: ml_collections.ConfigDict, workdir: Path) -> pretrained.EncoderSource:
    """The pretrained model (or a random init) the translation model starts from."""
    if config.init_checkpoint is None:
        raise ValueError(
            "init_checkpoint is required by this config: set --config.init_checkpoint to the "
            "pretraining workdir"
        )
    if config.init_checkpoint:
        return pretrained.load_pretrained(config.init_checkpoint, config.init_step)

    train = prepare_lib.streamed_tokenizer(config, workdir)
    return pretrained.random_source(config, workdir, train=train)


def source_of(
    config: ml_collections.ConfigDict, env: loop.Env
) -> tuple[pretrained.EncoderSource, ModelConfig | None]:
    """Where the model comes from, and the decoder's config when resuming: a resumed run
    rebuilds its model from its own metadata, never from the source again."""
    saved = env.saved
    if saved is None:
        return load_source(config, env.workdir), None
    keys = ("dropout", "attention_dropout", "dropout_rng", "enc_layers", "dec_layers")
    saved_config = {"dropout_rng": "", "enc_layers": -1, **saved["config"]}  # before the settings
    pretrained.check_same_source(saved_config, config, env.where, *keys)
    source = pretrained.EncoderSource(
        Tokenizer.from_bytes(base64.b64decode(saved["tokenizer"])),
        ModelConfig.from_saved(saved["encoder"]),
        list(saved["model_langs"]),
        None,
        saved["init"],
    )
    return source, ModelConfig.from_saved(saved["decoder"])


def word_starts(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> jax.Array | None:
    """The noise's word table (``whole_word_noise``): which pieces start a word."""
    if not config.whole_word_noise:
        return None
    if tokenizer.serialized.startswith(XLM_BPE_MAGIC):
        # fastBPE marks a word's *continuation* ("@@" on the previous piece), which is not a
        # property of a token alone; the noise's word table needs SentencePiece's "▁".
        raise ValueError(
            "whole_word_noise needs a SentencePiece vocabulary; this model's is XLM's fastBPE"
        )
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    return jnp.asarray(noise.word_start_from_pieces(pieces))


def flops_per_token(enc: ModelConfig, dec: ModelConfig, objective: str) -> Callable[[int], float]:
    """Model FLOPs per host token at a row length: AE and BT rows are one side (BT adds its
    generation, a forward pass: a third of training); an MT row holds both sides."""
    scale = {"ae": 1.0, "mt": 0.5, "bt": 1.0 + 1.0 / 3.0}[objective]
    return lambda length: scale * seq2seq_flops_per_token(enc, dec, length)


def setup(config: ml_collections.ConfigDict, env: loop.Env) -> loop.Plan:
    """Text, the source model, iterators; XLM's round of AE, MT and BT updates."""
    data_parallel = parallel.data_parallel_size(env.mesh, env.rules)
    check_token_budget(config, data_parallel)
    langs = corpus_lib.checked_langs(config)
    entries = parse_entries(config, langs)
    check_entries_have_text(config, entries)
    eval_splits = read_eval_text(config, langs)
    source, dec_saved = source_of(config, env)
    if source.params is not None:  # before any text is prepared
        check_depths(config, source.model.n_layers)
    tokenizer = source.tokenizer
    prepared_set = prepare_lib.open_for_model(config, env.workdir, tokenizer)
    enc_cfg, dec_cfg = seq2seq_configs(source.model, config)
    dec_cfg = dec_saved or dec_cfg
    check_lengths(config, dec_cfg.max_positions)

    def lang_id(lang: str) -> int:
        return source.lang_id(lang, "langs")

    data = Data(
        build_iterators(config, entries, prepared_set, lang_id, env.rows_of, data_parallel),
        {split: directions(s, config.eval_directions) for split, s in eval_splits.items()},
    )
    # XLM: one iteration passes over every entry, and λ schedules count iterations
    saved = env.saved["config"] if env.saved is not None else None
    per_point = lambda_steps_per_point(config.lambda_unit, saved, len(entries))
    lambdas = Lambdas({k: config[f"lambda_{k}"] for k in ("ae", "mt", "bt")}, per_point)
    model, tx = EncoderDecoder(enc_cfg, dec_cfg), train_state.make_optimizer(config.optimizer)
    word_start = word_starts(config, tokenizer)
    flops = {k: flops_per_token(enc_cfg, dec_cfg, k) for k in ("ae", "mt", "bt")}

    def update(step: int) -> loop.Update:
        entry = entries[step % len(entries)]
        it = data.train[entry.key]
        return loop.Update(
            key=entry.key,
            program=entry.objective,
            lam=lambdas(entry.objective, step),
            rows=it.next_rows(),  # the global rows of the batch fetch returns
            fetch=lambda: next(it),
            flops_per_token=flops[entry.objective],
            extra=(np.int32(lang_id(entry.lang2)),),
        )

    def compile_programs(shardings) -> loop.Programs:
        steps = Steps(config, model, tx, env.mesh, env.rules, shardings, word_start)

        def evaluate_and_write(params, step: int) -> dict[str, float]:
            metrics, hyps = evaluate(
                steps,
                params,
                data,
                tokenizer=tokenizer,
                lang_id=lang_id,
                config=config,
                rows_of=env.rows_of,
            )
            if jax.process_index() == 0:
                write_hypotheses(env.workdir / "hypotheses", step, hyps)
            return metrics

        return loop.Programs(steps.train, evaluate_and_write, steps.compilations)

    def init_params(state: train_state.TrainState) -> train_state.TrainState:
        if source.params is None:
            return state
        params, fresh = init_from_pretrained(state.params, source.params, pretrained.put_like)
        source.params = None  # the host copy is no longer needed
        logging.info("initialised from %s; fresh: %s", source.description, fresh)
        return state.replace(params=params)

    meta = loop.run_meta(
        config,
        tokenizer.serialized,
        encoder=enc_cfg.to_dict(),
        decoder=dec_cfg.to_dict(),
        model_langs=source.langs,
        init=source.info,
    )
    return loop.Plan(
        model=model,
        tx=tx,
        compile=compile_programs,
        update=update,
        cadence=loop.Cadence.of(config, len(entries)),
        meta=meta,
        describe=f"translation model (encoder {enc_cfg.n_layers} layers, decoder "
        f"{dec_cfg.n_layers}), vocab {tokenizer.vocab_size}, from {source.description}; "
        f"steps {[e.key for e in entries]}",
        pad_id=PAD_ID,
        iterators=data.train,
        metric_names=eval_metric_names(data),
        example=example_batch,
        init_params=init_params,
        lr=lambda updates: train_state.learning_rate(config, updates),
        sources=source_paths(config),
        known_sources=prepared_set.manifest["sources"],
    )


def batch_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The fixed batch sizes (checked against the mesh); a token budget sets its own rows."""
    budget = config.tokens_per_batch > 0
    names = ("eval_batch_size",) if budget else ("batch_size", "eval_batch_size")
    return {what: config[what] for what in names}


def check_token_budget(config: ml_collections.ConfigDict, data_parallel: int = 1) -> None:
    """``tokens_per_batch`` must give the longest bucket a row per batch shard."""
    if config.tokens_per_batch > 0:
        sentences.check_budget(config.tokens_per_batch, _buckets(config), data_parallel)


def check_depths(config: ml_collections.ConfigDict, source_layers: int | None = None) -> None:
    """``enc_layers``/``dec_layers``: -1 or a depth, at most a pretrained source's."""
    for name in ("enc_layers", "dec_layers"):
        n = config[name]
        if n == 0 or n < -1:
            raise ValueError(f"{name}={n}: expected -1 (the source model's depth) or >= 1")
        if source_layers is not None and n > source_layers:
            raise ValueError(
                f"{name}={n}: the pretrained model has {source_layers} layers and a pretrained "
                f"half takes its first N; set N <= {source_layers}, or -1 for all"
            )


def check(config: ml_collections.ConfigDict) -> None:
    """Settings that cannot work, refused before anything is read."""
    train_state.check_optimizer(config.optimizer)
    corpus_lib.checked_langs(config)
    check_token_budget(config)  # the mesh's batch split is checked again in setup
    prepare_lib.records_of(config, expected="text")  # sentences, not NLI records
    lambda_steps_per_point(config.lambda_unit, None, 1)  # a known unit
    check_depths(config)
    if config.max_len_rule not in ("row", "batch"):
        raise ValueError(f"max_len_rule={config.max_len_rule!r}: expected 'row' or 'batch'")


TASK = loop.Task("nmt", setup, batch_sizes, check=check)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_step: Callable[[int, train_state.TrainState], None] | None = None,
) -> dict[str, float]:
    """Trains a translation model as `config` says, resuming from `workdir` if it holds a
    checkpoint. Returns the last logged training and evaluation scalars."""
    return loop.run(TASK, config, workdir, on_step=on_step)


def write_hypotheses(directory: Path, step: int, hyps: Mapping[str, list[str]]) -> None:
    """`hypotheses/{split}.{src}-{tgt}.{step}.txt`: one translation per line (atomic writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, lines in hyps.items():
        write_atomic(directory / f"{name}.{step}.txt", "".join(h + "\n" for h in lines).encode())


# --- translating with a trained model ------------------------------------------------------------


class Translator:
    """A trained translation model from a workdir (its best checkpoint by default), ready to
    translate lists of sentences in any direction between its languages.

    Parameters are placed on a mesh of all devices by the run's own sharding rules; translation
    batches are split over the data axes.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        step: int = -1,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        max_len: str = "1.5,10",
        batch_size: int = 32,
    ) -> None:
        directory, step, chosen, meta, state = pretrained.load_checkpoint(workdir, step)
        if "decoder" not in meta:
            raise ValueError(f"{directory} is not a translation run (no decoder in its checkpoint)")
        config = ml_collections.ConfigDict(meta["config"])
        self.tokenizer = Tokenizer.from_bytes(base64.b64decode(meta["tokenizer"]))
        self.langs = list(meta["model_langs"])
        self.buckets = _buckets(config)
        self.batch_size = batch_size
        self.description = f"{directory} step {step} ({chosen})"
        model = EncoderDecoder(
            ModelConfig.from_saved(meta["encoder"]), ModelConfig.from_saved(meta["decoder"])
        )
        self.rules = parallel.rules_from_config(config.mesh.rules)
        self.mesh = parallel.make_mesh((-1, 1, 1))
        parallel.check_batch_size(batch_size, self.mesh, self.rules, "batch_size")
        with parallel.mesh_context(self.mesh, self.rules):
            boxed = jax.eval_shape(
                lambda r: model.init({"params": r}, *example_batch(1))["params"],
                jax.random.key(0),
            )
            shardings = parallel.logical_shardings(boxed, self.mesh, self.rules)
        like = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            flax.linen.meta.unbox(boxed),
            shardings,
        )
        self.params = pretrained.place_params(state["params"], like, self.description)
        self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
        repl = parallel.replicated(self.mesh)
        self._translate = jax.jit(
            functools.partial(
                generate,
                model,
                max_len=_two_floats(max_len, "max_len"),
                beam_size=beam_size,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
            ),
            in_shardings=(shardings, self.batch_sharding, repl),
            out_shardings=(
                self.batch_sharding,
                NamedSharding(self.mesh, PartitionSpec(self.batch_sharding.spec[0])),
            ),
        )

    def lang_id(self, lang: str) -> int:
        if lang not in self.langs:
            raise ValueError(f"language {lang!r}: the model knows {self.langs}")
        return self.langs.index(lang)

    def __call__(self, lines: Sequence[str], src: str, tgt: str) -> list[str]:
        src_id, tgt_id = self.lang_id(src), self.lang_id(tgt)
        with parallel.mesh_context(self.mesh, self.rules):
            return translate_lines(
                self._translate,
                self.batch_sharding,
                self.params,
                lines,
                tokenizer=self.tokenizer,
                src=(src, src_id),
                tgt=(tgt, tgt_id),
                batch_size=self.batch_size,
                buckets=self.buckets,
                rows_of=lambda n: parallel.process_rows(self.batch_sharding, n),
            )
