"""Every program a run compiles, with abstract arguments: what `aot.py` compiles for a TPU slice.

Each mode builds its step functions exactly as its run does (``train.Steps``, ``nmt.Steps``,
``xnli.make_steps``) with the train state's shardings from ``train_state.abstract_state``; only the
arguments are ``jax.ShapeDtypeStruct`` (nothing is allocated, no data or checkpoint parameters are
read). Batch shapes are the run's largest: a program that fits at them fits at every smaller one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from xlm_jax.core import parallel, train_state
from xlm_jax.data import sentences
from xlm_jax.model import pretrained
from xlm_jax.model.encoder import XLMEncoder
from xlm_jax.model.seq2seq import EncoderDecoder
from xlm_jax.tasks import nmt, pretrain, xnli

MODES = ["pretrain", "nmt", "xnli"]


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and abstract arguments to lower it with, on ``mesh`` under ``rules``."""

    name: str
    fn: Any  # a jax.jit-wrapped function
    args: tuple
    mesh: jax.sharding.Mesh
    rules: parallel.Rules
    batch_shape: tuple[int, ...]

    def lower(self):
        with parallel.mesh_context(self.mesh, self.rules):
            return self.fn.lower(*self.args)


def _batch(keys, rows: int, length: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((rows, length), np.int32, sharding=sharding) for k in keys}


_ROW = ("tokens", "positions", "langs")
_STEP, _LAM, _LANG = np.int32(1), np.float32(1.0), np.int32(0)  # runtime scalars, replicated


def _refuse_tlm_budget(config, mesh, rules) -> None:
    """A TLM token budget gives each bucket its own rows: ``tlm_batch_size``'s would be wrong."""
    budget, length = config.tlm_tokens_per_batch, config.tlm_length
    if budget > 0:
        rows = sentences.budget_rows(budget, length, pretrain.tlm_row_multiple(config, mesh, rules))
        raise ValueError(
            f"tlm_tokens_per_batch={budget}: the TLM step's rows follow each bucket's length and "
            f"are not compiled here; compile the longest bucket's ({rows} x {length}) with "
            f"--config.tlm_tokens_per_batch=-1 --config.tlm_batch_size={rows}"
        )


def pretrain_programs(config, mesh, rules, all_shapes: bool = False) -> list[Program]:
    """The MLM, TLM and CLM steps the configured objectives use, and their evaluations."""
    used = {pretrain.kind_of(s) for specs in pretrain.build_steps(config) for s in specs}
    if used & {"tlm", "clm_pairs"}:  # steps on TLM's rows
        _refuse_tlm_budget(config, mesh, rules)
    vocab = config.tokenizer.vocab_size
    model = XLMEncoder(pretrain.model_config(config, vocab))
    tx = train_state.make_optimizer(config.optimizer)
    dp = parallel.data_parallel_size(mesh, rules)
    state, shardings, _ = train_state.abstract_state(model, tx, mesh, rules, dp)
    steps = pretrain.Steps(config, model, tx, mesh, rules, shardings, np.zeros(vocab))
    shapes = {name: (o.program, *o.rows(config)) for name, o in pretrain.OBJECTIVES.items()}
    out = []
    for name, (kind, rows, length) in shapes.items():
        if name not in used:
            continue
        batch = _batch(_ROW, rows, length, steps.batch_sharding)
        out.append(
            Program(
                name, steps.train[kind], (state, batch, _STEP, _LAM), mesh, rules, (rows, length)
            )
        )
        eval_batch = _batch(_ROW, config.eval_batch_size, length, steps.batch_sharding)
        out.append(
            Program(
                f"eval_{name}",
                steps.eval[kind],
                (state.params, eval_batch, _STEP),
                mesh,
                rules,
                (config.eval_batch_size, length),
            )
        )
    return out


def nmt_programs(config, mesh, rules, all_shapes: bool = False) -> list[Program]:
    """AE / MT / BT steps (BT includes its greedy translation), the evaluation loss and the
    evaluation decoder (greedy or beam), at the largest length bucket (``all_shapes``: each)."""
    encoder, langs = pretrained.source_model(config)
    enc, dec = nmt.seq2seq_configs(encoder, config)
    nmt.check_lengths(config, dec.max_positions)
    model = EncoderDecoder(enc, dec)
    tx = train_state.make_optimizer(config.optimizer)
    dp = parallel.data_parallel_size(mesh, rules)
    state, shardings, _ = train_state.abstract_state(model, tx, mesh, rules, dp, nmt.example_batch)
    # whole_word_noise's table has the vocabulary's shape; its values do not change the program
    word_start = np.zeros(enc.vocab_size, bool) if config.whole_word_noise else None
    steps = nmt.Steps(config, model, tx, mesh, rules, shardings, word_start)
    kinds = {e.objective for e in nmt.parse_entries(config, langs)}
    buckets = nmt._buckets(config)
    lengths = buckets if all_shapes else buckets[-1:]
    sh, n, m = steps.batch_sharding, config.batch_size, config.eval_batch_size
    src_keys = [f"src_{k}" for k in _ROW]
    pair_keys = src_keys + [f"tgt_{k}" for k in _ROW]
    out = []
    for length in lengths:
        suffix = f"_{length}" if all_shapes else ""
        for kind in sorted(kinds):
            keys = pair_keys if kind == "mt" else _ROW
            args = (state, _batch(keys, n, length, sh), _STEP, _LAM, _LANG)
            out.append(
                Program(f"{kind}{suffix}", steps.train[kind], args, mesh, rules, (n, length))
            )
        if config.data.valid or config.data.test:
            args = (state.params, _batch(pair_keys, m, length, sh))
            out.append(
                Program(f"eval_loss{suffix}", steps.eval_loss, args, mesh, rules, (m, length))
            )
            args = (state.params, _batch(src_keys, m, length, sh), _LANG)
            name = "greedy" if config.beam_size == 1 else f"beam{config.beam_size}"
            out.append(Program(f"{name}{suffix}", steps.translate, args, mesh, rules, (m, length)))
    return out


def xnli_programs(config, mesh, rules, all_shapes: bool = False) -> list[Program]:
    """The fine-tuning update and the prediction, at the row length of the run (``seq_len``, or
    with ``seq_len=0`` the longest a pair of two ``max_len`` sentences can take)."""
    encoder, _ = pretrained.source_model(config)
    encoder = pretrained.with_dropout(encoder, config)
    length = xnli.row_length(2 * config.max_len - 1, config, encoder)
    model = xnli.classifier_of(config, encoder)
    tx = xnli.make_optimizer(config)
    dp = parallel.data_parallel_size(mesh, rules)
    state, shardings, _ = train_state.abstract_state(model, tx, mesh, rules, dp)
    step_fn, predict_fn = xnli.make_steps(config, model, tx, mesh, rules, shardings)
    sh = parallel.batch_sharding(mesh, rules)
    n, m = config.batch_size, config.eval_batch_size
    train_batch = {
        **_batch(_ROW, n, length, sh),
        "labels": jax.ShapeDtypeStruct((n, 1), np.int32, sharding=sh),
        "weights": jax.ShapeDtypeStruct((n, 1), np.float32, sharding=sh),
    }
    return [
        Program("xnli", step_fn, (state, train_batch, _STEP, _LAM), mesh, rules, (n, length)),
        Program(
            "predict",
            predict_fn,
            (state.params, _batch(_ROW, m, length, sh)),
            mesh,
            rules,
            (m, length),
        ),
    ]


_BUILDERS: dict[str, Callable[..., list[Program]]] = {
    "pretrain": pretrain_programs,
    "nmt": nmt_programs,
    "xnli": xnli_programs,
}


def for_mode(mode: str, config: ml_collections.ConfigDict, mesh, rules, *, all_shapes=False):
    if mode not in _BUILDERS:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    return _BUILDERS[mode](config, mesh, rules, all_shapes)


def batch_field(mode: str, program: str) -> str:
    """The setting that sets ``program``'s global batch."""
    if program.startswith(("eval", "greedy", "beam", "predict")):
        return "eval_batch_size"
    return "tlm_batch_size" if (mode, program) == ("pretrain", "tlm") else "batch_size"
