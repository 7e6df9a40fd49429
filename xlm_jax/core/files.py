"""Writing files so that a crash, a Ctrl-C or a second process never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def errors_name(path: str | os.PathLike, what: str, note: str = "") -> Iterator[None]:
    """Re-raises an ``OSError`` (same errno, the original chained) saying what was done to which
    file: a bare ``[Errno 28] No space left on device`` names none. ``note`` is appended."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{what} {os.fspath(path)} failed: {e.strerror or e}{note}") from e


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a unique temporary file in the same directory.

    ``os.replace`` is atomic, so readers see the old file or the new one, never a mixture; the
    temporary name is unique, so processes sharing a workdir can write the same file at once.
    On an error (a full disk, say) the old file is left as it was, and the ``OSError`` says so
    and names ``path``.
    """
    path = Path(path)
    with errors_name(path, "writing", "; the previous file, if any, is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
