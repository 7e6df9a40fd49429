"""Read and validate corpora: text files (with `@START:END` line ranges) and TFDS sources.

Every reader returns a plain list of str, one sentence per line, newline stripped. Bad input
raises `DataError` naming the file, the 1-based line when relevant, and what was expected.

Source specs:
  PATH[@START:END]                            a UTF-8 text file; relative PATHs resolve against root
  tfds:NAME[/CONFIG]:SPLIT:FIELD[@START:END]  one text feature of a prepared TFDS split
START:END is a 0-based half-open range of lines (examples); either bound may be omitted.

tensorflow_datasets is imported lazily: plain text files never pay for it, and TFDS is never
asked to download anything (only the project's local builders are prepared, from local files).
Text files are read and checked by `text_files`, which the local builders (`tfds_local`) use too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from xlm_jax.data.text_files import MAX_CHARS, DataError, check_aligned, read_text_file

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

ON_INVALID_UTF8 = ("error", "replace")

_RANGE_RE = re.compile(r"(\d*%?):(\d*%?)")
_TFDS_RE = re.compile(
    r"tfds:(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?)"
    r":(?P<split>[A-Za-z0-9_.\-]+):(?P<field>[A-Za-z0-9_./\-]+)"
)
# Formats TFDS can read by random access without TensorFlow.
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
# tfds 4.9.10 imports its legacy builder packages in one loop that stops at the first ImportError
# (nearest_neighbors needs h5py), so e.g. translate/wmt14 never registers: import them one by one.
_TFDS_LEGACY_PACKAGES = (
    "translate",
    "text",
    "summarization",
    "question_answering",
    "text_simplification",
    "structured",
    "audio",
    "image",
    "image_classification",
    "object_detection",
    "video",
    "vision_language",
    "graphs",
    "time_series",
    "ranking",
    "recommendation",
    "rl_unplugged",
    "rlds.datasets",
    "robotics",
    "robomimic",
    "nearest_neighbors",
    "d4rl",
)


@dataclass(frozen=True)
class Spec:
    """A parsed source spec. `kind='file'` uses `path`; `kind='tfds'` uses name/split/field."""

    kind: Literal["file", "tfds"]
    path: str = ""
    name: str = ""  # TFDS 'name' or 'name/config'
    split: str = ""
    field: str = ""  # feature key; '/' descends into nested feature dicts
    # a line index, or a share of the lines as "80%" (resolved when the length is known)
    start: int | str | None = None
    end: int | str | None = None

    @property
    def range_suffix(self) -> str:
        if self.start is None and self.end is None:
            return ""
        return f"@{'' if self.start is None else self.start}:{'' if self.end is None else self.end}"

    def __str__(self) -> str:
        if self.kind == "file":
            return self.path + self.range_suffix
        return f"tfds:{self.name}:{self.split}:{self.field}{self.range_suffix}"


def _parse_bound(text: str) -> int | str | None:
    if not text:
        return None
    if text.endswith("%"):
        if text == "%" or int(text[:-1]) > 100:
            raise ValueError(text)
        return text
    return int(text)


def _parse_range(spec: str, text: str) -> tuple[int | str | None, int | str | None]:
    m = _RANGE_RE.fullmatch(text)
    try:
        if not m:
            raise ValueError(text)
        start, end = _parse_bound(m[1]), _parse_bound(m[2])
    except ValueError:
        raise DataError(
            f"bad line range {text!r} in source spec {spec!r}: expected START:END, each optional, "
            "a line index or a percentage of the lines (e.g. @0:14500, @14500:, @0:80%, @80%:)"
        ) from None
    if isinstance(start, int) and isinstance(end, int) and start > end:
        raise DataError(f"bad line range in source spec {spec!r}: START {start} > END {end}")
    return start, end


def parse_spec(spec: str) -> Spec:
    """Parses `PATH[@START:END]` or `tfds:NAME[/CONFIG]:SPLIT:FIELD[@START:END]`."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"empty source spec {spec!r}: expected PATH[@START:END] or "
            "tfds:NAME[/CONFIG]:SPLIT:FIELD[@START:END]"
        )
    if spec != spec.strip():
        raise DataError(f"source spec {spec!r} has leading/trailing whitespace")
    if "\x00" in spec:  # the OS would refuse the path with a bare ValueError naming nothing
        raise DataError(f"source spec {spec!r} contains a NUL character")
    body, start, end = spec, None, None
    head, at, tail = spec.rpartition("@")
    # A '@' followed by a path separator belongs to the path (e.g. /data/user@host/train.en).
    if at and "/" not in tail and os.sep not in tail:
        body = head
        start, end = _parse_range(spec, tail)
    if body.startswith("tfds:"):
        m = _TFDS_RE.fullmatch(body)
        if not m:
            raise DataError(
                f"malformed TFDS source spec {spec!r}: expected tfds:NAME[/CONFIG]:SPLIT:FIELD"
                "[@START:END], e.g. tfds:wmt14_translate/fr-en:train:fr"
            )
        return Spec(
            "tfds", name=m["name"], split=m["split"], field=m["field"], start=start, end=end
        )
    if not body:
        raise DataError(f"source spec {spec!r} has a line range but no PATH")
    return Spec("file", path=body, start=start, end=end)


def _as_spec(spec: str | Spec) -> Spec:
    return spec if isinstance(spec, Spec) else parse_spec(spec)


def resolve_path(spec: Spec, root: str | os.PathLike) -> Path:
    """A file spec's path: as given if absolute, else under ``root``."""
    path = Path(spec.path).expanduser()
    return path if path.is_absolute() else Path(root) / path


def _resolve_bound(bound: int | str | None, n: int, default: int) -> int:
    if bound is None:
        return default
    if isinstance(bound, str):  # "80%": the first 80% of the n items, rounded down
        return n * int(bound[:-1]) // 100
    return bound


def line_bounds(spec: Spec, n: int, where: str, unit: str = "lines") -> tuple[int, int]:
    """The spec's range as [start, end) over n items; out of bounds or empty is an error."""
    start, end = _resolve_bound(spec.start, n, 0), _resolve_bound(spec.end, n, n)
    if start > n or end > n:
        raise DataError(f"{where}: range {spec.range_suffix} is beyond the end ({n} {unit})")
    if start > end:
        raise DataError(f"{where}: range {spec.range_suffix} starts after it ends ({n} {unit})")
    if start == end:
        what = f"range {spec.range_suffix} of " if spec.range_suffix else ""
        raise DataError(f"{where}: {what}no {unit}; expected at least one")
    return start, end


def _check_mode(on_invalid_utf8: str) -> None:
    if on_invalid_utf8 not in ON_INVALID_UTF8:
        raise ValueError(
            f"on_invalid_utf8 must be one of {ON_INVALID_UTF8}, got {on_invalid_utf8!r}"
        )


def read_lines(
    spec: str | Spec,
    root: str | os.PathLike = "",
    *,
    max_chars: int = MAX_CHARS,
    on_invalid_utf8: str = "error",
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Reads the lines (or TFDS text field values) a spec names, validated.

    Empty lines are kept as '' (the batcher decides what to do with them). `data_dir` is the
    TFDS data directory (None = TFDS default). `manual_dir`, if given, lets a project-local
    builder (see tfds_local) that is not yet prepared be prepared from those local files.
    """
    _check_mode(on_invalid_utf8)
    s = _as_spec(spec)
    if s.kind == "tfds":
        return _read_tfds(
            s,
            max_chars=max_chars,
            on_invalid_utf8=on_invalid_utf8,
            data_dir=data_dir,
            manual_dir=manual_dir,
        )
    path = resolve_path(s, root)
    lines = read_text_file(path, max_chars=max_chars, on_invalid_utf8=on_invalid_utf8)
    start, end = line_bounds(s, len(lines), str(path))
    return lines[start:end]


def line_count(
    spec: str | Spec,
    root: str | os.PathLike = "",
    *,
    data_dir: str | os.PathLike | None = None,
) -> int:
    """Number of lines (examples) a spec selects, without decoding or validating the text."""
    s = _as_spec(spec)
    if s.kind == "tfds":
        builder = prepared_builder(s, data_dir=data_dir, manual_dir=None)
        start, end = line_bounds(s, builder.info.splits[s.split].num_examples, str(s), "examples")
        return end - start
    path = resolve_path(s, root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    n = data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))
    start, end = line_bounds(s, n, str(path))
    return end - start


def first_line(spec: str | Spec, root: str | os.PathLike = "") -> int:
    """The 0-based index of the first line a spec selects, a "80%" start resolved against the
    file's length (e.g. for the file's own line numbers in errors); the range is not checked."""
    s = _as_spec(spec)
    if not isinstance(s.start, str):
        return s.start or 0
    return _resolve_bound(s.start, line_count(replace(s, start=None, end=None), root), 0)


def read_aligned(
    specs: Sequence[str | Spec], root: str | os.PathLike = "", **kw: Any
) -> list[list[str]]:
    """Reads several line-aligned sources; all must have the same number of lines."""
    sides = [read_lines(s, root, **kw) for s in specs]
    names = [
        str(resolve_path(p, root)) + p.range_suffix if p.kind == "file" else str(p)
        for p in map(_as_spec, specs)
    ]
    check_aligned(names, [len(side) for side in sides])
    return sides


def read_parallel(
    src_spec: str | Spec, tgt_spec: str | Spec, root: str | os.PathLike = "", **kw: Any
) -> tuple[list[str], list[str]]:
    """Reads a parallel pair (TLM / supervised MT); both sides must have equal line counts."""
    src, tgt = read_aligned([src_spec, tgt_spec], root, **kw)
    return src, tgt


def source_path(
    spec: str | Spec, root: str | os.PathLike = "", *, data_dir: str | os.PathLike | None = None
) -> Path:
    """What a spec reads on disk: its file, or a tfds: spec's prepared dataset directory (every
    split's files). A resumed run checks these for changes (``xlm_jax.core.data_sources``)."""
    s = _as_spec(spec)
    if s.kind == "file":
        return resolve_path(s, root)
    return Path(os.fspath(prepared_builder(s, data_dir=data_dir, manual_dir=None).data_dir))


# ---------------------------------------------------------------------------------------- TFDS


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError(f"tfds: sources need tensorflow-datasets installed ({e})") from e
    return tfds


def _local_builders() -> dict[str, type]:
    from xlm_jax.data import tfds_local  # imported here: it imports tensorflow_datasets

    return dict(tfds_local.LOCAL_BUILDERS)


def _tfds_builder(name: str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    """Constructs a builder by 'name[/config]'; never downloads or prepares."""
    tfds = _import_tfds()
    base, _, config = name.partition("/")
    local = _local_builders()
    if base in local:
        try:
            return local[base](config=config or None, data_dir=data_dir)
        except (ValueError, KeyError, AssertionError) as e:  # bad config name
            raise DataError(f"tfds:{name}: cannot construct the builder: {e}") from e
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    for attempt in range(2):
        try:
            return tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            if attempt:
                raise DataError(f"tfds:{name}: unknown TFDS dataset {base!r}") from None
        except Exception as e:  # e.g. an unknown config: TFDS raises assorted types
            raise DataError(f"tfds:{name}: cannot construct the TFDS builder: {e}") from e
        for pkg in _TFDS_LEGACY_PACKAGES:
            try:
                importlib.import_module(f"tensorflow_datasets.{pkg}")
            except ImportError:
                continue  # optional deps missing; other packages may still hold `name`
    raise AssertionError("unreachable")


def _prepare_hint(name: str, data_dir: str | os.PathLike | None) -> str:
    base = name.partition("/")[0]
    dd = f" --data_dir={data_dir}" if data_dir else ""
    if base in _local_builders():
        return (
            f"prepare it from local files with xlm_jax.data.sources.prepare_local({name!r}, "
            f"manual_dir, data_dir), or pass manual_dir= to read_lines"
        )
    return (
        f"prepare it (needs network) with `tfds build {name}{dd} --file_format=array_record` "
        "(array_record is readable without TensorFlow)"
    )


def prepared_builder(
    spec: Spec,
    *,
    data_dir: str | os.PathLike | None,
    manual_dir: str | os.PathLike | None,
) -> tfds.core.DatasetBuilder:
    """The builder of a tfds: spec, prepared (from ``manual_dir`` for a local builder, else an
    immediate ``DataError`` with the command that prepares it) and holding the spec's split."""
    builder = _tfds_builder(spec.name, data_dir)
    if not builder.is_prepared():
        if manual_dir is not None and spec.name.partition("/")[0] in _local_builders():
            builder = prepare_local(spec.name, manual_dir, data_dir)
        else:
            where = data_dir if data_dir is not None else f"(TFDS default) {builder.data_dir_root}"
            raise DataError(
                f"{spec}: TFDS dataset {spec.name!r} is not prepared in data_dir "
                f"{where}; {_prepare_hint(spec.name, data_dir)}"
            )
    if spec.split not in builder.info.splits:
        raise DataError(
            f"{spec}: no split {spec.split!r}; expected one of {sorted(builder.info.splits)}"
        )
    return builder


def _feature(features: Any, field: str, spec: Spec) -> Any:
    node = features
    for part in field.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError):
            keys = sorted(node.keys()) if hasattr(node, "keys") else []
            raise DataError(f"{spec}: no feature {field!r}; expected one of {keys}") from None
    return node


def _read_tfds(
    spec: Spec,
    *,
    max_chars: int,
    on_invalid_utf8: str,
    data_dir: str | os.PathLike | None,
    manual_dir: str | os.PathLike | None,
) -> list[str]:
    tfds = _import_tfds()
    builder = prepared_builder(spec, data_dir=data_dir, manual_dir=manual_dir)
    feature = _feature(builder.info.features, spec.field, spec)
    if not isinstance(feature, tfds.features.Text):
        raise DataError(
            f"{spec}: feature {spec.field!r} is {type(feature).__name__}; "
            "expected a tfds.features.Text feature"
        )
    n = builder.info.splits[spec.split].num_examples
    start, end = line_bounds(spec, n, str(spec), "examples")
    fmt = builder.info.file_format.value if builder.info.file_format else "tfrecord"
    if fmt in RANDOM_ACCESS_FORMATS:
        source = builder.as_data_source(split=spec.split)
        examples = source.__getitems__(range(start, end))
    else:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise DataError(
                f"{spec}: dataset is stored as {fmt}, which needs TensorFlow to read (not "
                "installed); re-prepare it with --file_format=array_record"
            ) from None
        ds = builder.as_dataset(split=f"{spec.split}[{start}:{end}]", shuffle_files=False)
        examples = tfds.as_numpy(ds)
    lines = []
    for i, example in enumerate(examples, start):
        value = _feature(example, spec.field, spec)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                if on_invalid_utf8 == "error":
                    raise DataError(
                        f"{spec}: example {i}: invalid UTF-8 ({e.reason}); expected "
                        "UTF-8 text, or pass on_invalid_utf8='replace'"
                    ) from None
                value = value.decode("utf-8", errors="replace")
        if "\n" in value:
            raise DataError(
                f"{spec}: example {i}: text contains a newline; expected one sentence per example"
            )
        if len(value) > max_chars:
            raise DataError(
                f"{spec}: example {i}: text is {len(value)} characters long; "
                f"expected at most max_chars={max_chars}"
            )
        lines.append(value)
    return lines


def prepare_local(
    name_or_builder_cls: str | type,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    *,
    config: str | None = None,
) -> tfds.core.DatasetBuilder:
    """Prepares one of the project's local builders (tfds_local) from files in `manual_dir`.

    `name_or_builder_cls` is 'multi30k_local', 'tatoeba_local/fr-en' or a builder class (then
    `config` names the config). Reuses an already prepared dataset (delete it, or bump VERSION,
    after changing the source files). Catalog datasets are refused: they would download.
    """
    tfds = _import_tfds()
    local = _local_builders()
    if isinstance(name_or_builder_cls, str):
        base, _, cfg = name_or_builder_cls.partition("/")
        if base not in local:
            raise DataError(
                f"{name_or_builder_cls!r} is not a local builder (expected one of "
                f"{sorted(local)}); prepare catalog datasets with `tfds build`"
            )
        cls, config = local[base], cfg or config
    else:
        cls = name_or_builder_cls
        if cls not in local.values():
            raise DataError(f"{cls!r} is not a local builder; expected one of {sorted(local)}")
    manual = Path(manual_dir).expanduser()
    if not manual.is_dir():
        raise DataError(
            f"{manual}: manual_dir is not a directory; expected the folder holding "
            f"the source text files of {cls.name}"
        )
    try:
        builder = cls(config=config, data_dir=data_dir)
    except (ValueError, KeyError, AssertionError) as e:  # bad config name
        raise DataError(f"{cls.name}: cannot construct the builder: {e}") from e
    if not builder.is_prepared():
        # Check up front: TFDS would fail midway with an AssertionError about manual_dir.
        missing = [
            str(f)
            for cols in builder.source_files(manual).values()
            for f in cols.values()
            if not f.is_file()
        ]
        if missing:
            raise DataError(
                f"{cls.name}: missing source files {', '.join(missing)}; "
                f"expected: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        # tfds 4.9.10 needs this undeclared package to generate any dataset.
        if importlib.util.find_spec("importlib_resources") is None:
            raise DataError(
                f"{cls.name}: preparing TFDS datasets needs the package "
                "importlib_resources (pip install importlib_resources)"
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual), try_download_gcs=False
            )
        )
    return builder
