r"""Sentence vectors of a text file, one sentence per line (XLM's generate-embeddings notebook as a
command):

  python -m xlm_jax.embed --workdir=/tmp/xlm_m30k --lang=en --input=sentences.en --out=en.npy
  python -m xlm_jax.embed --workdir=/ckpt/xlm15 --lang=fr --pooling=first --input=- \
      --out=fr.npy --tokens=fr_tokens.npz < sentences.fr

--workdir is what ``explore.Encoder.load`` reads: a pretraining run (its best checkpoint, else
the latest, or --step) or a workdir converted from XLM / HuggingFace (``python -m
xlm_jax.convert``). Each line becomes the row ``</s> s </s>`` with --lang's id, as in training,
cut to --max_len tokens (and the model's positions). An empty line is embedded as XLM would,
``</s></s>`` (a warning names the first); invalid UTF-8 is an error naming the line.

Outputs (each appears whole, or not at all if the run stops):

* --out: ``.npy`` float32 ``(lines, emb_dim)``, row i = line i. --pooling=mean: the mean of the
  last layer over the row's tokens (the retrieval probe's vector); first: the state at position
  0, the row's first ``</s>`` (the notebook's ``tensor[0]``).
* --tokens (optional): ``.npz`` of ``states`` float32 ``(tokens, emb_dim)``, every row's last-layer
  states one after the other in input order, ``ids`` int32 ``(tokens,)`` their token ids and
  ``offsets`` int64 ``(lines + 1,)``: line i is ``states[offsets[i]:offsets[i + 1]]``, its
  ``</s> s </s>`` (so ``states[offsets[i]]`` is its first-pooled vector, the mean of its rows
  its mean-pooled one). Nothing is padded on disk.

The input is read twice (stdin is first copied to a temporary file): once to count its lines,
then in chunks of ``CHUNK_LINES``, each embedded longest sentences first (less padding) and
written at its lines' rows, so memory holds a chunk, never the whole file or its vectors. The
vectors are ``explore.sentence_vectors``' (the same function); progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from absl import app, flags, logging

from xlm_jax.core.files import atomic_output
from xlm_jax.core.metrics import format_duration, format_si
from xlm_jax.data.sources import DataError
from xlm_jax.tools import explore

CHUNK_LINES = 8192  # sentences sorted by length and embedded at a time


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The command's flags (a test passes its own ``FlagValues``)."""
    fv = {"flag_values": flag_values}
    defined = {
        "workdir": flags.DEFINE_string(
            "workdir", None, "A pretraining run or a converted model's workdir.", **fv
        ),
        "input": flags.DEFINE_string(
            "input", None, "Text file, one sentence per line; '-' = stdin.", **fv
        ),
        "lang": flags.DEFINE_string("lang", None, "The sentences' language, e.g. en.", **fv),
        "out": flags.DEFINE_string("out", None, "Sentence vectors, .npy (lines, emb_dim).", **fv),
        "pooling": flags.DEFINE_enum(
            "pooling", "mean", explore.POOLINGS, "mean over the row, or its first </s>.", **fv
        ),
        "tokens": flags.DEFINE_string(
            "tokens", "", "Also every token's states: .npz of states, ids, offsets.", **fv
        ),
        "step": flags.DEFINE_integer(
            "step", -1, "Checkpoint step; -1 = the best (else the latest).", **fv
        ),
        "batch_size": flags.DEFINE_integer(
            "batch_size", 64, "Sentences per batch.", lower_bound=1, **fv
        ),
        "max_len": flags.DEFINE_integer(
            "max_len", 256, "Tokens per row at most, </s> included.", lower_bound=2, **fv
        ),
    }
    flags.mark_flags_as_required(["workdir", "input", "lang", "out"], flag_values=flag_values)
    return defined


class Progress:
    """A line on stderr every ``every`` seconds and at the end: sentences, sentences/s, ETA."""

    def __init__(self, total: int, every: float = 10.0, stream: IO[str] | None = None):
        self.total, self.every, self.done = total, every, 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"embedded {self.done:,}/{self.total:,} sentences | {format_si(rate)} "
                f"sentences/s | ETA {format_duration(eta)}",
                file=self.stream,
                flush=True,
            )


def count_lines(f: IO[bytes]) -> int:
    """Lines of a binary file as ``read_chunks`` splits them (a last line needs no newline)."""
    n, last = 0, b"\n"
    while block := f.read(1 << 24):
        n, last = n + block.count(b"\n"), block[-1:]
    f.seek(0)
    return n + (last != b"\n")


def read_chunks(f: IO[bytes], name: str, size: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the first line, lines) of ``size`` lines at a time; lines split at ``\\n``
    only, a trailing ``\\r`` dropped (as ``python -m xlm_jax.translate`` reads them)."""
    chunk: list[str] = []
    start = 0
    for i, raw in enumerate(f):
        try:
            chunk.append(raw.decode("utf-8").rstrip("\n").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{name}:{i + 1}: invalid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
        if len(chunk) == size:
            yield start, chunk
            start, chunk = start + size, []
    if chunk:
        yield start, chunk


class TokenStates:
    """The --tokens file: rows written at their token offsets into anonymous temporary files
    beside it (memory holds none of them), packed into the ``.npz`` at the end."""

    def __init__(self, path: str, dim: int):
        folder = Path(path).resolve().parent
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.dim = path, dim
        self.states = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (closed by pack)
        self.ids = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (closed by pack)
        self.offsets = [np.zeros(1, np.int64)]

    def add_chunk(self, lengths: np.ndarray) -> np.ndarray:
        """Places the next lines' rows (their lengths, in input order): their first offsets."""
        ends = self.offsets[-1][-1] + np.cumsum(lengths)
        self.offsets.append(ends)
        return ends - lengths

    def write(self, offset: int, ids: np.ndarray, states: np.ndarray) -> None:
        """One row, whose first token is the file's ``offset``-th."""
        self.ids.seek(offset * 4)
        self.ids.write(ids.astype("<i4").tobytes())
        self.states.seek(offset * 4 * self.dim)
        self.states.write(states.astype("<f4").tobytes())

    def pack(self) -> None:
        """Writes the ``.npz`` (uncompressed, as ``np.savez``) and drops the temporary files."""
        offsets = np.concatenate(self.offsets)
        with atomic_output(self.path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as z:
            with z.open("offsets.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, offsets)
            n = int(offsets[-1])
            for name, raw, shape, dtype in (
                ("ids", self.ids, (n,), "<i4"),
                ("states", self.states, (n, self.dim), "<f4"),
            ):
                header = {"descr": dtype, "fortran_order": False, "shape": shape}
                with z.open(f"{name}.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_1_0(out, header)
                    raw.seek(0)
                    shutil.copyfileobj(raw, out, 1 << 24)
        self.close()

    def close(self) -> None:
        self.states.close()
        self.ids.close()


@contextlib.contextmanager
def open_input(path: str) -> Iterator[tuple[IO[bytes], str]]:
    """The input as a seekable binary file and its name for errors (stdin: a temporary copy)."""
    if path != "-":
        with open(path, "rb") as f:
            yield f, path
        return
    with tempfile.TemporaryFile() as f:
        shutil.copyfileobj(sys.stdin.buffer, f, 1 << 24)
        f.seek(0)
        yield f, "<stdin>"


def embed_file(
    enc: explore.Encoder,
    path: str,
    lang: str,
    out: str,
    *,
    pooling: str = "mean",
    tokens: str = "",
    batch_size: int = 64,
    max_len: int = 256,
    chunk: int = CHUNK_LINES,
    progress_every: float = 10.0,
) -> int:
    """Writes the vectors of every line of ``path`` to ``out`` (and their token states to
    ``tokens``, if given); returns the number of lines."""
    dim = enc.source.model.emb_dim
    with open_input(path) as (f, name), atomic_output(out) as tmp:
        n = count_lines(f)
        vectors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        token_states = TokenStates(tokens, dim) if tokens else None
        progress, first_empty = Progress(n, progress_every), 0
        try:
            for start, lines in read_chunks(f, name, chunk):
                if not first_empty and "" in lines:
                    first_empty = start + lines.index("") + 1
                ids = enc.tokenizer.encode_many(lines, lang)
                if token_states is not None:
                    firsts = token_states.add_chunk(explore.row_lengths(enc, ids, max_len))
                for b in explore.embed_batches(
                    enc,
                    ids,
                    lang,
                    pooling=pooling,
                    batch_size=batch_size,
                    max_len=max_len,
                    states=token_states is not None,
                ):
                    vectors[start + b.index] = b.vectors
                    if token_states is not None:
                        for i, t, s in zip(b.index, b.tokens, b.states, strict=True):
                            token_states.write(int(firsts[i]), t, s)
                    progress.update(len(b.index))
            vectors.flush()
            del vectors  # unmapped before the file is renamed
            if token_states is not None:
                token_states.pack()
        finally:
            if token_states is not None:
                token_states.close()
    if first_empty:
        logging.warning("%s: empty lines (the first: %d) embedded as </s></s>", name, first_empty)
    return n


def main(argv: list[str], defined: dict[str, Any]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = {k: v.value for k, v in defined.items()}
    if f["input"] != "-" and not os.path.isfile(f["input"]):
        raise app.UsageError(f"--input={f['input']}: no such file")
    enc = explore.Encoder.load(f["workdir"], f["step"])
    try:
        enc.source.lang_id(f["lang"], "--lang")
    except DataError as e:
        raise app.UsageError(str(e)) from None
    logging.info(
        "%s: embedding %s (%s), %s pooling",
        enc.source.description,
        f["input"],
        f["lang"],
        f["pooling"],
    )
    n = embed_file(
        enc,
        f["input"],
        f["lang"],
        f["out"],
        pooling=f["pooling"],
        tokens=f["tokens"],
        batch_size=f["batch_size"],
        max_len=f["max_len"],
    )
    logging.info("wrote %s (%d x %d)", f["out"], n, enc.source.model.emb_dim)


if __name__ == "__main__":
    # Orbax reports a checkpoint's restore step by step at INFO; keep its warnings (as main.py).
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
    )
    defined = define_flags()
    app.run(lambda argv: main(argv, defined))
