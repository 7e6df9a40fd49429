"""Every command of README.md and of the how-tos runs, so the docs cannot drift from the code.

tests/test_docs.py checks each documented command without running it; this file executes those of
README.md and docs/{pretrain,xnli,nmt,interop,launch}.md, in document order, so that a
later command uses what an earlier one wrote (XNLI fine-tunes pretrain.md's workdirs, translate
reads nmt.md's, interop.md's commands use the converted checkpoint). docs/results.md's commands
(full-size reproductions of measured results) are only checked by tests/test_docs.py: running
them too cost another minute of CI's 20.

* each command runs through ``bash -c`` from the repository (redirections, ``VAR=value``
  prefixes and ``python -c`` snippets as written), ``python`` being this test's interpreter;
* paths move into a temporary folder (``/tmp/X``, ``/ckpt/X``, ``~/X``, ``/data/runs``...), the
  shared-data roots of a cluster (``/data/shared``...) become ../shared/data; what a reader brings
  (a released XLM model, their own corpus, ``input.en``) is written first as a small stand-in, and
  translation inputs are cut to their first lines;
* every run gets tiny overrides by its mode (``tiny_main_args``), checked by
  ``test_docs.check_main_args``; sources are cut to their first lines;
* a command that is the same run as an earlier one but for its workdir is not rerun: its workdir
  links to the earlier one ("same as DOC:LINE");
* what cannot run here is listed with the reason (``SKIPPED``); any other command fails, already
  in the cheap planning tests (not slow), so a new doc command cannot be silently ignored.

Runs are separate processes, two at a time (CI has 2 cores), each started once the runs whose
outputs it reads have finished; all share a JAX compilation cache (~30% less CPU time). The
table of every command (run / same as / skipped, seconds) is printed (``-s``), written to
``commands.md`` in the temporary folder and added to any failure.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA
from tests.test_docs import (
    check_main_args,
    commands,
    doc_text,
    parse_override,
    shell_blocks,
)
from xlm_jax.data import sources
from xlm_jax.tools import tutorial

REPO = Path(__file__).resolve().parents[1]
# Dependency order: the how-tos make the workdirs the README reuses.
DOCS = [
    "docs/pretrain.md",
    "docs/xnli.md",
    "docs/nmt.md",
    "docs/interop.md",
    "docs/launch.md",
    "README.md",
]
WORKERS = 2  # processes at a time (CI's 2 cores)
TIMEOUT = 600  # seconds per command

# Commands that do not run here: (regex on the command as written, why).
SKIPPED: list[tuple[str, str]] = [
    (
        r"^make (demo|test)\b",
        "CI runs make itself: make test is this suite, make demo [DATA=...] is pretrain.md's "
        "python -m xlm_jax.main --config=configs/demo.py [--config.data.root=...], run here",
    ),
    (r"^pip install ", "installs packages: the test runs in the installed environment"),
    (r"^python -m pytest\b", "the test suite itself (recursion)"),
    (
        r"^python -m xlm_jax\.fetch\b",
        "downloads Multi30k/XNLI (no network in tests); ../shared/data has the same files",
    ),
    (
        r"^(mkdir|cd) ",
        "prepares the download folder of the wget lines; the stand-ins are written there",
    ),
    (
        r"^wget ",
        "downloads a released model (no network in tests): tutorial.write_standin_xlm's "
        "stand-in is written instead",
    ),
    (r"^tensorboard ", "a server that runs until stopped"),
    (
        r"^(?!DRY_RUN=1 ).*launch/tpu_pod\.sh",
        "starts a TPU pod through gcloud (its DRY_RUN=1 form runs)",
    ),
    (r"^sbatch ", "submits to a SLURM cluster (its DRY_RUN=1 form runs)"),
    (
        r"^python -m xlm_jax\.aot --config=configs/xnli15_mlm_tlm\.py --topology=v5e-256$",
        "compiles the paper's model for 256 TPU chips: minutes of CPU per program; "
        "tests/test_aot.py runs python -m xlm_jax.aot on a tiny model for a v5e:2x2 slice "
        "(test_cli_fails_clearly_when_a_program_does_not_fit) and the same checks in-process",
    ),
    (
        r"^launch/local\.sh 2 --devices-per-process 2 -- --config=configs/demo\.py ",
        "two processes cost ~60 CPU-seconds of this test's budget, and "
        "tests/test_parallel.py::test_two_processes_equal_one runs this very launcher (2 "
        "processes x 2 devices, configs/demo.py) and checks the run equals one process's",
    ),
    (
        r"^python -m xlm_jax\.main --mode=nmt --config=configs/multi30k_unmt_enfr\.py "
        r"--config\.init_checkpoint=/ckpt/xlm15 ",
        "translation from the converted XLM-15 workdir, the slowest command here (~30 "
        "CPU-seconds of CI's budget): the xnli and retrieval commands beside it load that very "
        "workdir, nmt.md's commands run this config, and tests/test_convert.py::"
        "test_imported_workdir_initialises_translation_training trains translation from an "
        "imported workdir in-process",
    ),
    (
        r"^python -m xlm_jax\.bench --config=configs/bench\.py --torch=",
        "tests/test_bench.py::test_run_reports_ratios_from_one_run_and_writes_markdown runs this "
        "benchmark (transformers' step, decoding, pipeline) in-process at a tiny size; as one "
        "more process it cost ~25 CPU-seconds of CI's budget",
    ),
]

# --- tiny overrides ------------------------------------------------------------------------------

STEPS = 4  # training steps of every run (translate's --step=N becomes this final checkpoint)
ENCODER = {
    "model.n_layers": 1,
    "model.emb_dim": 16,
    "model.n_heads": 2,
    "model.max_positions": 128,
    "tokenizer.vocab_size": 200,
    "tokenizer.n_sentences": 2000,
}
# No TensorBoard files: tensorboardX imports PyTorch, installed for the tests (~1.4 CPU-s a run)
LOOP = {
    "max_steps": STEPS,
    "log_every": 2,
    "eval_every": STEPS,
    "checkpoint_every": STEPS,
    "tensorboard": False,
}
PRETRAIN = {
    **ENCODER,
    **LOOP,
    "batch_size": 8,  # divisible by the 8 emulated devices of results.md's benchmarks
    "tlm_batch_size": 8,
    "bptt": 32,
    "tlm_length": 64,
    "eval_batch_size": 64,
}
NMT = {
    **ENCODER,
    **LOOP,
    "batch_size": 8,
    "eval_batch_size": 16,
    "length_buckets": "64",
    "eval_max_len": "1.2,4",  # an untrained decoder runs to the limit: keep it short
    "bt_max_len": "1.2,4",
}
# seq_len: rows of one length whatever the data, so runs of one encoder share compiled steps
XNLI = {
    **ENCODER,
    "batch_size": 4,
    "eval_batch_size": 32,
    "n_epochs": 1,
    "max_len": 32,
    "seq_len": 64,
    "tensorboard": False,
}
RETRIEVAL = {**ENCODER, "batch_size": 64, "max_len": 64}
# Lines kept of each source, by setting: (train, evaluation).
ROWS = {
    "pretrain": (1000, 64),
    "nmt": (1000, 16),
    "xnli": (32, 32),
    "xnli_sweep": (32, 32),
    "retrieval": (0, 32),  # data.pairs: evaluation
}
SOURCE_SETTINGS = ("data.train", "data.valid", "data.test", "data.translate_test", "data.pairs")
# tests/test_bench.py's tiny mode; --nofloor: timing each matrix product alone compiles each one
# (~20 CPU-seconds a run at this size), and tests/test_bench.py covers it in-process
BENCH_FLAGS = ["--steps=1", "--peak_size=128", "--nofloor"]
BENCH = {
    k: v
    for k, v in PRETRAIN.items()
    if k.startswith(("model.", "tokenizer.v", "batch", "tlm", "bptt"))
}


def head_spec(spec: str, root: Path, rows: int) -> str:
    """A file source spec cut to the first ``rows`` lines of its range (TFDS specs unchanged)."""
    s = sources.parse_spec(spec)
    if s.kind != "file":
        return spec
    start = sources.first_line(s, root)
    end = start + min(rows, sources.line_count(s, root))
    return str(dataclasses.replace(s, start=start, end=end))


def head_sources(text: str, root: Path, rows: int) -> str:
    """``KEY: SPEC, SPEC; KEY: A|B`` with every spec cut to ``rows`` lines."""
    parts = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, specs = part.partition(":")
        alts = (
            "|".join(head_spec(s.strip(), root, rows) for s in alt.split("|"))
            for alt in specs.split(",")
        )
        parts.append(f"{key.strip()}: {', '.join(alts)}")
    return "; ".join(parts)


def load_main_config(args: list[str], where: str):
    """The config ``--config=FILE[:ARG] --config.KEY=VALUE...`` builds."""
    spec = next(a.partition("=")[2] for a in args if a.startswith("--config="))
    config = tutorial.load_config(spec)
    for arg in args:
        if arg.startswith("--config."):
            key, _, value = arg.removeprefix("--config.").partition("=")
            parse_override(config, key, value, where)
    return config


def tiny_main_args(mode: str, args: list[str], where: str) -> list[str]:
    """Overrides appended to a ``python -m xlm_jax.main`` command: a tiny model, a few steps, small
    batches, every source cut to its first lines, XNLI's grid cut to 2 x 1."""
    config = load_main_config(args, where)
    tiny = dict({"pretrain": PRETRAIN, "nmt": NMT, "retrieval": RETRIEVAL}.get(mode, XNLI))
    if mode == "pretrain" and len(config.langs.split(",")) > 3:
        tiny["tokenizer.vocab_size"] = 1000  # 15 languages' scripts need ~730 characters
    if mode == "xnli_sweep":
        tiny["sweep.lrs"] = ",".join(config.sweep.lrs.split(",")[:2])
        tiny["sweep.batch_sizes"] = config.sweep.batch_sizes.split(",")[0]
    root = Path(config.data.root)
    if config.data.root:  # "" = pretraining's generated toy corpus, already small
        train_rows, eval_rows = ROWS[mode]
        for key in SOURCE_SETTINGS:
            name = key.removeprefix("data.")
            if name in config.data and config.data[name]:
                rows = train_rows if name == "train" else eval_rows
                root_dir = root if root.is_absolute() else REPO / root
                tiny[key] = head_sources(config.data[name], root_dir, rows)
    return [f"--config.{k}={v}" for k, v in tiny.items()]


def tiny_bench_args(args: list[str]) -> list[str]:
    out = list(BENCH_FLAGS)
    if "--decode" in args:
        out.append("--decode_shape=2,5,3")
    return out + [f"--config.{k}={v}" for k, v in BENCH.items()]


# --- stand-ins for what a reader brings ----------------------------------------------------------

READER_DIR = "home/xlm"  # ~/xlm of interop.md; the README's bare file names go there too
READER_FILES = {
    "mlm_tlm_xnli15_1024.pth",
    "codes_xnli_15",
    "best-valid_en-fr_mt_bleu.pth",
    "codes_enfr",
    "input.en",
}
HEAD_LINES = 8  # lines of a translation input kept


def write_standins(folder: str | os.PathLike) -> None:
    """What interop.md downloads, as random stand-ins in XLM's ``.pth`` layout from one
    ``tutorial.write_standin_xlm`` model: the XNLI-15 language model (widened to the 15
    languages the 15-language configs ask for) and an en-fr translation model (``encoder`` +
    ``decoder``), with their fastBPE codes; and the ``input.en`` to translate."""
    import torch

    from xlm_jax.data import presets

    folder = Path(folder)
    dim, n_layers = 32, 1
    pth, codes = tutorial.write_standin_xlm(
        folder / "raw", emb_dim=dim, n_layers=n_layers, n_heads=2, n_sentences=500, n_merges=200
    )
    lm = torch.load(pth, weights_only=False)
    table = lm["model"]["module.lang_embeddings.weight"]
    rows = {lang: table[i] for i, lang in enumerate(lm["params"]["langs"])}
    g = torch.Generator().manual_seed(0)

    def with_langs(ck: dict, langs: list[str], *states: str) -> dict:
        """The checkpoint with these languages (XLM's ids: alphabetical), new ones random."""
        new = torch.stack([rows.get(x, 0.02 * torch.randn(dim, generator=g)) for x in langs])
        for state in states:
            ck[state]["module.lang_embeddings.weight"] = new
        lang2id = {x: i for i, x in enumerate(langs)}
        ck["params"].update(
            n_langs=len(langs), langs=langs, lang2id=lang2id, id2lang=dict(enumerate(langs))
        )
        return ck

    torch.save(with_langs(lm, sorted(presets.XNLI15), "model"), folder / "mlm_tlm_xnli15_1024.pth")
    (folder / "codes_xnli_15").write_bytes(codes.read_bytes())

    # The translation model: its decoder is the encoder's layers plus attention over the source.
    mt = torch.load(pth, weights_only=False)
    encoder = mt.pop("model")
    decoder = dict(encoder)
    for i in range(n_layers):
        for lin in ("q_lin", "k_lin", "v_lin", "out_lin"):
            decoder[f"module.encoder_attn.{i}.{lin}.weight"] = 0.1 * torch.randn(dim, dim)
            decoder[f"module.encoder_attn.{i}.{lin}.bias"] = torch.zeros(dim)
        decoder[f"module.layer_norm15.{i}.weight"] = torch.ones(dim)
        decoder[f"module.layer_norm15.{i}.bias"] = torch.zeros(dim)
    mt.update(encoder=encoder, decoder=decoder)
    mt["params"].update(n_enc_layers=n_layers, n_dec_layers=n_layers)
    torch.save(
        with_langs(mt, ["en", "fr"], "encoder", "decoder"), folder / "best-valid_en-fr_mt_bleu.pth"
    )
    (folder / "codes_enfr").write_bytes(codes.read_bytes())
    head_copy(SHARED_DATA / "multi30k" / "test_2016_flickr.en", folder / "input.en")


def head_copy(src: Path, dst: Path, n: int = HEAD_LINES) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        dst.write_text("".join(lines), encoding="utf-8")


def write_corpus(folder: Path) -> None:
    """pretrain.md's ``/data/mine``: mono.{en,de}, para.{en,de}, dev.{en,de} from Multi30k."""
    m30k = SHARED_DATA / "multi30k"
    folder.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "de"):
        train = (m30k / f"train.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
        val = (m30k / f"val.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / f"mono.{lang}").write_text("".join(train[:500]), encoding="utf-8")
        (folder / f"para.{lang}").write_text("".join(train[500:1000]), encoding="utf-8")
        (folder / f"dev.{lang}").write_text("".join(val[:64]), encoding="utf-8")


# --- planning: rewrite, dedupe, order ------------------------------------------------------------

# Absolute paths of a reader's machine (and ~), as they appear inside a token.
READER_PATH = re.compile(r"(?<![\w.~/-])(?:~|/tmp|/ckpt|/data|/mnt|/shared)(?:/[\w.\-]+)*")
DATA_ROOTS = ("/data/shared", "/mnt/shared/data", "/shared/data")  # "the shared data" of a cluster
# python -m xlm_jax.X
MODULES = ("main", "bench", "translate", "embed", "convert", "plots", "metrics")
OUTPUT_FLAGS = {
    "main": ("--workdir",),
    "bench": ("--out", "--markdown"),
    "translate": ("--output",),
    "embed": ("--out", "--tokens"),
    "plots": ("--out",),
    "convert": ("--to",),
}


@dataclasses.dataclass(eq=False)
class Step:
    """One command of a doc: how it runs (or why not) and what happened."""

    where: str  # DOC:LINE of its block
    text: str  # as the doc writes it
    status: str = "run"  # run | same | skipped | unknown | failed | not run
    note: str = ""  # the skip reason, "same as ...", or what failed
    kind: str = ""
    family: str = ""  # kind and mode: runs of one family mostly compile the same programs
    shell: str = ""  # what bash -c runs
    outputs: list[str] = dataclasses.field(default_factory=list)
    deps: list[Step] = dataclasses.field(default_factory=list)
    check: Callable[[Step], str | None] | None = None
    seconds: float = 0.0
    cpu: float = 0.0  # user + system seconds of the process and its children
    log: Path | None = None  # stdout and stderr, "<log>.out" / "<log>.err"
    blocker: Step | None = None  # the failed run that kept it from running

    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text(errors="replace") if self.log else ""

    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text(errors="replace") if self.log else ""


class Plan:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.steps: list[Step] = []
        self.bindings: dict[str, str] = {}  # a doc's path -> where it lives here
        self.producers: dict[str, Step] = {}  # real output path -> the step writing it
        self.keys: dict[tuple, Step] = {}
        self.standins = Step("(stand-ins)", "write_standins", kind="standins")
        reader = tmp / READER_DIR
        self.standins.shell = shlex.join(
            [
                "python",
                "-c",
                f"from tests.test_docs_run import write_standins as w; w({str(reader)!r})",
            ]
        )
        self.standins.outputs = [str(reader)]
        self.standins_planned = False
        write_corpus(tmp / "data" / "mine")

    # paths

    def resolve(self, path: str) -> str:
        for root in DATA_ROOTS:
            if path == root or path.startswith(root + "/"):
                return "../shared/data" + path.removeprefix(root)
        probe = path
        while probe not in ("", "/", "~"):
            if probe in self.bindings:
                return self.bindings[probe] + path.removeprefix(probe)
            probe = probe.rpartition("/")[0]
        if path.startswith("~/"):
            return str(self.tmp / "home" / path.removeprefix("~/"))
        return str(self.tmp / path.removeprefix("/tmp/").lstrip("/"))

    def rewrite(self, token: str, kind: str) -> str:
        name, eq, value = token.partition("=")
        if value in READER_FILES or token in READER_FILES:  # a downloaded file, by its bare name
            bare = value if eq else token
            path = str(self.tmp / READER_DIR / bare)
            return f"{name}={path}" if eq else path
        token = READER_PATH.sub(lambda m: self.resolve(m.group()), token)
        if kind in ("translate", "embed") and eq and name in ("--input", "--reference"):
            return f"{name}={self.head(token.partition('=')[2])}"  # the path moved here
        return token

    def head(self, path: str) -> str:
        """A translation input from ../shared/data: its first lines (a run decodes them all)."""
        if not path.startswith("../shared/data/"):
            return path
        dst = self.tmp / "head" / path.removeprefix("../shared/data/")
        head_copy(SHARED_DATA / path.removeprefix("../shared/data/"), dst)
        return str(dst)

    def real(self, token: str) -> str:
        """The token with its temporary paths resolved through links (for the dedupe key)."""
        return re.sub(
            re.escape(str(self.tmp)) + r"[\w./\-]*", lambda m: os.path.realpath(m.group()), token
        )

    # commands

    def add(self, where: str, cmd: list[str]) -> Step:
        text = shlex.join(cmd)
        step = Step(where, text)
        self.steps.append(step)
        for pattern, why in SKIPPED:
            if re.search(pattern, text):
                step.status, step.note = "skipped", why
                return step
        env = []
        while cmd and re.match(r"^[A-Z_]+=", cmd[0]):
            env.append(cmd.pop(0))
        step.kind = step.family = classify(cmd, env)
        if not step.kind:
            step.status = "unknown"
            step.note = "neither run nor in SKIPPED: run it here or add it to SKIPPED with why"
            return step
        try:
            self.plan(step, env, cmd)
        except (AssertionError, ValueError, KeyError) as e:
            step.status, step.note = "failed", f"cannot plan it: {e}"
        return step

    def plan(self, step: Step, env: list[str], cmd: list[str]) -> None:
        """The command to run (paths moved, tiny overrides), or the earlier run it repeats."""
        kind = step.kind
        env = [self.rewrite(e, kind) for e in env]
        args = [self.rewrite(t, kind) for t in cmd]
        for i in range(1, len(args)):
            if args[i - 1] == "<" and kind == "translate":
                args[i] = self.head(args[i])
        if kind == "translate":  # the doc's step of its long run: this run's last checkpoint
            args = [f"--step={STEPS}" if a.startswith("--step=") else a for a in args]
        if kind == "main":
            mode = next((a[7:] for a in args[3:] if a.startswith("--mode=")), "pretrain")
            step.family = f"main {mode}"
            if mode == "nmt":  # MT and AE + BT compile different steps
                config = load_main_config(args[3:], step.where)
                step.family += "".join(f" {x}" for x in ("ae", "mt", "bt") if config[f"{x}_steps"])
            args += tiny_main_args(mode, args[3:], step.where)
            check_main_args(args[3:], step.where)
            step.check = check_eval_only if eval_only(cmd) else check_workdir(mode)
        elif kind == "bench":
            args += tiny_bench_args(args)
            check_main_args(args[3:], step.where, module="bench")
            step.check = check_bench
        else:
            step.check = CHECKS.get(kind)
        reader = str(self.tmp / READER_DIR)
        if not self.standins_planned and any(reader in a for a in args):
            self.standins_planned = True
            self.steps.insert(len(self.steps) - 1, self.standins)
            self.producers[reader] = self.standins

        out_idx = output_indices(kind, cmd)
        doc_outputs = [
            cmd[i].partition("=")[2] if cmd[i].startswith("-") else cmd[i] for i in out_idx
        ]
        key = (kind, *env, *self.key_args(kind, args, out_idx))
        if (first := self.keys.get(key)) is not None:
            step.status, step.note = "same", f"same as {first.where}"
            step.deps.append(first)
            for doc_path, real in zip(doc_outputs, first.outputs, strict=True):
                self.link(doc_path, real)
            return
        self.keys[key] = step
        for i, doc_path in zip(out_idx, doc_outputs, strict=True):
            place = self.new_output(doc_path, step)
            args[i] = f"{args[i].partition('=')[0]}={place}" if cmd[i].startswith("-") else place
        for arg in [*env, *args]:
            for path in re.findall(re.escape(str(self.tmp)) + r"[\w./\-]*", arg):
                producer = self.producer(path)
                if producer not in (None, step) and producer not in step.deps:
                    step.deps.append(producer)
        left = [a for a in [*env, *args] if READER_PATH.search(a.replace(str(self.tmp), "TMP"))]
        assert not left, f"paths outside the test's folder: {left}"  # never the reader's /tmp
        words = [a if a in ("<", ">") else shlex.quote(a) for a in args]
        step.shell = " ".join([*env, *words])

    def new_output(self, doc_path: str, step: Step) -> str:
        """Where a run writes: the doc's path moved here, or a fresh one beside it if an earlier,
        different run wrote there (a reader runs results.md's variants in a fresh /tmp)."""
        if doc_path.startswith(("/", "~")):
            place = base = self.resolve(doc_path)
        else:  # relative: the repository's own files (docs/bench/*.json) stay untouched
            place = base = str(self.tmp / "out" / doc_path)
        n = 1
        while os.path.realpath(place) in self.producers or os.path.lexists(place):
            n += 1
            place = f"{base}.{n}"
        Path(place).parent.mkdir(parents=True, exist_ok=True)
        self.bindings[doc_path] = place
        self.producers[os.path.realpath(place)] = step
        step.outputs.append(place)
        return place

    def key_args(self, kind: str, args: list[str], out_idx: list[int]) -> list[str]:
        args = ["<out>" if i in out_idx else self.real(a) for i, a in enumerate(args)]
        if kind not in ("main", "bench"):
            return args
        flags: dict[str, str] = {}
        for a in args:  # --config.KEY=VALUE: the last one wins, as on the command line
            name, _, value = a.partition("=")
            if name.startswith("--config."):
                flags[name] = f"{name}={value}"
            else:
                flags[a] = a
        return sorted(flags.values())

    def producer(self, path: str) -> Step | None:
        probe = os.path.realpath(path)
        while probe != "/":
            if probe in self.producers:
                return self.producers[probe]
            probe = os.path.dirname(probe)
        return None

    def link(self, doc_path: str, real: str) -> None:
        """A same-as run's workdir: a link to the first run's."""
        place = self.resolve(doc_path) if doc_path.startswith(("/", "~")) else real
        if os.path.realpath(place) != os.path.realpath(real):
            if os.path.lexists(place) or os.path.realpath(place) in self.producers:
                place = real
            else:
                Path(place).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(real, place)
        self.bindings[doc_path] = place


def classify(cmd: list[str], env: list[str]) -> str:
    """What kind of command this is, '' for one this test does not know how to run."""
    prog, *args = cmd
    if prog == "python" and args[:1] == ["-m"] and args[1].startswith("xlm_jax."):
        module = args[1].removeprefix("xlm_jax.")
        return module if module in MODULES else ""
    if prog == "python" and args[:1] == ["-c"]:
        return "snippet"
    launcher = args[0] if prog == "bash" and args else prog
    if "DRY_RUN=1" in env and launcher in ("launch/tpu_pod.sh", "launch/slurm.sbatch"):
        return "dry_run"
    return ""


def eval_only(cmd: list[str]) -> bool:
    """XLM's --eval_only: the run evaluates an earlier run's workdir (a reader of it)."""
    return any(t.lower() in ("--config.eval_only=true", "--config.eval_only=1") for t in cmd)


def output_indices(kind: str, cmd: list[str]) -> list[int]:
    """Indices of the tokens naming what the command writes."""
    if kind == "main" and eval_only(cmd):
        return []
    out = []
    for i, tok in enumerate(cmd):
        name, eq, value = tok.partition("=")
        flag = eq and name in OUTPUT_FLAGS.get(kind, ()) and value not in ("hf", "params")
        if flag or (i > 0 and cmd[i - 1] == ">"):
            out.append(i)
    if kind == "convert" and any(t in ("--to=hf", "--to=params") for t in cmd):
        out.append(max(i for i, t in enumerate(cmd) if not t.startswith("-") and i > 2))
    return out


# --- what each kind must have written ------------------------------------------------------------


def _arg(step: Step, flag: str) -> str | None:
    for tok in shlex.split(step.shell):
        if tok.startswith(flag + "="):
            return tok.partition("=")[2]
    return None


def check_workdir(mode: str) -> Callable[[Step], str | None]:
    expected = {"xnli": "results.md", "xnli_sweep": "sweep.md", "retrieval": "retrieval.md"}

    def check(step: Step) -> str | None:
        workdir = Path(step.outputs[0])
        if mode in expected:
            return None if (workdir / expected[mode]).is_file() else f"no {expected[mode]}"
        steps = [p.name for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        return None if steps else f"no checkpoint in {workdir}/checkpoints"

    return check


def check_translate(step: Step) -> str | None:
    words = shlex.split(step.shell)
    source = _arg(step, "--input") or words[words.index("<") + 1]
    target = _arg(step, "--output") or (words[words.index(">") + 1] if ">" in words else None)
    n_in = len(Path(source).read_text(encoding="utf-8").splitlines())
    out = Path(target).read_text(encoding="utf-8") if target else step.stdout()
    n_out = len(out.splitlines())
    return None if n_out == n_in else f"{n_out} lines out for {n_in} in"


def check_eval_only(step: Step) -> str | None:
    workdir = Path(_arg(step, "--workdir") or "")
    found = list((workdir / "eval_only").glob("step_*.json"))
    return None if found else f"no eval_only/step_N.json in {workdir}"


def check_embed(step: Step) -> str | None:
    n_in = len(Path(_arg(step, "--input") or "").read_text(encoding="utf-8").splitlines())
    shape = np.load(_arg(step, "--out") or "", mmap_mode="r").shape
    return None if shape[0] == n_in else f"{shape[0]} vectors for {n_in} lines"


def check_png(step: Step) -> str | None:
    out = Path(_arg(step, "--out") or "")
    return None if out.is_file() and out.read_bytes()[:4] == b"\x89PNG" else f"no PNG {out}"


def check_convert(step: Step) -> str | None:
    out = Path(step.outputs[0])
    made = (out / "config.json").is_file() or (out / "checkpoints" / "0").is_dir()
    return None if made else f"{out}: neither a HuggingFace folder nor a workdir"


def check_table(step: Step) -> str | None:
    return None if "|---" in step.stdout() else "no markdown table on stdout"


def check_bench(step: Step) -> str | None:
    if (out := _arg(step, "--out")) and not Path(out).is_file():
        return f"no {out}"
    return check_table(step)


def check_prints(step: Step) -> str | None:
    return None if step.stdout().strip() else "printed nothing"


CHECKS: dict[str, Callable[[Step], str | None]] = {
    "translate": check_translate,
    "embed": check_embed,
    "plots": check_png,
    "convert": check_convert,
    "metrics": check_table,
    "snippet": check_prints,
    "dry_run": check_prints,
}


# --- running -------------------------------------------------------------------------------------


def environment(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "JAX_PLATFORMS": "cpu",
        # These runs check that the commands work, not their speed: compiling dominates at this
        # size, and without XLA's optimisations it costs ~40% less CPU (a VAR=... prefix of a
        # command still sets its own flags).
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        # one cache for every run: most programs recur with the same tiny shapes
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def execute(steps: list[Step], tmp: Path) -> None:
    """Runs every step of status "run", ``WORKERS`` at a time, each once its inputs exist."""
    env = environment(tmp)
    (tmp / "logs").mkdir(exist_ok=True)
    pending = [s for s in steps if s.status == "run"]
    running: dict[Step, tuple[subprocess.Popen, float]] = {}
    warm: set[str] = set()  # families with a finished run: their programs are in the cache
    while pending or running:
        for step in list(pending):
            if len(running) >= WORKERS:
                break
            if step.family not in warm and any(r.family == step.family for r in running):
                continue  # let the family's first run fill the cache, run another meanwhile
            failed = [d for d in step.deps if d.status in ("failed", "not run")]
            if failed:
                step.status, step.note = "not run", f"needs {failed[0].where}, which failed"
                step.blocker = failed[0]
                pending.remove(step)
            elif all(d.status in ("done", "same") for d in step.deps):
                step.log = tmp / "logs" / f"{steps.index(step):03d}"
                with (
                    open(step.log.with_suffix(".out"), "w") as out,
                    open(step.log.with_suffix(".err"), "w") as err,
                ):
                    proc = subprocess.Popen(
                        ["bash", "-c", step.shell],
                        cwd=REPO,
                        env=env,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,  # its own group: a timeout kills every child
                    )
                running[step] = (proc, time.monotonic())
                pending.remove(step)
        for step, (proc, start) in list(running.items()):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if not pid and time.monotonic() - start < TIMEOUT:
                continue
            timed_out = not pid
            if timed_out:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
            step.seconds = time.monotonic() - start
            step.cpu = usage.ru_utime + usage.ru_stime
            del running[step]
            warm.add(step.family)
            proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped by wait4
            if code != 0:
                step.status = "failed"
                step.note = f"timed out after {TIMEOUT} s" if timed_out else f"exit {code}"
            elif step.check is not None and (problem := checked(step)):
                step.status, step.note = "failed", problem
            else:
                step.status = "done"
        time.sleep(0.05)
    for step in steps:  # a same-as step stands or falls with its first run
        if step.status == "same" and step.deps[-1].status != "done":
            step.status, step.note = "not run", f"{step.note}, which failed"
            step.blocker = step.deps[-1]


def checked(step: Step) -> str | None:
    """What is wrong with the step's output, if anything (a check that breaks says so)."""
    assert step.check is not None
    try:
        return step.check(step)
    except (OSError, ValueError) as e:
        return f"its output could not be checked: {e!r}"


def table(steps: list[Step]) -> str:
    rows = ["| where | command | result | s | CPU s |", "|---|---|---|---|---|"]
    for s in steps:
        text = " ".join(s.text.split())  # python -c snippets span lines
        text = text if len(text) <= 100 else text[:97] + "..."
        result = {"done": "run", "same": s.note, "skipped": f"skipped: {s.note}"}.get(
            s.status, f"**{s.status.upper()}**: {s.note}"
        )
        seconds = f"{s.seconds:.1f} | {s.cpu:.1f}" if s.seconds else " |"
        text = text.replace("|", "\\|")
        rows.append(f"| {s.where} | `{text}` | {result} | {seconds} |")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Plan:
    """Every command of the docs, planned: rewritten, deduped, or skipped with its reason."""
    if not all((SHARED_DATA / d).is_dir() for d in ("multi30k", "xnli", "tatoeba")):
        pytest.skip(f"the docs' commands read ../shared/data, not found at {SHARED_DATA}")
    plan = Plan(tmp_path_factory.mktemp("docs_run"))
    for doc in DOCS:
        for line, block in shell_blocks(doc_text(REPO / doc)):
            for cmd in commands(textwrap.dedent(block)):  # a list item's block is indented
                plan.add(f"{doc}:{line}", list(cmd))
    return plan


@pytest.fixture(scope="module")
def docs_run(plan: Plan) -> Plan:
    """The plan, executed (a few minutes)."""
    start = time.monotonic()
    execute(plan.steps, plan.tmp)
    report = table(plan.steps)
    (plan.tmp / "commands.md").write_text(report + "\n")
    print(f"\n{report}\n\n{time.monotonic() - start:.0f} s for the commands; {plan.tmp}")
    return plan


def test_every_command_runs_or_is_skipped_for_a_reason(plan: Plan) -> None:
    """Cheap (nothing runs): a new doc command this test cannot run fails here, not silently."""
    bad = [s for s in plan.steps if s.status in ("unknown", "failed")]
    assert not bad, "\n".join(f"{s.where}: `{s.text}`: {s.note}" for s in bad)


def test_every_skip_reason_is_used(plan: Plan) -> None:
    """A SKIPPED entry no doc needs any more is dropped, so the list stays a true account."""
    used = {s.note for s in plan.steps if s.status == "skipped"}
    assert [p for p, why in SKIPPED if why not in used] == []


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_every_command_of_the_doc_runs(docs_run: Plan, doc: str) -> None:
    steps = [s for s in docs_run.steps if s.where.startswith(doc + ":")]
    assert any(s.status in ("done", "same") for s in steps), f"{doc}: no command ran"
    bad = [s for s in steps if s.status not in ("done", "same", "skipped")]
    details = []
    for s in bad:
        failed = s.blocker or s
        details.append(
            f"{s.where}: {s.status}: {s.note}\n  $ {failed.shell or failed.text}\n"
            + failed.stderr()[-3000:]
        )
    assert not bad, "\n\n".join(details) + "\n\n" + table(docs_run.steps)
