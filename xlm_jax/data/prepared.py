"""A prepared corpus on disk, read without loading it: sentences and XLM streams over token shards.

``python -m xlm_jax.prepare`` (``data/prepare.py``) writes a directory::

    manifest.json      written last: sources (size, mtime, sha256), tokenizer sha256, options,
                       per split and key ("en", "en-fr") its shards, counts and dropped lines
    tokenizer.model    the shared BPE vocabulary the tokens index
    shards/SPLIT/KEY/ITEM-INDEX.json             a shard's record (its files' sizes and CRC32s)
    shards/SPLIT/KEY/ITEM-INDEX.SIDE.tokens.npy  every kept sentence followed by </s>
    shards/SPLIT/KEY/ITEM-INDEX.SIDE.offsets.npy int64 start of each sentence, then the end
    shards/SPLIT/KEY/ITEM-INDEX.SIDE.counts.npy  int64 frequency of each id (sample_alpha)

The format is Megatron-LM's and fairseq's: flat token arrays plus an offsets index (plain ``.npy``
files, which numpy can also memory-map). Why not array_record: an MLM window of ``bptt`` tokens
crosses sentences, so it is one slice of a flat array (no per-record decode or reassembly), and a
TLM pair is two slices. They are read with ``pread`` rather than mapped: a mapped page stays in the
process's RSS (with large page-cache folios, megabytes per random read), so RSS would grow with
the corpus; read, it stays in the page cache only. Tokens are uint16 (XLM's 2 bytes a token) while
the vocabulary fits.

A key's sentences are the concatenation of its shards in order, so a ``Stream`` is exactly
``batches.make_stream`` of the same sentences and ``Sentences`` indexes them as a list would:
iterators over prepared data yield the batches of the in-memory ones (tested).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xlm_jax.data.text_files import DataError
from xlm_jax.text.specials import EOS_ID

# Bumped when the same tokenizer file would now give other ids, so older shards are redone:
# 2 = XLM BPE's Moses steps follow the perl scripts (final period, non-printing chars, quotes);
# 3 = zh / th through XLM's segmenters; perl's lone-quote, «» spacing and alphanumeric rules.
FORMAT = 3
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def file_crc32(path: Path) -> int:
    """CRC32 of a file (zlib: about 4 GB/s here, sha256 1.8 GB/s; it detects damage, which is
    all a shard's checksum is for: the sources' identity is their sha256)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def check_file(path: Path, want: Mapping[str, Any], what: str) -> None:
    """``path`` has the size and CRC32 its record says, or a ``DataError`` names it."""
    hint = f"; prepare again (finished shards are kept, this one is redone): {what}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: missing{hint}") from None
    if size != want["size"]:
        raise DataError(f"{path}: {size} bytes, its record says {want['size']} (truncated?){hint}")
    if file_crc32(path) != want.get("crc32"):
        raise DataError(f"{path}: its CRC32 differs from its record (corrupted){hint}")


class Files:
    """Open descriptors of the shard files, at most ``limit`` (least recently used closed first:
    a corpus may have thousands of shards). Reads are ``pread``: unlike a memory map, what was
    read does not stay mapped, so a process's RSS does not grow with the corpus it samples."""

    def __init__(self, limit: int = 64) -> None:
        self._fds: collections.OrderedDict[Path, int] = collections.OrderedDict()
        self.limit = limit

    def read(self, path: Path, start: int, n: int) -> bytes:
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= self.limit:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        data = os.pread(fd, n, start)
        if len(data) != n:
            raise DataError(f"{path}: {len(data)} bytes at {start}, expected {n} (truncated?)")
        return data

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


class DiskArray:
    """A 1-d ``.npy`` file read by slices (``read``) or whole (``load``), never mapped."""

    def __init__(self, path: Path, files: Files) -> None:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            header = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else (np.lib.format.read_array_header_2_0)
            )
            shape, _, dtype = header(f)
            self.offset = f.tell()
        self.path, self.files, self.dtype, self.size = path, files, np.dtype(dtype), shape[0]

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, stop: int) -> np.ndarray:
        n = self.dtype.itemsize
        data = self.files.read(self.path, self.offset + start * n, (stop - start) * n)
        return np.frombuffer(data, self.dtype)

    def load(self) -> np.ndarray:
        return np.fromfile(self.path, self.dtype, self.size, offset=self.offset)


class Sentences(Sequence):
    """One side of a key (all its shards): ``self[i]`` is sentence i as int32 ids, read when
    asked; ``reads`` counts the sentences read (a process reads only those of its rows)."""

    def __init__(self, shards: Sequence[tuple[DiskArray, DiskArray]]) -> None:
        self._tokens = [t for t, _ in shards]
        self._offsets = [o for _, o in shards]
        self._first = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        self.reads = 0

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i):  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(f"sentence {i} of {len(self)}")
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        j = i - int(self._first[s])
        start, end = self._offsets[s].read(j, j + 2).tolist()
        self.reads += 1
        return self._tokens[s].read(start, end - 1).astype(np.int32)  # without its </s>

    def lengths(self) -> np.ndarray:
        """Every sentence's length in tokens (int32), from the offsets alone."""
        return np.concatenate([np.diff(o.load()).astype(np.int32) - 1 for o in self._offsets])


class Stream:
    """XLM's stream ``</s> s1 </s> s2 </s> ...`` of a key's sentences (``batches.make_stream``)
    as one virtual int32 array over the shards: ``len`` and slices, read when asked."""

    def __init__(self, shard_tokens: Sequence[DiskArray]) -> None:
        self._parts = [t for t in shard_tokens if len(t)]
        self._starts = np.cumsum([1] + [len(p) for p in self._parts])  # after the first </s>
        self.reads = 0

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, step = window.indices(len(self))
        if step != 1:
            raise ValueError("a stream is read in contiguous windows")
        out = [np.array([EOS_ID], np.int32)] if start == 0 < stop else []
        at = max(start, 1)
        first = int(np.searchsorted(self._starts, at, side="right")) - 1
        for p in range(first, len(self._parts)):
            if at >= stop:
                break
            lo, hi = at - int(self._starts[p]), min(stop, int(self._starts[p + 1]))
            out.append(self._parts[p].read(lo, hi - int(self._starts[p])).astype(np.int32))
            at = hi
        self.reads += 1
        return np.concatenate(out) if out else np.zeros(0, np.int32)

    def array(self) -> np.ndarray:
        """The whole stream in memory (validation sets, which are small)."""
        return self[0 : len(self)]


class PreparedSet:
    """An opened prepared directory: its manifest checked, its shards verified, read on demand."""

    def __init__(self, path: Path, manifest: dict[str, Any], checks: Sequence[Any] = ()) -> None:
        self.path, self.manifest, self.files = path, manifest, Files()
        self._checks = list(checks)  # futures of the verification still running

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, verify: bool = True, background: bool = False
    ) -> PreparedSet:
        """Reads ``path``'s manifest; with ``verify``, checks the size and CRC32 of every shard
        file on every core (1.8 GB of shards in 0.33 s on this 2-core machine). ``background``:
        the checks run while the caller builds its iterators, and ``verified()`` waits for them
        (before the first batch is read)."""
        path = Path(path)
        manifest = read_manifest(path)
        checks = [
            (path / "shards" / file, want, f"shard {name} of {path}")
            for name, record in manifest["shards"].items()
            for file, want in record["files"].items()
        ]
        if not verify:
            return cls(path, manifest)
        pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count())  # zlib frees the GIL
        futures = [pool.submit(check_file, *check) for check in checks]
        pool.shutdown(wait=False)
        prepared = cls(path, manifest, futures)
        return prepared if background else prepared.verified()

    def verified(self) -> PreparedSet:
        """Waits for the verification; raises the first damaged file's ``DataError``."""
        for future in self._checks:
            future.result()
        self._checks = []
        return self

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def keys(self, split: str) -> dict[str, Any]:
        return self.manifest["splits"].get(split, {})

    def _entry(self, split: str, key: str) -> dict[str, Any]:
        entry = self.keys(split).get(key)
        if entry is None:
            raise DataError(
                f"{self.path / MANIFEST}: no {split} text for {key!r} (it has "
                f"{sorted(self.keys(split)) or 'none'}); prepare it from a config whose "
                f"data.{split} names {key!r}"
            )
        return entry

    def _side_arrays(self, split: str, key: str, side: int, what: str) -> list[DiskArray]:
        return [
            DiskArray(self.path / "shards" / f"{name}.{side}.{what}.npy", self.files)
            for name in self._entry(split, key)["shards"]
        ]

    def sentences(self, split: str, key: str) -> list[Sentences]:
        """One ``Sentences`` per side (one for a language, two for a pair)."""
        n_sides = len(self._entry(split, key)["langs"])
        return [
            Sentences(
                list(
                    zip(
                        self._side_arrays(split, key, side, "tokens"),
                        self._side_arrays(split, key, side, "offsets"),
                        strict=True,
                    )
                )
            )
            for side in range(n_sides)
        ]

    def labels(self, split: str, key: str) -> np.ndarray:
        """The label ids of an NLI set (``data.records = "nli"``), one per pair (int32)."""
        entry = self._entry(split, key)
        if "labels" not in entry:
            raise DataError(f"{self.path / MANIFEST}: {split} {key!r} is text, not NLI pairs")
        return np.concatenate(
            [
                DiskArray(self.path / "shards" / f"{name}.labels.npy", self.files).load()
                for name in entry["shards"]
            ]
        ).astype(np.int32)

    def stream(self, split: str, key: str) -> Stream:
        return Stream(self._side_arrays(split, key, 0, "tokens"))

    def counts(self, split: str, key: str, vocab_size: int) -> np.ndarray:
        """Frequencies of the ids in ``stream(split, key)`` (its leading </s> included)."""
        total = np.zeros(vocab_size, np.int64)
        for c in self._side_arrays(split, key, 0, "counts"):
            total[: len(c)] += c.load()
        total[EOS_ID] += 1
        return total


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{file}: no manifest; {path} is not a finished prepared set (run python -m "
            f"xlm_jax.prepare --config=... --out={path}, which keeps what is already done)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: unreadable ({e}); prepare again into {path}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{file}: format {manifest.get('format')!r}, this xlm_jax reads format {FORMAT}; "
            "prepare again"
        )
    return manifest
