"""XNLI: zero-shot cross-lingual classification, and a Tatoeba sentence-retrieval probe.

The paper's protocol (Lample & Conneau 2019, §5.1): fine-tune the pretrained encoder and a linear
head on English NLI pairs, then classify pairs in the 14 other XNLI languages with no labels in
those languages. As XLM's ``src/evaluation/xnli.py``:

* a pair is one row ``</s> premise </s> hypothesis </s>`` (the two sentences share their middle
  ``</s>``), positions 0..n-1 over the whole row, one language id for every token; each sentence
  (with its two ``</s>``) is first cut to ``max_len`` tokens, its last one set back to ``</s>``;
* the classifier reads the last layer at position 0 (``model/classifier.py``);
* the encoder and the head have their own Adam (``optimizer_e`` / ``optimizer_p``), constant
  learning rates, every encoder layer fine-tuned, the encoder's own dropout active;
* an epoch is a fresh shuffle of the training pairs, cut at ``epoch_size`` pairs;
* after every epoch, accuracy on the validation pairs of every language.

Here, additionally: rows are padded to one fixed length so each step compiles once; the model is
selected by the English validation accuracy (no target-language labels), and the epoch the
language average would pick is reported beside it; every epoch is checkpointed with the loop's
state so a run resumes; translate-train (training files in several languages) and translate-test
(target-language sets translated to English) run when their files are configured.

Entry points: ``finetune`` (``--mode=xnli``), ``run_sweep`` (``--mode=xnli_sweep``: a learning
rate × batch size grid), ``retrieval`` (``--mode=retrieval``: Tatoeba nearest-neighbour
accuracy of mean-pooled sentence vectors). Settings and their defaults: ``default_config`` and
``retrieval_default_config``.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import functools
import io
import json
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from xlm_jax import objectives, parallel, train
from xlm_jax.checkpoint import Checkpointer
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.data import presets, sources
from xlm_jax.data.sources import DataError
from xlm_jax.files import write_atomic
from xlm_jax.metrics import MetricWriter
from xlm_jax.model.classifier import XNLIClassifier
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.tokenizer import EOS_ID, PAD_ID, Tokenizer, load_or_train

# XLM's label ids (src/evaluation/xnli.py: label2id).
LABELS = ("contradiction", "neutral", "entailment")
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}
# The paper's column order (Table 1): en fr es de el bg ru tr ar vi th zh hi sw ur.
PAPER_LANGS: tuple[str, ...] = presets.XNLI15
XNLI_DEV_TRAIN_ROWS = 1990  # ../shared/data protocol: en rows 0..1989 train, 1990.. validate
# The pretraining presets train on the first 80% of each Tatoeba file (lines 0..799 of the
# 1,000-line ones): the retrieval probe reads the rest.
TATOEBA_HELD_OUT = f"{presets.TRAIN_SHARE}%"

Batch = dict[str, np.ndarray]


class Example(NamedTuple):
    premise: str
    hypothesis: str
    label: int  # index into LABELS


# --- settings ------------------------------------------------------------------------------------


def _encoder_settings(c: ml_collections.ConfigDict) -> None:
    """Where the encoder comes from; shared by fine-tuning and the retrieval probe."""
    c.seed = 0
    # A pretraining workdir (or its checkpoints/ folder): its tokenizer, languages and model come
    # from the checkpoint's metadata. "" = a randomly initialised encoder (a baseline), sized by
    # `model` below, with the languages `langs` and the tokenizer `tokenizer.path` (or one trained
    # on the task's own training text).
    c.init_checkpoint = ""
    c.init_step = -1  # -1 = the pretraining run's best checkpoint if it tracked one, else latest
    c.langs = ",".join(PAPER_LANGS)  # random baseline only
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
    c.model.max_positions = 512
    c.model.sinusoidal_embeddings = False
    c.model.use_lang_emb = True
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # relative sources resolve here
    c.data.tfds_data_dir = ""  # for tfds: sources ("" = TFDS's default); never downloaded
    c.data.max_chars = 10_000
    c.data.on_invalid_utf8 = "error"

    # Sentences are cut to max_len tokens (with their </s>), as XLM's --max_len; rows are padded
    # to seq_len (0 = the longest row in the data, rounded up to a multiple of 8) so every step
    # has one shape. A pair longer than seq_len loses tokens from its longer sentence.
    c.max_len = 256
    c.seq_len = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor)
    c.mesh.rules = parallel.DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
    """Every fine-tuning setting; defaults are XLM's XNLI recipe (README command of
    facebookresearch/XLM, and glue-xnli.py's flag defaults where the command sets nothing)."""
    c = ml_collections.ConfigDict()
    _encoder_settings(c)
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

    c.sweep = ml_collections.ConfigDict()  # --mode=xnli_sweep: every (lr, batch size) pair
    c.sweep.lrs = "5e-6,2.5e-5,1.25e-4"  # sets optimizer_e.lr and optimizer_p.lr
    c.sweep.batch_sizes = "4,8"
    return c


def retrieval_default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    _encoder_settings(c)
    # Pairs "XX-en: SRC_SPEC|EN_SPEC; ...": line-aligned translations; each XX sentence
    # retrieves among all English ones (and the reverse) by the cosine similarity of mean-pooled
    # last-layer states.
    c.data.pairs = ""
    c.batch_size = 64
    return c


def xnli_dev_sources(
    langs: Sequence[str] = PAPER_LANGS,
    directory: str = "xnli",
    n_train: int = XNLI_DEV_TRAIN_ROWS,
    train_langs: Sequence[str] = ("en",),
) -> tuple[str, str]:
    """(train, valid) source strings for the XNLI dev files laid out as in ../shared/data.

    Rows 0..n_train-1 of each training language's file fine-tune (the protocol: English only),
    rows n_train.. of every language validate. Since the files are row-parallel, translate-train
    on the same rows is ``train_langs=('en', 'fr', ...)`` (human translations, an upper bound).
    """
    train = "; ".join(f"{lang}: {directory}/{lang}.tsv@0:{n_train}" for lang in train_langs)
    valid = "; ".join(f"{lang}: {directory}/{lang}.tsv@{n_train}:" for lang in langs)
    return train, valid


def tatoeba_pair_sources(
    langs: Sequence[str] = PAPER_LANGS[1:], start: int | str = TATOEBA_HELD_OUT
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


# --- reading -------------------------------------------------------------------------------------


def _read_kw(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(
        max_chars=config.data.max_chars,
        on_invalid_utf8=config.data.on_invalid_utf8,
        data_dir=config.data.tfds_data_dir or None,
    )


def read_xnli_tsv(
    path: str | os.PathLike,
    rows: slice | None = None,
    *,
    root: str | os.PathLike = "",
    **read_kw: Any,
) -> list[Example]:
    """Reads ``premise<TAB>hypothesis<TAB>label`` lines (XTREME's XNLI format, no header).

    ``path`` may carry a line range (``xnli/en.tsv@0:1990``), or ``rows`` gives one. Labels are
    ``entailment`` / ``neutral`` / ``contradiction``. Any malformed line raises ``DataError`` naming
    the file and its 1-based line.
    """
    spec = sources.parse_spec(os.fspath(path))
    if spec.kind != "file":
        raise DataError(f"{path}: read_xnli_tsv reads files; use read_nli for tfds: sources")
    if rows is not None:
        if spec.start is not None or spec.end is not None:
            raise DataError(f"{path}: give either a @START:END range or rows, not both")
        if rows.step not in (None, 1) or any(
            x is not None and x < 0 for x in (rows.start, rows.stop)
        ):
            raise DataError(f"{path}: rows {rows} must be a contiguous, non-negative slice")
        spec = dataclasses.replace(spec, start=rows.start, end=rows.stop)
    lines = sources.read_lines(spec, root, **read_kw)
    file = Path(spec.path).expanduser()
    file = file if file.is_absolute() else Path(root) / file
    first = _first_line(spec, root)
    out = []
    for i, line in enumerate(lines):
        where = f"{file}:{first + i + 1}"
        cols = line.split("\t")
        if len(cols) != 3:
            raise DataError(
                f"{where}: {len(cols)} tab-separated column(s); expected 3: "
                "premise<TAB>hypothesis<TAB>label"
            )
        premise, hypothesis, label = (col.strip() for col in cols)
        if label not in LABEL_IDS:
            hint = " (a header line? the format has none)" if label.lower() == "label" else ""
            raise DataError(
                f"{where}: unknown label {label!r}{hint}; expected one of {', '.join(LABELS)}"
            )
        for name, text in (("premise", premise), ("hypothesis", hypothesis)):
            if not text:
                raise DataError(f"{where}: empty {name}; expected text")
        out.append(Example(premise, hypothesis, LABEL_IDS[label]))
    return out


def _first_line(spec: sources.Spec, root: str | os.PathLike) -> int:
    """The 0-based index of the first line a file spec selects (resolving "80%" bounds)."""
    if spec.start is None:
        return 0
    if isinstance(spec.start, int):
        return spec.start
    n = sources.line_count(dataclasses.replace(spec, start=None, end=None), root)
    return n * int(spec.start[:-1]) // 100


def _text(value: Any, where: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 ({e.reason})") from None
    return str(value)


def read_tfds_nli(spec: str | sources.Spec, *, data_dir: str | os.PathLike | None = None):
    """Pairs from a prepared TFDS NLI dataset: ``tfds:multi_nli:SPLIT:en[@A:B]`` (English
    MultiNLI) or ``tfds:xnli:SPLIT:LANG[@A:B]``. Never downloads: an unprepared dataset is an
    immediate ``DataError`` with the command that prepares it.
    """
    s = sources.parse_spec(spec) if isinstance(spec, str) else spec
    base = s.name.partition("/")[0]
    if s.kind != "tfds" or base not in ("multi_nli", "xnli"):
        raise DataError(f"{s}: expected tfds:multi_nli:SPLIT:en or tfds:xnli:SPLIT:LANG")
    if base == "multi_nli" and s.field != "en":
        raise DataError(f"{s}: MultiNLI is English; expected tfds:multi_nli:{s.split}:en")
    # The project's TFDS plumbing: builder lookup without download, prepared check, split check.
    builder = sources._prepared_builder(s, data_dir=data_dir, manual_dir=None)
    n = builder.info.splits[s.split].num_examples
    start, end = sources._bounds(s, n, str(s), "examples")
    fmt = builder.info.file_format.value if builder.info.file_format else "tfrecord"
    if fmt not in ("array_record", "parquet"):
        raise DataError(
            f"{s}: stored as {fmt}, which needs TensorFlow to read; re-prepare it with "
            "--file_format=array_record"
        )
    label_names = builder.info.features["label"].names
    examples = builder.as_data_source(split=s.split).__getitems__(range(start, end))
    out = []
    for i, ex in zip(range(start, end), examples, strict=True):
        where = f"{s} example {i}"
        if base == "multi_nli":
            premise, hypothesis = _text(ex["premise"], where), _text(ex["hypothesis"], where)
        else:
            premise = _text(ex["premise"][s.field], where)
            hyp = ex["hypothesis"]
            langs = [_text(x, where) for x in hyp["language"]]
            if s.field not in langs:
                raise DataError(f"{where}: no hypothesis in {s.field!r} (has {langs})")
            hypothesis = _text(hyp["translation"][langs.index(s.field)], where)
        label = int(ex["label"])
        if not 0 <= label < len(label_names) or label_names[label] not in LABEL_IDS:
            raise DataError(f"{where}: label {label}; expected one of {label_names}")
        if not premise.strip() or not hypothesis.strip():
            raise DataError(f"{where}: empty premise or hypothesis")
        out.append(Example(premise.strip(), hypothesis.strip(), LABEL_IDS[label_names[label]]))
    return out


def read_nli(spec: str, root: str | os.PathLike = "", **read_kw: Any) -> list[Example]:
    """One NLI source: a TSV file (with an optional line range) or a tfds: spec."""
    s = sources.parse_spec(spec)
    if s.kind == "tfds":
        return read_tfds_nli(s, data_dir=read_kw.get("data_dir"))
    return read_xnli_tsv(spec, root=root, **read_kw)


def read_sets(text: str, where: str, *, root: str, **read_kw: Any) -> dict[str, list[Example]]:
    """``"en: a.tsv@0:10, b.tsv; fr: c.tsv"`` → {language: examples}, sources concatenated."""
    out = {}
    for lang, specs in corpus_lib.parse_sources(text, where).items():
        items = [x.strip() for x in specs.split(",") if x.strip()]
        if not lang.isalnum():
            raise DataError(f"{where}: {lang!r} is not a language code (expected e.g. 'en')")
        out[lang] = [ex for item in items for ex in read_nli(item, root, **read_kw)]
    return out


def check_three_classes(examples: Sequence[Example], where: str) -> None:
    present = {ex.label for ex in examples}
    if present != set(range(len(LABELS))):
        raise DataError(
            f"{where}: the training set has only the labels "
            f"{', '.join(LABELS[i] for i in sorted(present))}; expected all of {', '.join(LABELS)}"
        )


# --- rows and batches ----------------------------------------------------------------------------


def _cut(ids: np.ndarray, max_len: int) -> int:
    """Tokens kept of a sentence framed ``</s> ids </s>`` and cut to max_len (XLM's truncate)."""
    return min(len(ids), max_len - 2)


def pair_length(premise: np.ndarray, hypothesis: np.ndarray, max_len: int) -> int:
    return _cut(premise, max_len) + _cut(hypothesis, max_len) + 3


def pack_pair(
    premise: np.ndarray, hypothesis: np.ndarray, lang_id: int, *, max_len: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``</s> premise </s> hypothesis </s>`` padded to ``length`` (XLM's concat_batches with
    reset_positions=False): positions 0..n-1 over the row, ``lang_id`` everywhere.

    Each sentence first keeps at most ``max_len - 2`` tokens (XLM's truncate); a row still longer
    than ``length`` loses tokens from its longer sentence, one at a time.
    """
    n1, n2 = _cut(premise, max_len), _cut(hypothesis, max_len)
    excess = n1 + n2 + 3 - length
    if excess > 0:  # the longer sentence shrinks to the other's length, then both alternately
        first = min(excess, abs(n1 - n2))
        n1, n2 = (n1 - first, n2) if n1 >= n2 else (n1, n2 - first)
        rest = excess - first
        n1, n2 = n1 - (rest + 1) // 2, n2 - rest // 2
        if min(n1, n2) < 0:
            raise ValueError(f"length={length} cannot hold a pair row (at least 3 tokens)")
    n = n1 + n2 + 3
    tokens = np.full(length, PAD_ID, np.int32)
    tokens[:n] = np.concatenate([[EOS_ID], premise[:n1], [EOS_ID], hypothesis[:n2], [EOS_ID]])
    positions = np.zeros(length, np.int32)
    positions[:n] = np.arange(n)
    return tokens, positions, np.full(length, lang_id, np.int32)


def pack_sentence(
    ids: np.ndarray, lang_id: int, *, max_len: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``</s> sentence </s>`` padded to ``length`` (for sentence embeddings)."""
    n1 = min(_cut(ids, max_len), length - 2)
    tokens = np.full(length, PAD_ID, np.int32)
    tokens[: n1 + 2] = np.concatenate([[EOS_ID], ids[:n1], [EOS_ID]])
    positions = np.zeros(length, np.int32)
    positions[: n1 + 2] = np.arange(n1 + 2)
    return tokens, positions, np.full(length, lang_id, np.int32)


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


@dataclasses.dataclass
class Rows:
    """Encoded rows of one set: ``(n, length)`` tokens/positions/langs and ``(n,)`` labels."""

    tokens: np.ndarray
    positions: np.ndarray
    langs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        return Rows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in FIELDS))

    def batch(self, index: np.ndarray, batch_size: int) -> Batch:
        """Rows ``index`` (fewer than batch_size: the rest all-pad rows with weight 0)."""
        n, length = len(index), self.tokens.shape[1]
        pad = batch_size - n
        tokens = np.concatenate([self.tokens[index], np.full((pad, length), PAD_ID, np.int32)])
        zeros = np.zeros((pad, length), np.int32)
        return {
            "tokens": tokens,
            "positions": np.concatenate([self.positions[index], zeros]),
            "langs": np.concatenate([self.langs[index], zeros]),
            # (batch, 1): the same (batch, length) sharding as the token arrays
            "labels": np.concatenate([self.labels[index], np.zeros(pad, np.int32)])[:, None],
            "weights": (np.arange(batch_size) < n).astype(np.float32)[:, None],
        }


FIELDS = dataclasses.fields(Rows)


def tokenize_pairs(
    examples: Sequence[Example], tokenizer: Tokenizer
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    premises = tokenizer.encode_many([ex.premise for ex in examples])
    return premises, tokenizer.encode_many([ex.hypothesis for ex in examples])


def pack_rows(
    premises: Sequence[np.ndarray],
    hypotheses: Sequence[np.ndarray],
    examples: Sequence[Example],
    lang_id: int,
    *,
    max_len: int,
    length: int,
) -> Rows:
    packed = [
        pack_pair(p, h, lang_id, max_len=max_len, length=length)
        for p, h in zip(premises, hypotheses, strict=True)
    ]
    return Rows(
        *(np.stack([r[k] for r in packed]) for k in range(3)),
        labels=np.array([ex.label for ex in examples], np.int32),
    )


def encode_pairs(
    examples: Sequence[Example], tokenizer: Tokenizer, lang_id: int, *, max_len: int, length: int
) -> Rows:
    """Examples → packed rows of ``length`` tokens (``pack_pair``)."""
    return pack_rows(
        *tokenize_pairs(examples, tokenizer), examples, lang_id, max_len=max_len, length=length
    )


def epoch_order(n: int, epoch: int, seed: int, epoch_size: int) -> np.ndarray:
    """The training rows of ``epoch``: a fresh permutation (a function of seed and epoch), cut at
    ``epoch_size`` (-1 = all), as XLM's new shuffled iterator per epoch."""
    rng = np.random.default_rng([seed, zlib.crc32(b"xnli-train"), epoch])
    order = rng.permutation(n)
    return order if epoch_size < 0 else order[: min(epoch_size, n)]


def eval_batches(rows: Rows, batch_size: int) -> list[Batch]:
    """Every row once, in order; the last batch topped up with all-pad rows of weight 0."""
    return [
        rows.batch(np.arange(i, min(i + batch_size, len(rows))), batch_size)
        for i in range(0, len(rows), batch_size)
    ]


# --- the encoder's source: a pretraining checkpoint or a random init ---------------------------


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


def load_pretrained(path: str | os.PathLike, step: int = -1) -> EncoderSource:
    """Tokenizer, model config, languages and encoder parameters (host numpy) of a pretraining run.

    ``step=-1`` picks the run's best checkpoint by its own ``best_metric`` when it tracked one,
    else its latest.
    """
    directory = checkpoint_dir(path).resolve()
    with Checkpointer(directory, async_save=False) as probe:
        latest = probe.latest_step()
        if latest is None:
            raise FileNotFoundError(f"init_checkpoint {os.fspath(path)!r}: no checkpoint in it")
        pre = probe.restore_meta(latest)["config"]
    chosen = f"step {step} as configured"
    if step < 0:
        best_metric = pre.get("best_metric") or None
        with Checkpointer(
            directory,
            best_metric=best_metric,
            best_mode=pre.get("best_mode", "min"),
            async_save=False,
        ) as ck:
            best = ck.best_step()
        step, chosen = (best, f"best by {best_metric}") if best is not None else (latest, "latest")
    with Checkpointer(directory, async_save=False) as ck:
        if step not in ck.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint {step} (has {ck.all_steps()})")
        meta = ck.restore_meta(step)
        state = ck.restore_numpy(step)
    tokenizer = Tokenizer.from_bytes(base64.b64decode(meta["tokenizer"]))
    langs = train.lang_list(ml_collections.ConfigDict({"langs": meta["config"]["langs"]}))
    model = ModelConfig.from_dict(
        {**meta["config"]["model"], "vocab_size": tokenizer.vocab_size, "n_langs": len(langs)}
    )
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
    texts_fn: Callable[[], Mapping[str, Sequence[str]]],
) -> EncoderSource:
    """The baseline: a fresh encoder sized by ``config.model``, tokenizer from ``tokenizer.path``
    or trained on ``texts_fn()`` into the workdir."""
    t = config.tokenizer
    if t.path:
        tokenizer = Tokenizer.load(t.path)
    else:
        tokenizer = load_or_train(
            workdir / "tokenizer.model",
            texts_fn,
            vocab_size=t.vocab_size,
            alpha=t.alpha,
            n_sentences=t.n_sentences,
            seed=config.seed,
            character_coverage=t.character_coverage,
        )
    langs = train.lang_list(config)
    corpus_lib.check_langs(langs)
    model = ModelConfig.from_dict(
        {**config.model.to_dict(), "vocab_size": tokenizer.vocab_size, "n_langs": len(langs)}
    )
    return EncoderSource(tokenizer, model, langs, None, {})


def with_dropout(model: ModelConfig, config: ml_collections.ConfigDict) -> ModelConfig:
    changes = {}
    if config.get("encoder_dropout", -1.0) >= 0:
        changes["dropout"] = float(config.encoder_dropout)
    if config.get("encoder_attention_dropout", -1.0) >= 0:
        changes["attention_dropout"] = float(config.encoder_attention_dropout)
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

    def put(h, ref):
        h = np.asarray(h, dtype=ref.dtype)
        return jax.make_array_from_callback(h.shape, ref.sharding, lambda idx: h[idx])

    placed = {k: put(flat_host[k], v) for k, v in flat_like.items()}
    return traverse_util.unflatten_dict(placed, sep="/")


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


def train_step(state: train.TrainState, batch, rng, *, model, tx, mesh, batch_axes):
    """One update on the mean cross-entropy of the batch's real rows (weight 1).

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
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["n_pred"], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sums["grad_norm"] = optax.tree.norm(grads)
    return train.TrainState(step=state.step + 1, params=params, opt_state=opt_state), sums


def predict(params, batch, *, model) -> jax.Array:
    logits = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["langs"], deterministic=True
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def mean_pooled(params, batch, *, model: XLMEncoder) -> jax.Array:
    """Mean of the last layer over each row's non-pad tokens, float32 ``(batch, emb_dim)``."""
    hidden = model.apply(
        {"params": params},
        batch["tokens"],
        batch["positions"],
        batch["langs"],
        deterministic=True,
        method=XLMEncoder.encode,
    ).astype(jnp.float32)
    valid = (batch["tokens"] != PAD_ID).astype(jnp.float32)[..., None]
    return (hidden * valid).sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1.0)


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
    outs = [predict_fn(params, runner.put(b)) for b in eval_batches(rows, batch_size)]
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
) -> dict[str, Any]:
    """Fine-tunes and evaluates as ``config`` says, resuming from ``workdir`` if it holds a
    checkpoint. Writes ``results.{json,csv,md,png}`` and returns the results dict (``history``:
    one record per evaluated epoch; ``selected``: the epochs picked by ``select_lang`` and by the
    average; ``compiled_programs``).
    """
    _check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_primary = jax.process_index() == 0
    runner = Runner(
        config, {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}
    )

    # Text first: a bad file fails in seconds, before any checkpoint is read.
    root, kw = config.data.root, _read_kw(config)
    train_sets = read_sets(config.data.train, "data.train", root=root, **kw)
    for lang, examples in train_sets.items():
        check_three_classes(examples, f"data.train {lang}")
    eval_text = {
        split: read_sets(config.data[split], f"data.{split}", root=root, **kw)
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
    latest = ckpt.latest_step()
    if latest is not None:
        saved = ckpt.restore_meta(latest)
        if saved["config"]["init_checkpoint"] != config.init_checkpoint:
            raise ValueError(
                f"{workdir} holds a fine-tuning of {saved['config']['init_checkpoint']!r}, not of "
                f"{config.init_checkpoint!r}; use another workdir"
            )
        source = EncoderSource(
            Tokenizer.from_bytes(base64.b64decode(saved["tokenizer"])),
            ModelConfig.from_dict(saved["model"]),
            list(saved["langs"]),
            None,
            saved["init"],
        )
    elif config.init_checkpoint:
        source = load_pretrained(config.init_checkpoint, config.init_step)
        source.model = with_dropout(source.model, config)
    else:
        source = random_source(
            config,
            workdir,
            lambda: {
                lang: [s for ex in exs for s in (ex.premise, ex.hypothesis)]
                for lang, exs in train_sets.items()
            },
        )
        source.model = with_dropout(source.model, config)
    tokenizer, mcfg = source.tokenizer, source.model

    # Rows: one padded length for every set, so each step compiles once.
    train_tok = {lang: tokenize_pairs(exs, tokenizer) for lang, exs in train_sets.items()}
    eval_tok = {
        split: {lang: tokenize_pairs(exs, tokenizer) for lang, exs in by_lang.items()}
        for split, by_lang in eval_text.items()
    }
    pair_lengths = [
        pair_length(p, h, config.max_len)
        for tok in [*train_tok.values(), *(t for by in eval_tok.values() for t in by.values())]
        for p, h in zip(tok[0], tok[1], strict=True)
    ]
    length = row_length(max(pair_lengths), config, mcfg)
    n_cut = sum(n > length for n in pair_lengths)
    if n_cut:
        logging.warning(
            "%d pairs are longer than seq_len=%d: their longer sentence is cut", n_cut, length
        )
    pack = functools.partial(pack_rows, max_len=config.max_len, length=length)
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
    batch_axes = parallel.mesh_axes_of("batch", runner.rules)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, mesh=runner.mesh, batch_axes=batch_axes),
        in_shardings=(shardings, runner.batch_sharding, runner.replicated),
        out_shardings=(shardings, runner.replicated),
        donate_argnums=0,
    )
    predict_fn = jax.jit(
        functools.partial(predict, model=model),
        in_shardings=(shardings.params, runner.batch_sharding),
        out_shardings=runner.replicated,
    )

    loop: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "bad_epochs": 0,
        "stopped": False,
        "history": [],
    }
    if latest is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        state, loop, _ = ckpt.restore(latest, abstract_state=abstract)
        logging.info("resumed after epoch %d (%d updates)", loop["epoch"], loop["step"])
    elif source.params is not None:
        encoder = place_params(source.params, state.params["encoder"], source.description)
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
    n_epoch_rows = len(epoch_order(len(train_rows), 0, config.seed, config.epoch_size))
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

    base_rng = jax.random.key(config.seed)
    with runner.context():
        while loop["epoch"] < config.n_epochs and not loop["stopped"]:
            epoch = loop["epoch"] + 1
            order = epoch_order(len(train_rows), epoch, config.seed, config.epoch_size)
            window, totals = [], []
            for i in range(0, len(order), config.batch_size):
                batch = train_rows.batch(order[i : i + config.batch_size], config.batch_size)
                state, sums = step_fn(
                    state, runner.put(batch), jax.random.fold_in(base_rng, loop["step"])
                )
                loop["step"] += 1
                window.append(sums)
                if loop["step"] % config.log_every == 0:
                    totals += _log_window(writer, loop["step"], window, batch_tokens=batch)
                    window = []
            totals += _log_window(writer, loop["step"], window, batch_tokens=None)
            record = evaluate(epoch)
            n = sum(t["n_pred"] for t in totals)
            record["train/loss"] = sum(t["loss_sum"] for t in totals) / max(n, 1.0)
            record["train/acc"] = 100.0 * sum(t["n_correct"] for t in totals) / max(n, 1.0)
            best = select(loop["history"], best_metric)
            improved = best is None or record[best_metric] > best[best_metric]
            loop["bad_epochs"] = 0 if improved else loop["bad_epochs"] + 1
            loop["history"].append(record)
            loop["epoch"] = epoch
            if config.patience > 0 and loop["bad_epochs"] >= config.patience:
                logging.info(
                    "stopping: %s did not improve for %d epochs", best_metric, config.patience
                )
                loop["stopped"] = True
            ckpt.save(
                epoch,
                state,
                data_state=loop,
                meta=meta,
                metrics={k: v for k, v in record.items() if isinstance(v, float)},
                force=True,
            )
            if on_epoch is not None:
                on_epoch(epoch, state)
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
        write_results(workdir, results)
    return results


def _mode(train_sets: Mapping[str, Any]) -> str:
    langs = list(train_sets)
    return "zero-shot" if len(langs) == 1 else f"translate-train ({','.join(langs)})"


def _log_window(writer: MetricWriter, step: int, window: list, batch_tokens) -> list[dict]:
    """Fetches a window of step sums (the loop's only regular host sync) and logs it."""
    if not window:
        return []
    got = [{k: float(v) for k, v in s.items()} for s in jax.device_get(window)]
    n = sum(s["n_pred"] for s in got)
    scalars = {
        "xnli/loss": sum(s["loss_sum"] for s in got) / max(n, 1.0),
        "xnli/acc": 100.0 * sum(s["n_correct"] for s in got) / max(n, 1.0),
        "xnli/grad_norm": float(np.mean([s["grad_norm"] for s in got])),
    }
    if batch_tokens is not None:
        n_tok = int(np.count_nonzero(batch_tokens["tokens"] != PAD_ID)) * len(got)
        writer.progress(step, scalars, tokens=n_tok)
    writer.write(step, scalars, prefix="train/")
    return got


# --- results -------------------------------------------------------------------------------------


def ordered_langs(langs: Sequence[str]) -> list[str]:
    """Languages in the paper's column order, any others after them in their given order."""
    return [lang for lang in PAPER_LANGS if lang in langs] + [
        lang for lang in langs if lang not in PAPER_LANGS
    ]


def _langs_of(record: Mapping[str, Any], split: str) -> list[str]:
    return [
        k.split("/")[1]
        for k in record
        if k.startswith(f"{split}/") and k.endswith("/acc") and k.split("/")[1] != "avg"
    ]


def result_rows(results: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Table 1-style rows: per split and selection, the selected epoch's accuracy per language."""
    history = results["history"]
    if not history:
        return ["row", "epoch"], []
    langs = ordered_langs(
        list(dict.fromkeys(lang for h in history for s in SPLITS for lang in _langs_of(h, s)))
    )
    columns = ["row", "epoch", *langs, "avg"]
    rows = []
    untrained = [h for h in history if h["epoch"] == 0]
    for split in SPLITS:
        if not any(f"{split}/avg/acc" in h for h in history):
            continue
        picks = [
            (f"selected by {by} valid", results["selected"].get(by)) for by in results["selected"]
        ]
        if untrained:
            picks.append(("untrained head", untrained[0]))
        for label, record in picks:
            if record is None:
                continue
            row = {"row": f"{split}, {label}", "epoch": record["epoch"]}
            for lang in [*langs, "avg"]:
                value = record.get(f"{split}/{lang}/acc")
                row[lang] = None if value is None else round(value, 2)
            rows.append(row)
    return columns, rows


SPLITS = ("valid", "test", "translate_test")


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buf.getvalue().encode()


def _markdown(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    def cell(v):
        if v is None:
            return ""
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(workdir: Path, results: Mapping[str, Any]) -> None:
    """``results.json`` (everything), ``results.csv`` / ``results.md`` (the table),
    ``results.png`` (per-language validation accuracy at the selected epoch)."""
    columns, rows = result_rows(results)
    write_atomic(workdir / "results.csv", _csv(columns, rows))
    head = (
        f"# XNLI {results['mode']}\n\n"
        f"Encoder: {results['init']}. Fine-tuned on {results['n_train']} pairs "
        f"({', '.join(results['train_langs'])}), batch {results['batch_size']}, "
        f"lr {results['lr_e']:g} (encoder) / {results['lr_p']:g} (head), rows of "
        f"{results['row_length']} tokens. Accuracy (%); the model is selected by the "
        f"{results['select_lang']} validation accuracy (no target-language labels); the epoch "
        "the language average would pick is shown for reference.\n\n"
    )
    write_atomic(workdir / "results.md", (head + _markdown(columns, rows)).encode())
    write_atomic(workdir / "results.json", json.dumps(results, indent=1).encode())
    chosen = results["selected"].get(results["select_lang"])
    if chosen is not None:
        plot_accuracy(
            workdir / "results.png",
            {
                lang: chosen[f"valid/{lang}/acc"]
                for lang in ordered_langs(_langs_of(chosen, "valid"))
            },
            title=f"XNLI {results['mode']}: validation accuracy\n"
            f"epoch {chosen['epoch']}, selected by {results['select_lang']}",
        )


def plot_accuracy(path: Path, accs: Mapping[str, float], *, title: str, chance: float = 100 / 3):
    """A bar per language plus the average; a dashed line at chance."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [*accs, "avg"]
    values = [*accs.values(), float(np.mean(list(accs.values())))]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(names) + 1.5), 3.2))
    bars = ax.bar(names, values, color=["#4c72b0"] * len(accs) + ["#dd8452"])
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(100.0, max(values) + 5))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


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
        write_sweep(workdir, summary, config.select_lang)
    return summary


def write_sweep(workdir: Path, summary: Sequence[Mapping[str, Any]], select_lang: str) -> None:
    langs: list[str] = []
    for s in summary:
        chosen = s["results"]["selected"].get(select_lang)
        if chosen:
            langs += [x for x in _langs_of(chosen, "valid") if x not in langs]
    langs = ordered_langs(langs)
    columns = ["run", "lr", "batch_size", "epoch", *langs, "avg", "epoch_by_avg", "avg_by_avg"]
    rows = []
    for s in summary:
        sel = s["results"]["selected"]
        chosen, by_avg = sel.get(select_lang), sel.get("avg")
        row: dict[str, Any] = {"run": s["run"], "lr": s["lr"], "batch_size": s["batch_size"]}
        if chosen:
            row["epoch"] = chosen["epoch"]
            for lang in [*langs, "avg"]:
                v = chosen.get(f"valid/{lang}/acc")
                row[lang] = None if v is None else round(v, 2)
        if by_avg:
            row["epoch_by_avg"] = by_avg["epoch"]
            row["avg_by_avg"] = round(by_avg["valid/avg/acc"], 2)
        rows.append(row)
    write_atomic(workdir / "sweep.csv", _csv(columns, rows))
    scored = [r for r in rows if r.get(select_lang) is not None]
    best = max(scored, key=lambda r: r[select_lang])["run"] if scored else "none"
    head = (
        "# XNLI sweep\n\nValidation accuracy (%) at each run's epoch selected by "
        f"{select_lang}; `epoch_by_avg` / `avg_by_avg`: the epoch and average the language "
        f"average would pick. Best run by {select_lang} validation accuracy: **{best}**.\n\n"
    )
    write_atomic(workdir / "sweep.md", (head + _markdown(columns, rows)).encode())


# --- Tatoeba retrieval probe ---------------------------------------------------------------------


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
    start = _first_line(s, root)
    if start >= n:
        return False, f"{s.path} has {n} lines, none from line {start} on"
    return True, ""


def retrieval(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Tatoeba-style retrieval with mean-pooled last-layer states, both directions per pair.

    Writes ``retrieval.{csv,md,json}`` in the workdir and returns the results dict. A pair whose
    held-out range is empty (a short file entirely used for pretraining) is skipped and listed.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(config, {"batch_size": config.batch_size})
    root, kw = config.data.root, _read_kw(config)
    texts: dict[str, tuple[str, str, list[str], list[str]]] = {}
    skipped: dict[str, str] = {}
    for key, specs in corpus_lib.parse_sources(config.data.pairs, "data.pairs").items():
        parts = key.split("-")
        if len(parts) != 2 or not all(p.isalnum() for p in parts):
            raise DataError(f"data.pairs: key {key!r}; expected 'xx-en'")
        src, tgt = [], []
        for item in (x.strip() for x in specs.split(",") if x.strip()):
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

    if config.init_checkpoint:
        source = load_pretrained(config.init_checkpoint, config.init_step)
    else:

        def texts_fn():
            out: dict[str, list[str]] = {}
            for l1, l2, a, b in texts.values():
                out.setdefault(l1, []).extend(a)
                out.setdefault(l2, []).extend(b)
            return out

        source = random_source(config, workdir, texts_fn)
    tokenizer, mcfg = source.tokenizer, source.model
    encoded = {
        key: (tokenizer.encode_many(a), tokenizer.encode_many(b))
        for key, (_, _, a, b) in texts.items()
    }
    needed = max(
        min(len(ids), config.max_len - 2) + 2 for a, b in encoded.values() for ids in [*a, *b]
    )
    length = row_length(needed, config, mcfg)

    model = XLMEncoder(mcfg)
    state, shardings = train.init_state(
        model, optax.identity(), jax.random.key(config.seed), runner.mesh, runner.rules, runner.dp
    )
    params = state.params
    if source.params is not None:
        params = place_params(source.params, params, source.description)
    embed_fn = jax.jit(
        functools.partial(mean_pooled, model=model),
        in_shardings=(shardings.params, runner.batch_sharding),
        out_shardings=runner.replicated,
    )

    def embed(sentences: Sequence[np.ndarray], lang: str, key: str) -> np.ndarray:
        lid = source.lang_id(lang, f"data.pairs.{key}")
        packed = [pack_sentence(s, lid, max_len=config.max_len, length=length) for s in sentences]
        rows = Rows(
            *(np.stack([p[k] for p in packed]) for k in range(3)),
            labels=np.zeros(len(packed), np.int32),
        )
        with runner.context():
            outs = [embed_fn(params, runner.put(b)) for b in eval_batches(rows, config.batch_size)]
        return np.concatenate(jax.device_get(outs))[: len(rows)]

    per_pair = {}
    t0 = time.perf_counter()
    for key, (l1, l2, _, _) in texts.items():
        a, b = encoded[key]
        fwd, bwd = retrieval_accuracy(embed(a, l1, key), embed(b, l2, key))
        per_pair[key] = {"n": len(a), "xx->en": fwd, "en->xx": bwd, "mean": (fwd + bwd) / 2}
        logging.info("retrieval %s (%d pairs): %.1f / %.1f", key, len(a), fwd, bwd)
    results = {
        "init": source.description,
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


def write_retrieval(workdir: Path, results: Mapping[str, Any]) -> None:
    pairs = results["pairs"]
    order = ordered_langs([k.split("-")[0] for k in pairs])
    keys = sorted(pairs, key=lambda k: order.index(k.split("-")[0]))
    columns = ["pair", "n", "xx->en", "en->xx", "mean"]
    rows = [{"pair": k, **{c: _round(pairs[k][c]) for c in columns[1:]}} for k in keys]
    rows.append(
        {"pair": "average", "n": None, **{c: _round(results["average"][c]) for c in columns[2:]}}
    )
    write_atomic(workdir / "retrieval.csv", _csv(columns, rows))
    skipped = "".join(f"\n- skipped {k}: {why}" for k, why in results["skipped"].items())
    head = (
        "# Tatoeba retrieval\n\n"
        f"Encoder: {results['init']}. Cosine nearest neighbour of mean-pooled last-layer states "
        "(non-pad tokens, each sentence with its own language id); accuracy (%) in both "
        f"directions.{skipped}\n\n"
    )
    write_atomic(workdir / "retrieval.md", (head + _markdown(columns, rows)).encode())
    write_atomic(workdir / "retrieval.json", json.dumps(results, indent=1).encode())


def _round(v: Any) -> Any:
    return round(v, 2) if isinstance(v, float) else v
