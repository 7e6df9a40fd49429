"""Writing files so that a crash, a Ctrl-C or a second process never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import secrets
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
    and names ``path``. The file gets the mode ``open`` would give it (0o666 less the umask).
    """
    path = Path(path)
    with errors_name(path, "writing", "; the previous file, if any, is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A unique temporary path beside ``path`` to write in its place, for output that is not one
    buffer (``write_atomic``): memory-mapped, or written in parts. When the block ends without an
    error the file is synced and becomes ``path`` (``os.replace``); otherwise it is removed."""
    path = Path(path)
    with errors_name(path, "creating a temporary file for"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        os.close(fd)
    try:
        yield Path(tmp)
        with errors_name(path, "writing"), open(tmp, "rb") as f:
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` with a unique name, open for writing.

    ``tempfile.mkstemp`` creates it with mode 0o600, which the rename then gives the final file
    (exports came out unreadable to others); creating it with 0o666 lets the kernel apply the
    umask (and a directory's default ACL) as for any new file, without reading the umask, which
    POSIX only allows by changing it for every thread of the process.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):  # 48 random bits: a second try is already unlikely
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name for {path}")
