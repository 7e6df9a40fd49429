"""Validated plain text files: the part of reading corpora that needs no source spec and no TFDS.

`sources` reads text files through it, and so do the local TFDS builders (`tfds_local`), which
`sources` imports in turn: this module sits below both, so neither imports the other back.
`DataError` lives here for the same reason; callers import it from `sources`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

MAX_CHARS = 10_000  # default limit on a line's length: a longer one means a broken file


class DataError(ValueError):
    """Bad input data or a bad source spec; the message says where and what was expected."""


def read_text_file(path: Path, *, max_chars: int, on_invalid_utf8: str) -> list[str]:
    """Reads and validates a whole text file (a source's line range only selects from it, so both
    halves of a split report the same defects)."""
    with reading(path):
        data = path.read_bytes()
    lines = decode_lines(
        data, path, first_line=0, max_chars=max_chars, on_invalid_utf8=on_invalid_utf8
    )
    if not lines:
        raise DataError(f"{path}: empty file; expected at least one line")
    return lines


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns the errors of reading ``path`` into a ``DataError`` that names it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def decode_lines(
    data: bytes, path: Path, *, first_line: int, max_chars: int, on_invalid_utf8: str
) -> list[str]:
    """Decodes and checks whole lines of ``path`` (``data``: its bytes from the start of its
    0-based line ``first_line``); errors name the file's own line numbers. A prepared corpus
    reads its shards through this too, so both report the same defects the same way."""
    try:
        text = data.decode("utf-8")  # one pass over the bytes; errors located below
    except UnicodeDecodeError as e:
        if on_invalid_utf8 == "error":
            line = first_line + data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise DataError(
                f"{path}:{line}: invalid UTF-8 (byte {data[e.start : e.start + 1]!r} at byte "
                f"column {col}: {e.reason}); expected UTF-8 text, or pass "
                "on_invalid_utf8='replace'"
            ) from None
        # '\n' can never be swallowed into an invalid sequence, so lines stay aligned.
        text = data.decode("utf-8", errors="replace")
    if first_line == 0:
        text = text.removeprefix("\ufeff")  # a BOM is an encoding marker, not text
    # Split on '\n' only: str.splitlines() also breaks on U+2028, \x0c, \x85, ... which would
    # silently misalign parallel corpora.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline terminates the last line, it does not start a new one
    for i, line in enumerate(lines):
        if line.endswith("\r"):
            line = lines[i] = line[:-1]
        if len(line) > max_chars:
            raise DataError(
                f"{path}:{first_line + i + 1}: line is {len(line)} characters long; expected at "
                f"most max_chars={max_chars}"
            )
    return lines


def check_aligned(names: Sequence[str], counts: Sequence[int]) -> None:
    """Parallel sources (`names[i]`, of `counts[i]` lines) must have equal line counts."""
    if len(set(counts)) > 1:
        detail = ", ".join(f"{name}: {n} lines" for name, n in zip(names, counts, strict=True))
        raise DataError(f"parallel sources are not line-aligned ({detail}); expected equal counts")


def read_aligned_files(
    paths: Sequence[Path], *, max_chars: int = MAX_CHARS, on_invalid_utf8: str = "error"
) -> list[list[str]]:
    """Reads several line-aligned text files, whole; all must have the same number of lines."""
    sides = [read_text_file(p, max_chars=max_chars, on_invalid_utf8=on_invalid_utf8) for p in paths]
    check_aligned([str(p) for p in paths], [len(side) for side in sides])
    return sides
