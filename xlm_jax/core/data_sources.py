"""Which data a run reads, by size and content hash: a resume checks that it is still the same.

A checkpoint's iterator positions index into the text as it was: after a change to a data file
the resumed run reads other batches than the uninterrupted one would (an appended line moves every
window after it). So ``start`` compares the files a task reads (``Plan.sources``) with those the
checkpoint recorded and refuses a changed, missing or new one unless ``allow_data_change``, which
goes on with a warning and keeps the change in the metadata (``data_changes``).

Files are keyed by absolute path, so a key names one file whatever the working directory; a file
only moved (same size and hash under another path, e.g. a new ``data.root``) is not a change.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from absl import logging

Fingerprint = dict[str, dict[str, Any]]  # absolute path -> {"size": bytes, "sha256": hex}
SETTING = "allow_data_change"


def _files(path: Path) -> list[Path]:
    """``path``, or a directory's files (e.g. a prepared TFDS dataset), recursively and sorted."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _file(path: Path, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    with open(path, "rb") as f:  # size and hash of the same open file
        stat = os.fstat(f.fileno())
        if known and (known["size"], known["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            return {"size": stat.st_size, "sha256": known["sha256"]}  # make's rule: unchanged
        return {"size": stat.st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def fingerprint(
    paths: Iterable[str | os.PathLike], known: Mapping[str, Mapping[str, Any]] | None = None
) -> Fingerprint:
    """Size and sha256 of every file of ``paths`` (a directory: each file in it), by absolute
    path. A path that does not exist is left out: ``changes`` reports it as missing. A file in
    ``known`` (path -> size, mtime_ns, sha256) with the same size and mtime is not hashed again."""
    files = [f for p in paths for f in _files(Path(os.path.abspath(p)))]
    known = known or {}
    return {str(f): _file(f, known.get(str(f))) for f in sorted(set(files)) if f.exists()}


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["size"] == b["size"] and a["sha256"] == b["sha256"]


def changes(saved: Mapping[str, Mapping], now: Mapping[str, Mapping]) -> dict[str, dict]:
    """What differs: ``changed`` (path -> {"old", "new"}), ``missing`` and ``new`` (path ->
    fingerprint). A missing file whose content is now under a new path counts as moved, not
    changed. Empty when the data is the same."""
    changed = {
        k: {"old": dict(saved[k]), "new": dict(now[k])}
        for k in saved.keys() & now.keys()
        if not _same(saved[k], now[k])
    }
    missing = {k: dict(v) for k, v in saved.items() if k not in now}
    new = {k: dict(v) for k, v in now.items() if k not in saved}
    for gone in list(missing):
        moved = next((k for k in new if _same(new[k], missing[gone])), None)
        if moved is not None:
            logging.info("data source %s is now read from %s (same content)", gone, moved)
            del missing[gone], new[moved]
    out = {"changed": changed, "missing": missing, "new": new}
    return {k: dict(sorted(v.items())) for k, v in out.items() if v}


def _short(fp: Mapping[str, Any]) -> str:
    return f"{fp['size']} bytes, sha256 {fp['sha256'][:12]}"


def describe(diff: Mapping[str, Mapping]) -> str:
    """One line per file: what changed, with old and new size and hash prefix."""
    lines = [
        f"  changed {k}: {_short(v['old'])} -> {_short(v['new'])}"
        for k, v in diff.get("changed", {}).items()
    ]
    lines += [f"  missing {k} (was {_short(v)})" for k, v in diff.get("missing", {}).items()]
    lines += [f"  new {k} ({_short(v)})" for k, v in diff.get("new", {}).items()]
    return "\n".join(lines)


def check(
    saved_meta: Mapping[str, Any] | None,
    paths: Iterable[str | os.PathLike],
    allow: bool,
    step: int | None,
    where: str,
    known: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Compares the data ``paths`` with what the checkpoint ``saved_meta`` (None: a fresh run)
    recorded; returns the metadata fields to save from now on: ``data_sources`` (the current
    fingerprints) and ``data_changes`` (the history of allowed changes, one per resume).

    A change raises ``RuntimeError`` naming each file, unless ``allow``: then it is logged and
    appended to ``data_changes`` as ``{"step": step, "changed": ...}``.
    """
    now = fingerprint(paths, known)
    history = list((saved_meta or {}).get("data_changes", []))
    fields = {"data_sources": now, "data_changes": history}
    if saved_meta is None:
        return fields
    if "data_sources" not in saved_meta:  # written before data sources were recorded
        logging.info("%s records no data sources: nothing to compare; recording them now", where)
        return fields
    diff = changes(saved_meta["data_sources"], now)
    if not diff:
        return fields
    what = (
        f"the data changed since {where} was written; its data positions index into the old "
        f"data, so the resume would not be exact:\n{describe(diff)}\n"
    )
    if not allow:
        raise RuntimeError(
            f"Refusing to resume: {what}Restore the data, use another workdir, or rerun with "
            f"--config.{SETTING}=true to go on with the new data (recorded in the checkpoint)"
        )
    logging.warning("%s=true: going on although %s", SETTING, what.rstrip())
    history.append({"step": step, "changed": diff})
    return fields
