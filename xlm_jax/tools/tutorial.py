"""Settings shared by the notebooks in notebooks/: where things are, and each notebook's configs
at two sizes.

* ``tiny``: a CPU runs each notebook in well under a minute (that is how CI executes them); the
  models are far too small to be good, but every step of the real pipeline runs.
* ``colab``: the repository's own configs (``configs/*.py``) at their sizes, for a Colab GPU/TPU
  runtime (or patience on a CPU).

Every config comes from a file of ``configs/`` through ``load_config`` (as ``--config=FILE:ARG``
does), then ``tiny`` overrides sizes and lengths (as ``--config.KEY=VALUE`` does), so what a
notebook runs is what the command line runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from xlm_jax.tasks import registry

SIZES = ("tiny", "colab")
IN_COLAB = "google.colab" in sys.modules


def repo_root() -> Path:
    """The repository this package runs from (an editable install or a clone on the path)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "configs").is_dir():
        raise FileNotFoundError(
            f"{root} has no configs/: install xlm_jax from a clone of the repository "
            "(pip install -e .), as the notebooks' first cell does"
        )
    return root


def default_data_root() -> Path:
    """``$XLM_DATA`` if set, else ``../shared/data`` beside the repository (its README)."""
    return Path(os.environ.get("XLM_DATA") or repo_root().parent / "shared" / "data")


def default_work_root() -> Path:
    """Where the notebooks write their runs: ``$XLM_WORK`` if set, else ``/tmp/xlm_notebooks``."""
    return Path(os.environ.get("XLM_WORK") or "/tmp/xlm_notebooks")


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """``configs/FILE.py[:ARG]`` (relative to the repository, or absolute) with dotted
    ``overrides`` applied, as ``--config=FILE:ARG --config.KEY=VALUE`` would."""
    path, _, arg = spec.partition(":")
    file = Path(path) if Path(path).is_absolute() else repo_root() / path
    module_spec = importlib.util.spec_from_file_location(f"xlm_config_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"{file}: not a config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        if last not in node:  # a typo must not be ignored (update_from_flattened_dict would)
            raise KeyError(f"{spec}: no setting {key!r}")
        node[last] = value  # type-checked by ConfigDict, as --config.KEY=VALUE
    return config


def quiet_logs() -> None:
    """Only the runs' progress lines and real warnings: absl at WARNING, without Orbax's notes
    on the read-only checkpoint managers that loading a pretrained model opens."""
    import logging as std_logging

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    logger = logging.get_absl_logger()
    if not any(getattr(f, "xlm_jax_quiet", False) for f in logger.filters):

        def drop_orbax(record: std_logging.LogRecord) -> bool:
            return "/orbax/" not in record.pathname or record.levelno >= std_logging.ERROR

        drop_orbax.xlm_jax_quiet = True  # type: ignore[attr-defined]
        logger.addFilter(drop_orbax)


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"SIZE={size!r}: expected one of {SIZES}")
    return size


@dataclasses.dataclass(frozen=True)
class Preset:
    """A run of a notebook: a config file of ``configs/`` and its overrides, as on the command
    line (``command`` prints that command line)."""

    spec: str  # "configs/FILE.py[:ARG]"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mode: str = "pretrain"  # --mode of xlm_jax.main

    def __post_init__(self) -> None:
        if self.mode not in registry.MODES:
            raise ValueError(f"mode {self.mode!r}: one of {sorted(registry.MODES)}")

    def config(self) -> ml_collections.ConfigDict:
        return load_config(self.spec, self.overrides)

    def run(self, workdir: str | os.PathLike) -> Any:
        """Runs it as ``python -m xlm_jax.main --mode=...`` would (in this process)."""
        return registry.MODES[self.mode].run(self.config(), workdir)

    def command(self, workdir: str | os.PathLike) -> str:
        """The equivalent ``python -m xlm_jax.main`` command (run from the repository)."""
        args = ["python", "-m", "xlm_jax.main"]
        if self.mode != "pretrain":
            args.append(f"--mode={self.mode}")
        args += [f"--config={self.spec}", f"--workdir={workdir}"]
        args += [f"--config.{k}={v}" for k, v in self.overrides.items()]
        return " ".join(shlex.quote(a) for a in args)


def _tiny_encoder(vocab_size: int) -> dict[str, Any]:
    return {
        "model.emb_dim": 64,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.dropout": 0.0,
        "model.attention_dropout": 0.0,
        "model.max_positions": 128,
        "tokenizer.vocab_size": vocab_size,
        "tokenizer.n_sentences": 10_000,
        "tokenizer.character_coverage": 1.0,
    }


# --- notebook 01: MLM + TLM pretraining ---------------------------------------------------------


def pretrain(size: str, data_root: str | os.PathLike) -> Preset:
    """MLM + TLM on en/fr/de. tiny: ``configs/demo.py`` on its generated toy corpus (no data
    needed), 2 x 64, 300 steps; colab: ``configs/multi30k_mlm_tlm.py`` on Multi30k (4 x 256,
    1,200 steps)."""
    if check_size(size) == "colab":
        return Preset(
            "configs/multi30k_mlm_tlm.py", {"data.root": str(Path(data_root) / "multi30k")}
        )
    return Preset(
        "configs/demo.py",
        {
            **_tiny_encoder(600),
            "data.root": "",  # the generated toy corpus
            "batch_size": 16,
            "bptt": 32,
            "tlm_batch_size": 16,
            "tlm_length": 48,
            "eval_batch_size": 32,
            "optimizer.lr": 2e-3,
            "optimizer.warmup_steps": 30,
            "max_steps": 300,
            "log_every": 25,
            "eval_every": 150,
            "checkpoint_every": 150,
        },
    )


# --- notebook 02: XNLI zero-shot -----------------------------------------------------------------

XNLI_LANGS = "en,de,fr"  # the languages of the Multi30k-pretrained model


def xnli_pretrain(size: str, data_root: str | os.PathLike) -> Preset:
    """The encoder to fine-tune: MLM + TLM on Multi30k en/de/fr (``configs/multi30k_mlm_tlm.py``);
    tiny: 2 x 64, 200 steps, a 2,000-piece vocabulary, the first 10,000 training lines, 128
    validation lines."""
    root = {"data.root": str(Path(data_root) / "multi30k")}
    if check_size(size) == "colab":
        return Preset("configs/multi30k_mlm_tlm.py", root)
    valid = "; ".join(
        [f"{x}: val.{x}@0:128" for x in ("en", "de", "fr")]
        + [f"{a}-{b}: val.{a}@0:128|val.{b}@0:128" for a, b in (("en", "de"), ("en", "fr"))]
    )
    return Preset(
        "configs/multi30k_mlm_tlm.py",
        {
            **root,
            **_tiny_encoder(2000),
            "data.train": "en: train.en@0:10000; de: train.de@0:10000; fr: train.fr@0:10000; "
            "en-de: train.en@0:10000|train.de@0:10000; en-fr: train.en@0:10000|train.fr@0:10000",
            "data.valid": valid,
            "mlm_steps": "en,de,fr,en-de,en-fr",
            "batch_size": 16,
            "bptt": 64,
            "tlm_batch_size": 16,
            "tlm_length": 64,
            "eval_batch_size": 32,
            "optimizer.lr": 2e-3,
            "optimizer.warmup_steps": 30,
            "max_steps": 200,
            "log_every": 25,
            "eval_every": 200,
            "checkpoint_every": 200,
        },
    )


def xnli(size: str, data_root: str | os.PathLike, init_checkpoint: str | os.PathLike) -> Preset:
    """``configs/xnli.py:en,de,fr``: fine-tune on English, evaluate en/de/fr. tiny: 480 English
    training pairs, 2 epochs, 200 validation pairs per language; colab: the full protocol
    (1,990 pairs, 10 epochs, 500 per language). ``init_checkpoint=""``: a random encoder."""
    base = {"data.root": str(data_root), "init_checkpoint": str(init_checkpoint)}
    spec = f"configs/xnli.py:{XNLI_LANGS}"
    if check_size(size) == "colab":
        return Preset(spec, base, mode="xnli")
    valid = "; ".join(f"{x}: xnli/{x}.tsv@1990:2190" for x in XNLI_LANGS.split(","))
    tiny = {
        "data.train": "en: xnli/en.tsv@0:480",
        "data.valid": valid,
        "optimizer_e.lr": 1e-4,
        "optimizer_p.lr": 1e-3,
        "batch_size": 16,
        "n_epochs": 2,
        "eval_batch_size": 50,
        "eval_at_start": False,
        "max_len": 96,
        "log_every": 10,
    }
    return Preset(spec, {**base, **tiny}, mode="xnli")


# --- notebook 03: unsupervised translation -------------------------------------------------------


def unmt_pretrain(size: str, data_root: str | os.PathLike) -> Preset:
    """Stage 1: MLM on disjoint English and French halves of Multi30k
    (``configs/multi30k_mlm_tlm.py:unmt_enfr``); tiny: 2 x 64, 100 steps, 5,000 lines of each
    half."""
    root = {"data.root": str(Path(data_root) / "multi30k")}
    spec = "configs/multi30k_mlm_tlm.py:unmt_enfr"
    if check_size(size) == "colab":
        return Preset(spec, root)
    return Preset(
        spec,
        {
            **root,
            **_tiny_encoder(1000),
            "data.train": "en: train.en@0:5000; fr: train.fr@14500:19500",  # still disjoint
            "data.valid": "en: val.en@0:64; fr: val.fr@507:571",
            "batch_size": 16,
            "bptt": 64,
            "eval_batch_size": 32,
            "optimizer.lr": 2e-3,
            "optimizer.warmup_steps": 30,
            "max_steps": 100,
            "log_every": 25,
            "eval_every": 100,
            "checkpoint_every": 100,
        },
    )


def unmt(size: str, data_root: str | os.PathLike, init_checkpoint: str | os.PathLike) -> Preset:
    """Stage 2: denoising auto-encoding + online back-translation from the stage-1 MLM
    (``configs/multi30k_unmt_enfr.py``); tiny: 40 steps on 2,000 sentences per language,
    greedy BLEU on 32 validation pairs every 20 steps."""
    base = {"data.root": str(Path(data_root) / "multi30k"), "init_checkpoint": str(init_checkpoint)}
    spec = "configs/multi30k_unmt_enfr.py"
    if check_size(size) == "colab":
        return Preset(spec, base, mode="nmt")
    tiny = {
        "data.train": "en: train.en@0:2000; fr: train.fr@14500:16500",
        "data.valid": "en-fr: val.en@0:32|val.fr@0:32",
        "data.test": "",
        "batch_size": 16,
        "length_buckets": "48",
        "eval_batch_size": 32,
        "eval_max_len": "1.2,4",
        "bt_max_len": "1.2,4",
        "optimizer.lr": 5e-4,
        "optimizer.warmup_steps": 10,
        "max_steps": 40,
        "log_every": 10,
        "eval_every": 20,
        "checkpoint_every": 40,
    }
    return Preset(spec, {**base, **tiny}, mode="nmt")


# --- notebook 04: a released XLM model -----------------------------------------------------------

# facebookresearch/XLM's README links (the paper's XNLI-15 model, MLM + TLM, 12 x 1024).
XLM15_URL = "https://dl.fbaipublicfiles.com/XLM/mlm_tlm_xnli15_1024.pth"
XLM15_CODES_URL = "https://dl.fbaipublicfiles.com/XLM/codes_xnli_15"


def learn_bpe(word_counts: Mapping[str, int], n_merges: int) -> list[tuple[str, str, int]]:
    """fastBPE's ``learnbpe`` on {word: count}: words as characters (the last marked ``</w>``),
    then ``n_merges`` times the most frequent adjacent pair (ties: the smallest pair) is merged
    everywhere. Returns the codes ``(left, right, count)`` in merge order."""
    from xlm_jax.text.xlm_bpe import END_OF_WORD, merge_pair

    words = {w: [*w[:-1], w[-1] + END_OF_WORD] for w in word_counts if w}
    codes: list[tuple[str, str, int]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + word_counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        codes.append((*best, pairs[best]))
        for w, symbols in words.items():
            words[w] = merge_pair(symbols, best)
    return codes


def write_standin_xlm(
    directory: str | os.PathLike,
    *,
    langs: tuple[str, ...] = ("de", "en", "fr"),
    n_sentences: int = 2000,
    n_merges: int = 400,
    emb_dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seed: int = 0,
) -> tuple[Path, Path]:
    """An offline stand-in for a released XLM model: a checkpoint in XLM's own ``.pth`` layout
    (``model`` state dict, ``params``, ``dico_*``) and its fastBPE codes file, with **random
    weights**. Its vocabulary is learned (``learn_bpe``) on the toy corpus after XLM's
    preprocessing (Moses, lowercase and accents removed, as the XNLI-15 model). Requires torch.
    Returns ``(model.pth, codes)``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from xlm_jax.data.toy import generate_toy_sentences
    from xlm_jax.model.encoder import ModelConfig, XLMEncoder
    from xlm_jax.text.tokenizer import SPECIAL_PIECES
    from xlm_jax.text.xlm_bpe import FastBPE, MosesPipeline
    from xlm_jax.tools.convert import xlm_from_params

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = generate_toy_sentences(n_sentences, seed)
    counts: dict[str, int] = {}
    for lang in langs:
        pipeline = MosesPipeline(lang, lowercase=True, romanian=False)
        for line in text[lang]:
            for word in pipeline(line):
                counts[word] = counts.get(word, 0) + 1
    codes = learn_bpe(counts, n_merges)
    bpe = FastBPE(codes)
    sub_counts: dict[str, int] = {}
    for word, n in counts.items():
        for sub in bpe(word):
            sub_counts[sub] = sub_counts.get(sub, 0) + n
    vocab = sorted(sub_counts, key=lambda w: (-sub_counts[w], w))  # XLM: by frequency
    words = [*SPECIAL_PIECES, *vocab]

    cfg = ModelConfig(
        vocab_size=len(words),
        n_langs=len(langs),
        emb_dim=emb_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        max_positions=256,
    )
    dummy = jnp.zeros((1, 4), jnp.int32)
    # one compiled init (op by op, each of its ~80 operations would compile on its own)
    boxed = jax.jit(XLMEncoder(cfg).init)(jax.random.key(seed), dummy, dummy, dummy)["params"]
    params = nn.meta.unbox(boxed)  # plain arrays (the logical axis names are not needed here)
    state = {
        f"module.{k}": torch.from_numpy(np.array(v))
        for k, v in xlm_from_params(params, cfg).items()
    }
    state["module.pred_layer.proj.weight"] = state["module.embeddings.weight"]  # tied, as XLM
    lang2id = {lang: i for i, lang in enumerate(langs)}
    checkpoint = {
        "model": state,
        "params": {  # the XLM training flags the importer reads (as XLM pickles its argparse)
            "emb_dim": emb_dim,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "gelu_activation": True,
            "sinusoidal_embeddings": False,
            "use_lang_emb": True,
            "share_inout_emb": True,
            "asm": False,
            "n_langs": len(langs),
            "langs": list(langs),
            "lang2id": lang2id,
            "id2lang": {i: lang for lang, i in lang2id.items()},
            "n_words": len(words),
            "max_vocab": -1,
        },
        "dico_id2word": dict(enumerate(words)),
        "dico_word2id": {w: i for i, w in enumerate(words)},
        "dico_counts": {w: sub_counts.get(w, 0) for w in words},
    }
    pth, codes_path = directory / "standin_xlm.pth", directory / "codes_standin"
    torch.save(checkpoint, pth)
    codes_path.write_text("".join(f"{a} {b} {c}\n" for a, b, c in codes), encoding="utf-8")
    return pth, codes_path
