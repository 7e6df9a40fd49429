"""Where an encoder comes from: a pretraining checkpoint (its tokenizer, languages, model and
parameters) or a random initialisation of the same shape (the baselines).

Shared by every mode that starts from a pretrained encoder: XNLI fine-tuning, the retrieval probe
and translation (which initialises both its encoder and its decoder from it).
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from xlm_jax.core import parallel
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data.sources import DataError
from xlm_jax.model.encoder import FIELDS_BEFORE, RUNTIME_FIELDS, ModelConfig
from xlm_jax.text.tokenizer import Tokenizer, load_or_train


def source_settings(c: ml_collections.ConfigDict) -> None:
    """The settings of an encoder's source (checkpoint or random init), of reading text and of
    the mesh, shared by every mode that starts from a pretrained encoder."""
    c.seed = 0
    # A pretraining workdir (or its checkpoints/ folder): its tokenizer, languages and model come
    # from the checkpoint's metadata. "" = a randomly initialised encoder (a baseline), sized by
    # `model` below, with the languages `langs` and the tokenizer `tokenizer.path` (or one trained
    # on the task's own training text).
    c.init_checkpoint = ""
    c.init_step = -1  # -1 = the pretraining run's best checkpoint if it tracked one, else latest
    c.langs = "en,fr"  # random baseline only
    # Comma-separated codes to accept beyond the known list (ISO 639-1 and XLM-100's, in
    # xlm_jax/text/languages.py), for a language that list does not have; others are typos.
    c.new_langs = ""
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # random baseline only; "" = train one into the workdir
    c.tokenizer.vocab_size = 8000
    c.tokenizer.alpha = 0.5
    c.tokenizer.n_sentences = 100_000
    c.tokenizer.character_coverage = 0.9995
    c.model = ml_collections.ConfigDict()  # random baseline only (else the checkpoint's)
    c.model.emb_dim = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.ffn_dim = None
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.dropout_rng = "hash"  # masks; "threefry16" = older checkpoints' (to resume them)
    c.model.max_positions = 512
    c.model.sinusoidal_embeddings = False
    c.model.use_lang_emb = True
    c.model.gelu_activation = True  # False = ReLU (XLM's --gelu_activation)
    c.model.share_inout_emb = True  # False = an untied output layer (XLM's --share_inout_emb)
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # relative sources resolve here
    c.data.tfds_data_dir = ""  # for tfds: sources ("" = TFDS's default); never downloaded
    c.data.max_chars = 10_000
    c.data.on_invalid_utf8 = "error"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor)
    c.mesh.rules = parallel.DEFAULT_RULES


@dataclasses.dataclass
class EncoderSource:
    tokenizer: Tokenizer
    model: ModelConfig
    langs: list[str]
    params: Any | None  # host (numpy) tree of the pretrained encoder; None = random init
    info: dict[str, Any]  # {"checkpoint": dir, "step": n, "chosen": "best by ..."} or {}

    def lang_id(self, lang: str, where: str) -> int:
        if lang in self.langs:
            return self.langs.index(lang)
        if not self.model.has_lang_embeddings:
            return 0  # no language embedding: the id is never looked up
        raise DataError(
            f"{where}: language {lang!r} is not one of the model's languages {self.langs}"
        )

    @property
    def description(self) -> str:
        if not self.info:
            return "random init"
        return f"{self.info['checkpoint']} step {self.info['step']} ({self.info['chosen']})"


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """A pretraining workdir's checkpoints/ folder (or the folder itself if given)."""
    p = Path(path).expanduser()
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.is_dir():
        return p
    raise FileNotFoundError(f"init_checkpoint {os.fspath(path)!r}: no such directory")


def load_checkpoint(path: str | os.PathLike, step: int = -1) -> tuple[Path, int, str, dict, Any]:
    """A run's checkpoint on the host: (directory, step, why this step, metadata, state).

    ``step=-1`` picks the run's best checkpoint by its own ``best_metric`` when it tracked one,
    else its latest.
    """
    directory = checkpoint_dir(path).resolve()
    with Checkpointer(directory, read_only=True) as probe:
        latest = probe.latest_step()
        if latest is None:
            raise FileNotFoundError(f"{os.fspath(path)!r}: no checkpoint in it")
        pre = probe.restore_meta(latest)["config"]
    chosen = f"step {step} as configured"
    if step < 0:
        best_metric = pre.get("best_metric") or None
        with Checkpointer(
            directory,
            best_metric=best_metric,
            best_mode=pre.get("best_mode", "min"),
            read_only=True,
        ) as ck:
            best, by = ck.best_step(), ck.tracked[:1]
        step, chosen = (best, f"best by {by[0]}") if best is not None else (latest, "latest")
    with Checkpointer(directory, read_only=True) as ck:
        if step not in ck.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint {step} (has {ck.all_steps()})")
        meta = ck.restore_meta(step)
        state = ck.restore_numpy(step)
    return directory, int(step), chosen, meta, state


def load_pretrained(path: str | os.PathLike, step: int = -1) -> EncoderSource:
    """Tokenizer, model config, languages and encoder parameters (host numpy) of a pretraining run
    (its best checkpoint by default, see ``load_checkpoint``)."""
    directory, step, chosen, meta, state = load_checkpoint(path, step)
    tokenizer = Tokenizer.from_bytes(base64.b64decode(meta["tokenizer"]))
    model, langs = _saved_model(meta, tokenizer.vocab_size)
    logging.info(
        "encoder from %s step %d (%s): %s, langs %s", directory, step, chosen, model, langs
    )
    return EncoderSource(
        tokenizer,
        model,
        langs,
        state["params"],
        {"checkpoint": str(directory), "step": int(step), "chosen": chosen},
    )


def random_source(
    config: ml_collections.ConfigDict,
    workdir: Path,
    texts_fn: Callable[[], Mapping[str, Sequence[str]]] | None = None,
    *,
    train: Callable[[Path], Tokenizer] | None = None,
) -> EncoderSource:
    """The baseline: a fresh encoder sized by ``config.model``, tokenizer from ``tokenizer.path``,
    else the workdir's, else trained into the workdir: by ``train(path)`` (e.g. on a sample read
    while streaming, ``data/prepare.py``) or on ``texts_fn()``."""
    t = config.tokenizer
    path = workdir / "tokenizer.model"
    if t.path:
        tokenizer = Tokenizer.load(t.path)
    elif train is not None:
        tokenizer = Tokenizer.load(path) if path.exists() else train(path)
    else:
        tokenizer = load_or_train(
            path,
            texts_fn,
            vocab_size=t.vocab_size,
            alpha=t.alpha,
            n_sentences=t.n_sentences,
            seed=config.seed,
            character_coverage=t.character_coverage,
        )
    model, langs = _configured_model(config, tokenizer.vocab_size)
    return EncoderSource(tokenizer, model, langs, None, {})


def _configured_model(
    config: ml_collections.ConfigDict, vocab_size: int
) -> tuple[ModelConfig, list[str]]:
    langs = corpus_lib.checked_langs(config)
    model = ModelConfig.from_dict(
        {**config.model.to_dict(), "vocab_size": vocab_size, "n_langs": len(langs)}
    )
    return model, langs


def _saved_model(meta: Mapping[str, Any], vocab_size: int) -> tuple[ModelConfig, list[str]]:
    langs = corpus_lib.lang_list(ml_collections.ConfigDict({"langs": meta["config"]["langs"]}))
    model = ModelConfig.from_saved(
        {**meta["config"]["model"], "vocab_size": vocab_size, "n_langs": len(langs)}
    )
    return model, langs


def source_model(config: ml_collections.ConfigDict) -> tuple[ModelConfig, list[str]]:
    """The encoder's config and languages as a run of ``config`` will have them, without reading
    parameters or text (for ahead-of-time compilation): the checkpoint's metadata, or for a random
    init ``model`` with the vocabulary of ``tokenizer.path`` or else ``tokenizer.vocab_size``."""
    if config.init_checkpoint is None:
        raise ValueError(
            "init_checkpoint is required by this config: set --config.init_checkpoint to the "
            "pretraining workdir (or '' for a random encoder sized by the config)"
        )
    if not config.init_checkpoint:
        t = config.tokenizer
        return _configured_model(
            config, Tokenizer.load(t.path).vocab_size if t.path else t.vocab_size
        )
    with Checkpointer(checkpoint_dir(config.init_checkpoint).resolve(), read_only=True) as ck:
        # any of the run's checkpoints has the model's shape (the best one is picked at run time)
        step = ck.latest_step() if config.init_step < 0 else config.init_step
        if step is None:
            raise FileNotFoundError(f"{config.init_checkpoint!r}: no checkpoint in it")
        meta = ck.restore_meta(step)
    return _saved_model(meta, Tokenizer.from_bytes(base64.b64decode(meta["tokenizer"])).vocab_size)


def with_dropout(
    model: ModelConfig, config: ml_collections.ConfigDict, prefix: str = "encoder_"
) -> ModelConfig:
    """The model with a fine-tuning's dropout settings ``{prefix}dropout``,
    ``{prefix}attention_dropout`` and ``{prefix}dropout_rng`` (negative rates, an empty rng or a
    missing setting = the pretrained model's)."""
    changes = {}
    for name in ("dropout", "attention_dropout"):
        if config.get(prefix + name, -1.0) >= 0:
            changes[name] = float(config[prefix + name])
    if config.get(prefix + "dropout_rng", ""):
        changes["dropout_rng"] = str(config[prefix + "dropout_rng"])
    return dataclasses.replace(model, **changes)


def place_params(host: Any, like: Any, what: str) -> Any:
    """Host arrays → device arrays with the shardings (and dtypes) of ``like``; the two trees must
    have the same parameters with the same shapes."""
    flat_host = traverse_util.flatten_dict(host, sep="/")
    flat_like = traverse_util.flatten_dict(like, sep="/")
    problems = [f"missing {k}" for k in sorted(set(flat_like) - set(flat_host))]
    problems += [f"unexpected {k}" for k in sorted(set(flat_host) - set(flat_like))]
    problems += [
        f"{k}: shape {tuple(np.shape(flat_host[k]))} vs {tuple(v.shape)}"
        for k, v in sorted(flat_like.items())
        if k in flat_host and tuple(np.shape(flat_host[k])) != tuple(v.shape)
    ]
    if problems:
        raise ValueError(f"{what} does not match the model:\n  " + "\n  ".join(problems[:20]))

    placed = {k: put_like(flat_host[k], v) for k, v in flat_like.items()}
    return traverse_util.unflatten_dict(placed, sep="/")


def put_like(host: Any, like: jax.Array) -> jax.Array:
    """A host array → a device array with the sharding and dtype of ``like`` (each device gets
    only its shard)."""
    h = np.asarray(host, dtype=like.dtype)
    return jax.make_array_from_callback(h.shape, like.sharding, lambda idx: h[idx])


# --- resuming: the settings a checkpoint must agree on ------------------------------------------


def _plain(x: Any) -> Any:
    """Tuples as lists, as they come back from a checkpoint's JSON."""
    return [_plain(v) for v in x] if isinstance(x, list | tuple) else x


# What a `model` entry missing from a config means: ModelConfig's default (a field added later,
# e.g. gelu_activation, share_inout_emb); missing from a checkpoint's metadata, the value the
# code that wrote it used where it differs (FIELDS_BEFORE), as `ModelConfig.from_saved` reads it.
_MODEL_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(ModelConfig)
    if f.default is not dataclasses.MISSING
}


def setting_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str], prefix: str = ""
) -> list[str]:
    """``"KEY: checkpoint A vs config B"`` for each of ``keys`` whose values differ; a group
    (a dict, e.g. ``model``) is compared entry by entry. A key one side lacks counts as None, or
    in ``model`` as ModelConfig's default (the checkpoint's side: ``FIELDS_BEFORE`` first)."""
    diffs = []
    for key in keys:
        if prefix == "model." and key in RUNTIME_FIELDS:
            continue  # how the model runs (attention kernel, remat), not what it computes
        missing = _MODEL_DEFAULTS.get(key) if prefix == "model." else None
        before = FIELDS_BEFORE.get(key, missing) if prefix == "model." else None
        a, b = saved.get(key, before), current.get(key, missing)
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            a, b = a or {}, b or {}
            diffs += setting_differences(a, b, sorted(set(a) | set(b)), f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            diffs.append(f"{prefix}{key}: checkpoint {a!r} vs config {b!r}")
    return diffs


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
