"""Tatoeba sentence-retrieval probe: does the encoder map translations close together?

No fine-tuning: each sentence is ``</s> sentence </s>`` with its own language id, its vector the
mean of the last layer (or of the one ``layer`` names) over its non-pad tokens; each XX sentence
retrieves among all English ones of its pair by cosine similarity (and the reverse). The encoder
comes from a pretraining checkpoint or a random init, as for XNLI (``xlm_jax/model/pretrained.py``).

Entry point: ``retrieval`` (``--mode=retrieval``); settings and their defaults:
``retrieval_default_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from xlm_jax.core import train_state
from xlm_jax.core.files import write_atomic
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data import nli, presets, sources
from xlm_jax.data.sources import DataError
from xlm_jax.model import pretrained
from xlm_jax.model.encoder import XLMEncoder, pooled
from xlm_jax.tasks import xnli
from xlm_jax.tasks.report import csv_bytes, markdown_table, ordered_langs

# The pretraining presets train on the first 80% of each Tatoeba file (lines 0..799 of the
# 1,000-line ones): the retrieval probe reads the rest.
TATOEBA_HELD_OUT = f"{presets.TRAIN_SHARE}%"
# A pair's languages and line-aligned sentences: (xx, en, xx sentences, en sentences).
Pair = tuple[str, str, list[str], list[str]]


def retrieval_default_config() -> ml_collections.ConfigDict:
    """Every setting of the probe: the encoder's (as for XNLI) and the pairs to retrieve."""
    c = ml_collections.ConfigDict()
    xnli.encoder_settings(c)
    # Pairs "XX-en: SRC_SPEC|EN_SPEC; ...": line-aligned translations; each XX sentence
    # retrieves among all English ones (and the reverse) by the cosine similarity of mean-pooled
    # last-layer states.
    c.data.pairs = ""
    # The states pooled: after this many layers (0 = the embeddings' output), -1 = the last.
    # Translations are often closer in the middle layers than at the top, whose states serve
    # the pretraining objective's predictions (XTREME's retrieval reads layer 8 of 12).
    c.layer = -1
    c.batch_size = 64
    return c


def tatoeba_pair_sources(
    langs: Sequence[str] = nli.PAPER_LANGS[1:], start: int | str = TATOEBA_HELD_OUT
) -> str:
    """``data.pairs`` for Tatoeba as in ../shared/data: lines ``start..`` of each XX-en file.

    The default start is where the pretraining presets' training share ends (80%: line 800 of
    the 1,000-line files, and the last 20% of the shorter ones), so the probe sees no line the
    encoder was pretrained on.
    """
    out = []
    for lang in langs:
        src = presets.tatoeba(lang, lang, f"{start}:")
        out.append(f"{lang}-en: {src}|{presets.tatoeba(lang, 'en', f'{start}:')}")
    return "; ".join(out)


def layer_states(params, batch, *, model: XLMEncoder, layer: int = -1) -> jax.Array:
    """The states after ``layer`` layers (-1: all), float32 ``(batch, length, emb_dim)``."""
    return model.apply(
        {"params": params},
        batch["tokens"],
        batch["positions"],
        batch["langs"],
        deterministic=True,
        n_layers=None if layer == -1 else layer,
        method=XLMEncoder.encode,
    ).astype(jnp.float32)


def mean_pooled(params, batch, *, model: XLMEncoder, layer: int = -1) -> jax.Array:
    """Mean of a layer's states (``layer_states``) over each row's non-pad tokens, float32
    ``(batch, emb_dim)``."""
    states = layer_states(params, batch, model=model, layer=layer)
    return pooled(states, batch["tokens"], "mean")


def check_layer(layer: int, n_layers: int, setting: str) -> None:
    """``ValueError`` unless the encoder has ``layer`` (0..n_layers, or -1 for the last)."""
    if layer != -1 and not 0 <= layer <= n_layers:
        raise ValueError(
            f"{setting}={layer}: the encoder has layers 1..{n_layers} (0 = its embeddings, "
            "-1 = the last)"
        )


def retrieval_accuracy(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Row i of ``x`` and of ``y`` are translations. Cosine nearest neighbour: the % of x rows
    whose nearest y is their own translation, and the same from y to x."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    sim = x @ y.T
    target = np.arange(len(x))
    return (
        100.0 * float(np.mean(sim.argmax(axis=1) == target)),
        100.0 * float(np.mean(sim.argmax(axis=0) == target)),
    )


def _held_out_start_ok(spec_text: str, root: str) -> tuple[bool, str]:
    """False (with the reason) when a file spec starts at or beyond the end of its file."""
    s = sources.parse_spec(spec_text)
    if s.kind != "file" or s.start is None:
        return True, ""
    n = sources.line_count(dataclasses.replace(s, start=None, end=None), root)
    start = sources.first_line(s, root)
    if start >= n:
        return False, f"{s.path} has {n} lines, none from line {start} on"
    return True, ""


def retrieval(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Tatoeba-style retrieval with mean-pooled states (of ``config.layer``), both directions per
    pair.

    Writes ``retrieval.{csv,md,json}`` in the workdir and returns the results dict. A pair whose
    held-out range is empty (a short file entirely used for pretraining) is skipped and listed.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runner = xnli.Runner.for_config(config, {"batch_size": config.batch_size})
    texts, skipped = _read_pairs(config.data)
    source = _encoder_source(config, workdir, texts)
    check_layer(config.layer, source.model.n_layers, "layer")
    encoded = {
        key: (source.tokenizer.encode_many(a, l1), source.tokenizer.encode_many(b, l2))
        for key, (l1, l2, a, b) in texts.items()
    }
    # One row length for every sentence: a single compilation of the encoder serves all pairs.
    needed = max(
        nli.sentence_length(ids, config.max_len) for a, b in encoded.values() for ids in [*a, *b]
    )
    length = xnli.row_length(needed, config, source.model)
    embed = _embedder(config, runner, source, length)

    t0 = time.perf_counter()
    per_pair = scores(texts, encoded, embed)
    results = {
        "init": source.description,
        "layer": config.layer,
        "row_length": length,
        "pairs": per_pair,
        "average": {
            k: float(np.mean([v[k] for v in per_pair.values()]))
            for k in ("xx->en", "en->xx", "mean")
        },
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
    }
    if jax.process_index() == 0:
        write_retrieval(workdir, results)
    return results


def scores(
    texts: Mapping[str, Pair],
    encoded: Mapping[str, tuple[list[np.ndarray], list[np.ndarray]]],
    embed: Callable[[Sequence[np.ndarray], str, str], np.ndarray],
) -> dict[str, dict[str, float]]:
    """Retrieval accuracy of every pair in both directions, and their mean."""
    per_pair = {}
    for key, (l1, l2, _, _) in texts.items():
        a, b = encoded[key]
        fwd, bwd = retrieval_accuracy(embed(a, l1, key), embed(b, l2, key))
        per_pair[key] = {"n": len(a), "xx->en": fwd, "en->xx": bwd, "mean": (fwd + bwd) / 2}
        logging.info("retrieval %s (%d pairs): %.1f / %.1f", key, len(a), fwd, bwd)
    return per_pair


def _read_pairs(data: ml_collections.ConfigDict) -> tuple[dict[str, Pair], dict[str, str]]:
    """The sentences of ``data.pairs`` by pair key, and the keys skipped with the reason: those
    whose held-out range is empty. Bad keys or entries, or nothing left to probe: ``DataError``."""
    root, kw = data.root, corpus_lib.read_options(data)
    texts: dict[str, Pair] = {}
    skipped: dict[str, str] = {}
    for key, items in corpus_lib.source_items(data.pairs, "data.pairs").items():
        parts = key.split("-")
        if len(parts) != 2 or not all(p.isalnum() for p in parts):
            raise DataError(f"data.pairs: key {key!r}; expected 'xx-en'")
        src, tgt = [], []
        for item in items:
            sides = item.split("|")
            if len(sides) != 2:
                raise DataError(f"data.pairs.{key}: {item!r} must be 'SRC_SPEC|TGT_SPEC'")
            ok, why = _held_out_start_ok(sides[0], root)
            if not ok:
                skipped[key] = why
                logging.warning("retrieval: skipping %s: %s", key, why)
                continue
            a, b = sources.read_parallel(sides[0], sides[1], root, **kw)
            src += a
            tgt += b
        if src:
            texts[key] = (parts[0], parts[1], src, tgt)
    if not texts:
        raise DataError(f"data.pairs: nothing to probe (skipped: {skipped or 'no entries'})")
    return texts, skipped


def _encoder_source(
    config: ml_collections.ConfigDict, workdir: Path, texts: Mapping[str, Pair]
) -> pretrained.EncoderSource:
    """The pretrained encoder, or a random init whose tokenizer (trained in ``workdir`` unless
    already there) learns from the probe's own sentences, read only if it must be trained."""
    if config.init_checkpoint:
        return pretrained.load_pretrained(config.init_checkpoint, config.init_step)

    def texts_fn() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for l1, l2, a, b in texts.values():
            out.setdefault(l1, []).extend(a)
            out.setdefault(l2, []).extend(b)
        return out

    return pretrained.random_source(config, workdir, texts_fn)


def _embedder(
    config: ml_collections.ConfigDict,
    runner: xnli.Runner,
    source: pretrained.EncoderSource,
    length: int,
) -> Callable[[Sequence[np.ndarray], str, str], np.ndarray]:
    """``embed(sentences, lang, key)``: the mean-pooled vectors (float32, one row per sentence)
    of encoded sentences in ``lang``, packed in rows of ``length``, under the source's params
    (or the random init) placed on the runner's mesh; ``key`` names the pair in errors."""
    model = XLMEncoder(source.model)
    state, shardings = train_state.init_state(
        model, optax.identity(), jax.random.key(config.seed), runner.mesh, runner.rules, runner.dp
    )
    params = state.params
    if source.params is not None:
        params = pretrained.place_params(source.params, params, source.description)
    embed_fn = jax.jit(
        functools.partial(mean_pooled, model=model, layer=config.layer),
        in_shardings=(shardings.params, runner.batch_sharding),
        out_shardings=runner.replicated,
    )

    def embed(sentences: Sequence[np.ndarray], lang: str, key: str) -> np.ndarray:
        lid = source.lang_id(lang, f"data.pairs.{key}")
        rows = sentence_rows(sentences, lid, config.max_len, length)
        return embed_rows(embed_fn, params, rows, runner, config.batch_size)

    return embed


def sentence_rows(sentences: Sequence[np.ndarray], lid: int, max_len: int, length: int) -> nli.Rows:
    packed = [nli.pack_sentence(s, lid, max_len=max_len, length=length) for s in sentences]
    return nli.Rows.stack(packed, np.zeros(len(packed), np.int32))


def embed_rows(
    embed_fn, params, rows: nli.Rows, runner: xnli.Runner, batch_size: int
) -> np.ndarray:
    """The mean-pooled vectors of ``rows`` (float32, in order), batches split over the mesh."""
    with runner.context():
        outs = [embed_fn(params, runner.put(b)) for b in nli.eval_batches(rows, batch_size)]
    return np.concatenate(jax.device_get(outs))[: len(rows)]


# --- the probe as an evaluator of another run (e.g. pretraining's ``evals = "retrieval"``) ----


@dataclasses.dataclass(frozen=True)
class Probe:
    """The probe's sentence pairs, read, checked and encoded once; scored at any parameters."""

    texts: dict[str, Pair]
    encoded: dict[str, tuple[list[np.ndarray], list[np.ndarray]]]
    length: int  # one row length for every sentence: one compilation
    max_len: int

    @classmethod
    def read(
        cls, data: ml_collections.ConfigDict, tokenizer, max_positions: int, langs: Sequence[str]
    ) -> Probe:
        """``data.pairs`` (as ``--mode=retrieval`` reads them) for an encoder of ``langs``."""
        texts, _ = _read_pairs(data)
        for key, (l1, l2, _, _) in texts.items():
            if l1 not in langs or l2 not in langs:
                raise DataError(f"probe pair {key}: the model's languages are {list(langs)}")
        encoded = {
            key: (tokenizer.encode_many(a, l1), tokenizer.encode_many(b, l2))
            for key, (l1, l2, a, b) in texts.items()
        }
        max_len = max_positions - 2
        needed = max(
            nli.sentence_length(ids, max_len) for a, b in encoded.values() for ids in [*a, *b]
        )
        return cls(texts, encoded, int(min(-(-needed // 8) * 8, max_positions)), max_len)

    def metric_names(self) -> list[str]:
        return [f"retrieval/{key}" for key in self.texts] + ["retrieval/avg"]

    def evaluator(
        self,
        model: XLMEncoder,
        param_shardings,
        runner: xnli.Runner,
        langs,
        batch_size: int,
        layer: int = -1,
    ):
        """``(params, step) -> {"retrieval/xx-en": mean accuracy of both directions, ...,
        "retrieval/avg"}`` for the encoder ``model`` whose languages are ``langs``, pooling the
        states after ``layer`` layers (-1: the last)."""
        embed_fn = jax.jit(
            functools.partial(mean_pooled, model=model, layer=layer),
            in_shardings=(param_shardings, runner.batch_sharding),
            out_shardings=runner.replicated,
        )

        def evaluate(params, step: int) -> dict[str, float]:
            def embed(sentences, lang: str, key: str) -> np.ndarray:
                rows = sentence_rows(sentences, list(langs).index(lang), self.max_len, self.length)
                return embed_rows(embed_fn, params, rows, runner, batch_size)

            per_pair = scores(self.texts, self.encoded, embed)
            out = {f"retrieval/{key}": v["mean"] for key, v in per_pair.items()}
            return out | {"retrieval/avg": float(np.mean(list(out.values())))}

        return evaluate


def write_retrieval(workdir: Path, results: Mapping[str, Any]) -> None:
    """``retrieval.{csv,md,json}``: accuracy per pair in both directions, the average last."""
    pairs = results["pairs"]
    order = ordered_langs([k.split("-")[0] for k in pairs])
    keys = sorted(pairs, key=lambda k: order.index(k.split("-")[0]))
    columns = ["pair", "n", "xx->en", "en->xx", "mean"]
    rows = [{"pair": k, **{c: _round(pairs[k][c]) for c in columns[1:]}} for k in keys]
    rows.append(
        {"pair": "average", "n": None, **{c: _round(results["average"][c]) for c in columns[2:]}}
    )
    write_atomic(workdir / "retrieval.csv", csv_bytes(columns, rows))
    skipped = "".join(f"\n- skipped {k}: {why}" for k, why in results["skipped"].items())
    layer = results.get("layer", -1)
    states = {-1: "last-layer states", 0: "embedding-layer states"}.get(
        layer, f"states after layer {layer}"
    )
    head = (
        "# Tatoeba retrieval\n\n"
        f"Encoder: {results['init']}. Cosine nearest neighbour of mean-pooled {states} "
        "(non-pad tokens, each sentence with its own language id); accuracy (%) in both "
        f"directions.{skipped}\n\n"
    )
    write_atomic(workdir / "retrieval.md", (head + markdown_table(columns, rows)).encode())
    write_atomic(workdir / "retrieval.json", json.dumps(results, indent=1).encode())


def _round(v: Any) -> Any:
    return round(v, 2) if isinstance(v, float) else v
