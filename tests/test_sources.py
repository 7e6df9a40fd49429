"""Tests for xlm_jax.data.sources and the TF-free local TFDS builders (xlm_jax.data.tfds_local)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from xlm_jax.data.sources import (
    DataError,
    Spec,
    line_count,
    parse_spec,
    prepare_local,
    read_aligned,
    read_lines,
    read_parallel,
)

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "multi30k").is_dir() or not (SHARED / "tatoeba").is_dir(),
    reason=f"real data not found at {SHARED} (expected ../shared/data beside the repo)",
)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------ parse_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("train.en", Spec("file", path="train.en")),
        ("train.en@0:14500", Spec("file", path="train.en", start=0, end=14500)),
        ("train.en@14500:", Spec("file", path="train.en", start=14500)),
        ("train.en@:2", Spec("file", path="train.en", end=2)),
        ("train.en@:", Spec("file", path="train.en")),
        ("/data/user@host/train.en", Spec("file", path="/data/user@host/train.en")),
        (
            "tfds:multi30k_local:train:en",
            Spec("tfds", name="multi30k_local", split="train", field="en"),
        ),
        (
            "tfds:wmt14_translate/fr-en:train:fr@5:",
            Spec("tfds", name="wmt14_translate/fr-en", split="train", field="fr", start=5),
        ),
    ],
)
def test_parse_spec_good(spec: str, expected: Spec) -> None:
    parsed = parse_spec(spec)
    assert parsed == expected
    assert parse_spec(str(parsed)) == parsed  # str() is a spec again


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty source spec"),
        (" train.en", "whitespace"),
        ("train.en@a:b", "bad line range"),
        ("train.en@5", "bad line range"),
        ("train.en@-1:2", "bad line range"),
        ("train.en@5:2", "START 5 > END 2"),
        ("@0:2", "no PATH"),
        ("tfds:multi30k_local", "malformed TFDS source spec"),
        ("tfds:multi30k_local:train", "malformed TFDS source spec"),
        ("tfds:multi 30k:train:en", "malformed TFDS source spec"),
        ("tfds:multi30k_local:train:en@x", "bad line range"),
    ],
)
def test_parse_spec_malformed(spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_spec(spec)


# ------------------------------------------------------------------------------------ text files


def test_read_lines_basic_ranges_and_root(tmp_path: Path) -> None:
    write(tmp_path, "c.txt", "a\nb\nc\nd\n")
    assert read_lines(str(tmp_path / "c.txt")) == ["a", "b", "c", "d"]
    assert read_lines("c.txt", tmp_path) == ["a", "b", "c", "d"]  # relative to root
    assert read_lines("c.txt@0:2", tmp_path) == ["a", "b"]
    assert read_lines("c.txt@2:", tmp_path) == ["c", "d"]
    assert line_count("c.txt@1:", tmp_path) == 3


def test_line_endings_empty_lines_and_separators(tmp_path: Path) -> None:
    # CRLF stripped; empty lines kept; no final newline; U+2028 and \x0c are not line breaks;
    # a UTF-8 BOM is dropped.
    write(tmp_path, "w.txt", "\ufeffa\r\n\r\nb\u2028c\x0cd\r\nlast".encode())
    assert read_lines("w.txt", tmp_path) == ["a", "", "b\u2028c\x0cd", "last"]
    assert line_count("w.txt", tmp_path) == 4


def test_invalid_utf8_error_and_replace(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.txt", b"ok\nfine\nbad \xff here\nend\n")
    with pytest.raises(DataError, match="invalid UTF-8") as e:
        read_lines(str(path))
    assert f"{path}:3" in str(e.value)
    # The whole file is validated, not just the selected range.
    with pytest.raises(DataError, match=r"bad\.txt:3"):
        read_lines(f"{path}@0:2")
    lines = read_lines(str(path), on_invalid_utf8="replace")
    assert lines == ["ok", "fine", "bad \ufffd here", "end"]  # replaced, never dropped
    with pytest.raises(ValueError, match="on_invalid_utf8"):
        read_lines(str(path), on_invalid_utf8="ignore")


def test_too_long_line(tmp_path: Path) -> None:
    path = write(tmp_path, "long.txt", "short\n" + "x" * 12 + "\n")
    with pytest.raises(DataError, match="12 characters") as e:
        read_lines(str(path), max_chars=10)
    assert f"{path}:2" in str(e.value)
    assert read_lines(str(path), max_chars=12)[1] == "x" * 12


def test_empty_missing_and_directory(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.txt", b"")
    with pytest.raises(DataError, match="empty file") as e:
        read_lines(str(empty))
    assert str(empty) in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        read_lines("nope.txt", tmp_path)
    with pytest.raises(DataError, match="no such file"):
        line_count("nope.txt", tmp_path)
    with pytest.raises(DataError, match="directory"):
        read_lines(str(tmp_path))


def test_ranges_beyond_end_or_empty(tmp_path: Path) -> None:
    write(tmp_path, "three.txt", "a\nb\nc\n")
    with pytest.raises(DataError, match=r"three\.txt: range @0:10 is beyond the end \(3 lines\)"):
        read_lines("three.txt@0:10", tmp_path)
    with pytest.raises(DataError, match="beyond the end"):
        read_lines("three.txt@4:", tmp_path)
    with pytest.raises(DataError, match="no lines"):
        read_lines("three.txt@3:", tmp_path)  # at the end: valid bounds, but nothing selected
    with pytest.raises(DataError, match="beyond the end"):
        line_count("three.txt@0:4", tmp_path)


def test_read_parallel(tmp_path: Path) -> None:
    write(tmp_path, "p.en", "a\nb\nc\n")
    write(tmp_path, "p.fr", "x\ny\nz\n")
    write(tmp_path, "short.fr", "x\ny\n")
    assert read_parallel("p.en", "p.fr", tmp_path) == (["a", "b", "c"], ["x", "y", "z"])
    assert read_parallel("p.en@1:", "short.fr", tmp_path) == (["b", "c"], ["x", "y"])
    with pytest.raises(DataError, match="not line-aligned") as e:
        read_parallel("p.en", "short.fr", tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / 'p.en'}: 3 lines" in msg and f"{tmp_path / 'short.fr'}: 2 lines" in msg
    assert read_aligned(["p.en", "p.fr", "p.en@:3"], tmp_path)[2] == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------ TFDS


@pytest.fixture(scope="module")
def multi30k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED / "multi30k").is_dir():
        pytest.skip(f"real data not found at {SHARED / 'multi30k'}")
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = prepare_local("multi30k_local", SHARED / "multi30k", data_dir)
    assert builder.info.file_format.value == "array_record"
    return data_dir


@needs_shared
def test_multi30k_local_round_trip(multi30k_dir: Path) -> None:
    val_de = read_lines("val.de", SHARED / "multi30k")
    assert read_lines("tfds:multi30k_local:validation:de", data_dir=multi30k_dir) == val_de
    # File order is kept, so the UNMT half-split ranges mean the same on both sides.
    assert read_lines(
        "tfds:multi30k_local:validation:en@507:", data_dir=multi30k_dir
    ) == read_lines("val.en@507:", SHARED / "multi30k")
    assert line_count("tfds:multi30k_local:train:fr@14500:", data_dir=multi30k_dir) == 14500
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules  # read with no TensorFlow at all


@needs_shared
def test_tfds_spec_errors(multi30k_dir: Path) -> None:
    with pytest.raises(DataError, match="no split 'dev'"):
        read_lines("tfds:multi30k_local:dev:de", data_dir=multi30k_dir)
    with pytest.raises(DataError, match="no feature 'xx'"):
        read_lines("tfds:multi30k_local:test:xx", data_dir=multi30k_dir)
    with pytest.raises(DataError, match=r"beyond the end \(1000 examples\)"):
        read_lines("tfds:multi30k_local:test:en@0:1001", data_dir=multi30k_dir)


@needs_shared
def test_tatoeba_local_prepared_on_demand(tmp_path: Path) -> None:
    spec = "tfds:tatoeba_local/sw-en:test:sw"
    with pytest.raises(DataError, match="not prepared.*prepare_local"):
        read_lines(spec, data_dir=tmp_path)
    got = read_lines(spec, data_dir=tmp_path, manual_dir=SHARED / "tatoeba")
    assert got == read_lines("tatoeba.swh-eng.swh", SHARED / "tatoeba")
    assert read_lines("tfds:tatoeba_local/sw-en:test:en@380:", data_dir=tmp_path) == read_lines(
        "tatoeba.swh-eng.eng@380:", SHARED / "tatoeba"
    )


def test_prepare_local_validates_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a local builder"):
        prepare_local("wmt14_translate/de-en", tmp_path, tmp_path)
    with pytest.raises(DataError, match="manual_dir is not a directory"):
        prepare_local("tatoeba_local/fr-en", tmp_path / "nope", tmp_path)
    with pytest.raises(DataError, match=r"missing source files .*tatoeba\.fra-eng\.fra"):
        prepare_local("tatoeba_local/fr-en", tmp_path, tmp_path / "tfds")
    with pytest.raises(DataError, match="cannot construct"):
        prepare_local("tatoeba_local/xx-en", tmp_path, tmp_path / "tfds")


def test_prepare_local_reports_misaligned_sources(tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    manual.mkdir()
    write(manual, "tatoeba.fra-eng.fra", "Bonjour.\nMerci.\n")
    write(manual, "tatoeba.fra-eng.eng", "Hello.\n")
    with pytest.raises(DataError, match="not line-aligned"):
        prepare_local("tatoeba_local/fr-en", manual, tmp_path / "tfds")
    write(manual, "tatoeba.fra-eng.eng", "Hello.\nThanks.\n")
    prepare_local("tatoeba_local/fr-en", manual, tmp_path / "tfds")  # the failed try left nothing
    assert read_lines("tfds:tatoeba_local/fr-en:test:fr", data_dir=tmp_path / "tfds") == [
        "Bonjour.",
        "Merci.",
    ]


def test_unprepared_catalog_dataset_fails_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(DataError, match="not prepared in data_dir") as e:
        read_lines("tfds:wmt14_translate/de-en:train:de", data_dir=tmp_path)
    assert time.monotonic() - t0 < 5, "must not try to download"
    assert "tfds build wmt14_translate/de-en" in str(e.value)
    assert not any(tmp_path.iterdir()), "nothing may be written to data_dir"
    with pytest.raises(DataError, match="unknown TFDS dataset"):
        read_lines("tfds:no_such_dataset_xyz:train:en", data_dir=tmp_path)


def test_percent_ranges_split_a_file_without_overlap(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("".join(f"{i}\n" for i in range(7)))
    head = read_lines("x.txt@0:80%", tmp_path)
    tail = read_lines("x.txt@80%:", tmp_path)
    assert head == [str(i) for i in range(5)] and tail == ["5", "6"]  # 80% of 7 = 5 (floor)
    assert read_lines("x.txt@50%:100%", tmp_path) == ["3", "4", "5", "6"]
    for bad in ("x.txt@0:101%", "x.txt@%:", "x.txt@1.5%:"):
        with pytest.raises(DataError, match="bad line range"):
            read_lines(bad, tmp_path)
    with pytest.raises(DataError, match="starts after it ends"):
        read_lines("x.txt@6:50%", tmp_path)
