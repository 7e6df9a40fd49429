"""Prepared data (data/prepare.py, data/prepared.py): the same batches as text read in memory,
resumable preparation, and a clear error for every kind of bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from xlm_jax.core import data_sources
from xlm_jax.data import batches, corpus, prepare, prepared
from xlm_jax.data.sources import DataError
from xlm_jax.tasks import pretrain
from xlm_jax.text import tokenizer as tokenizer_lib


@pytest.fixture
def root(tmp_path, shared_data) -> Path:
    """Real sentences with the awkward cases: empty lines (one side of a pair only, too), a BOM,
    CRLF endings, a last line without its newline, a key read from two files. Skipped without
    ../shared/data (shared_data)."""

    def _lines(name: str, n: int, start: int = 0) -> list[str]:
        return (shared_data / "multi30k" / name).read_text().split("\n")[start : start + n]

    d = tmp_path / "text"
    d.mkdir()
    en, fr = _lines("train.en", 150), _lines("train.fr", 150)
    en[7] = en[40] = ""
    fr[40] = fr[90] = ""
    (d / "train.en").write_text("\ufeff" + "\n".join(en) + "\n")
    (d / "train.fr").write_text("\r\n".join(fr))  # CRLF, no final newline
    (d / "extra.en").write_text("\n".join(_lines("train.en", 30, 500)) + "\n")
    (d / "val.en").write_text("\n".join(_lines("val.en", 20)) + "\n")
    (d / "val.fr").write_text("\n".join(_lines("val.fr", 20)) + "\n")
    return d


def _config(root: Path, **overrides):
    return tiny_config(
        **{
            "langs": "en,fr",
            "data.root": str(root),
            "data.train": "en: train.en, extra.en; fr: train.fr; en-fr: train.en|train.fr",
            "data.valid": "en: val.en; en-fr: val.en|val.fr",
            "data.shard_lines": 16,  # many shards: windows cross shard boundaries
            "mlm_steps": "en,fr,en-fr",
            **overrides,
        }
    )


def _prepare(config, out: Path, **kw) -> dict:
    return prepare.prepare(config, out, root=config.data.root, **kw)


def test_prepared_batches_equal_the_in_memory_ones(root, tmp_path):
    config = _config(root)
    _prepare(config, tmp_path / "p")
    ps = prepared.PreparedSet.open(tmp_path / "p")
    # the in-memory path: all text read, the tokenizer trained on it, every sentence encoded
    langs = ["en", "fr"]
    train = corpus.read_split(config.data.train, langs, root=str(root), where="data.train")
    valid = corpus.read_split(config.data.valid, langs, root=str(root), where="data.valid")
    tok = config.tokenizer
    ref_tok = tokenizer_lib.train_tokenizer(
        corpus.tokenizer_texts(train),
        tmp_path / "ref.model",
        vocab_size=tok.vocab_size,
        alpha=tok.alpha,
        n_sentences=tok.n_sentences,
        seed=config.seed,
        character_coverage=tok.character_coverage,
    )
    assert ps.tokenizer_sha256 == ref_tok.sha256  # the streamed sample trains the same model
    train_tok = corpus.tokenize_split(train, ref_tok)
    valid_tok = corpus.tokenize_split(valid, ref_tok)
    assert len(ps.manifest["splits"]["train"]["en"]["shards"]) == 12  # 150 + 30 lines, 16 each

    ref_stream = batches.make_stream(train_tok.mono["en"])
    stream = ps.stream("train", "en")
    np.testing.assert_array_equal(stream.array(), ref_stream)
    np.testing.assert_array_equal(
        ps.counts("train", "en", ref_tok.vocab_size),
        np.bincount(ref_stream, minlength=ref_tok.vocab_size),
    )
    for rows in [(0, 4), (1, 3)]:  # a process's slice of each global batch
        kw = dict(lang_id=0, batch_size=4, length=32, seed=3, name="mlm_en", rows=rows)
        a, b = batches.StreamBatches(stream, **kw), batches.StreamBatches(ref_stream, **kw)
        for _ in range(80):  # more than an epoch (about 55 windows)
            x, y = next(a), next(b)
            for k in y:
                np.testing.assert_array_equal(x[k], y[k])
        assert a.state() == b.state() and a.epoch >= 1

    src, tgt = ps.sentences("train", "en-fr")
    ref_src, ref_tgt = train_tok.para[("en", "fr")]
    assert len(src) == 147  # lines 7, 40 and 90 have an empty side
    kw = dict(src_lang=0, tgt_lang=1, batch_size=4, length=40, seed=1, name="tlm", rows=(2, 4))
    a, b = batches.PairBatches(src, tgt, **kw), batches.PairBatches(ref_src, ref_tgt, **kw)
    assert len(a) == len(b) and a.tokens == b.tokens
    assert a.n_dropped + 3 == b.n_dropped  # the empty sides were dropped when prepared
    for _ in range(50):
        x, y = next(a), next(b)
        for k in y:
            np.testing.assert_array_equal(x[k], y[k])
    assert src.reads == 50 * 2  # two rows of each batch: only this process's rows are read

    vs, vt = ps.sentences("valid", "en-fr")
    for x, y in zip(
        batches.eval_pair_batches(vs, vt, src_lang=0, tgt_lang=1, batch_size=8, length=64),
        batches.eval_pair_batches(
            *valid_tok.para[("en", "fr")], src_lang=0, tgt_lang=1, batch_size=8, length=64
        ),
        strict=True,
    ):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    manifest = ps.manifest["splits"]["train"]
    assert manifest["en"]["dropped"] == {"an empty line": 2}
    assert manifest["en-fr"]["dropped"] == {"an empty side": 3}
    assert manifest["en"]["tokens"] == [int(sum(map(len, train_tok.mono["en"])))]


def test_worker_processes_write_the_same_shards(root, tmp_path, monkeypatch):
    config = _config(root)
    inline = _prepare(config, tmp_path / "inline")
    monkeypatch.setattr(prepare, "INLINE_BYTES", 0)
    pooled = _prepare(config, tmp_path / "pool", workers=2)
    assert pooled["shards"] == inline["shards"]  # every file's size and CRC32


def test_an_interrupted_prepare_redoes_only_unfinished_shards(root, tmp_path, monkeypatch):
    config = _config(root)
    out = tmp_path / "p"
    done = []
    real = prepare.tokenize_shard

    def failing(job):
        if len(done) == 5:
            raise KeyboardInterrupt  # as if stopped halfway
        done.append(job.shard.name)
        return real(job)

    monkeypatch.setattr(prepare, "tokenize_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _prepare(config, out)
    assert not (out / prepared.MANIFEST).exists()
    again = []
    monkeypatch.setattr(prepare, "tokenize_shard", lambda job: again.append(1) or real(job))
    manifest = _prepare(config, out)
    n_shards = len(manifest["shards"])
    assert len(again) == n_shards - 5
    assert manifest["shards"] == _prepare(config, tmp_path / "clean")["shards"]
    # a plan with fewer shards: the files of the old ones are removed with the new manifest
    (out / "shards" / "train" / "en" / ".000-00000.0.tokens.npy.x.tmp").write_bytes(b"killed")
    fewer = _prepare(_config(root, **{"data.shard_lines": 1000}), out)
    files = {p.relative_to(out / "shards").as_posix() for p in (out / "shards").rglob("*.*")}
    listed = {f for record in fewer["shards"].values() for f in record["files"]}
    assert files == listed | {f"{name}.json" for name in fewer["shards"]}
    assert len(fewer["shards"]) == 6 < n_shards


def test_parts_then_a_final_run_equal_one_run(root, tmp_path):
    config = _config(root)
    out = tmp_path / "parts"
    with pytest.raises(DataError, match="no tokenizer"):
        _prepare(config, out, part=(0, 2))
    prepare.prepare_tokenizer(config, out, root=str(root))
    for i in range(2):
        assert _prepare(config, out, part=(i, 2)) is None
    assert not (out / prepared.MANIFEST).exists()
    assert _prepare(config, out)["shards"] == _prepare(config, tmp_path / "one")["shards"]


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_damaged_shard_is_named_and_redone(root, tmp_path, damage):
    config = _config(root)
    out = tmp_path / "p"
    manifest = _prepare(config, out)
    name = "train/en/000-00003.0.tokens.npy"
    path = out / "shards" / name
    data = bytearray(path.read_bytes())
    if damage == "corrupt":
        data[-3] ^= 1
    else:
        data = data[:-6]
    path.write_bytes(bytes(data))
    expected = "corrupted" if damage == "corrupt" else "truncated"
    with pytest.raises(DataError, match=f"{path}: .*{expected}.*shard train/en/000-00003"):
        prepared.PreparedSet.open(out)
    # as training opens it: checked while the iterators are built, before any batch
    config.data.prepared = str(out)
    with pytest.raises(DataError, match=f"{path}: .*{expected}"):
        pretrain.build_data(config, tmp_path / "work", pretrain.build_steps(config))
    config.data.prepared = ""
    assert _prepare(config, out)["shards"] == manifest["shards"]  # that one shard redone
    prepared.PreparedSet.open(out)


BAD_INPUT = {  # file, its new content, the error
    "invalid UTF-8": ("extra.en", b"fine\nbad \xff byte\n", r"extra\.en:2: invalid UTF-8"),
    "over-long line": ("extra.en", b"ok\n" + b"x" * 600, r"extra\.en:2: line is 600 characters"),
    "empty file": ("train.en", b"", r"train\.en: empty file"),
    "mismatched pair": (
        "train.en",
        b"one\ntwo\n",
        r"not line-aligned .*train\.en: 2 lines.*train\.fr: 150 lines",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_named_and_loses_nothing_prepared(root, tmp_path, case):
    config = _config(root, **{"data.max_chars": 500})
    out = tmp_path / "p"
    _prepare(config, out)
    file, content, message = BAD_INPUT[case]
    (root / file).write_bytes(content)
    with pytest.raises(DataError, match=message):
        _prepare(config, out)
    # what was prepared before is still there, whole
    assert len(prepared.PreparedSet.open(out).sentences("train", "en-fr")[0]) == 147


def test_invalid_utf8_in_a_later_shard_names_the_file_line(root, tmp_path):
    lines = (root / "train.fr").read_bytes().split(b"\r\n")
    lines[100] = b"caf\xe9"  # Latin-1, in the 7th shard of 16 lines
    (root / "train.fr").write_bytes(b"\r\n".join(lines))
    with pytest.raises(DataError, match=r"train\.fr:101: invalid UTF-8"):
        _prepare(_config(root), tmp_path / "p", tokenizer_path=None)


def test_a_restart_reuses_the_prepared_data_until_a_source_changes(root, tmp_path, monkeypatch):
    config = _config(root)
    out, tok = tmp_path / "work" / "prepared", tmp_path / "work" / "tokenizer.model"
    calls = []
    real = prepare.run_jobs
    monkeypatch.setattr(
        prepare, "run_jobs", lambda jobs, w: calls.append(len(jobs)) or real(jobs, w)
    )

    def ensure():
        prepare.ensure(config, out, root=str(root), tokenizer_path=tok, workers=1)

    ensure()
    ensure()
    assert calls == [calls[0]]  # the restart tokenized nothing
    text = (root / "val.en").read_bytes()
    (root / "val.en").write_bytes(text)  # touched: a new mtime, the same bytes
    ensure()
    assert len(calls) == 1
    (root / "val.en").write_bytes(text.replace(b"A ", b"B ", 1))  # the same size
    ensure()
    assert calls[1] == 4  # only the shards of val.en (2 of 16 lines for en, 2 for en-fr)
    assert prepare.differences(prepared.read_manifest(out), config, str(root), None) == []


def test_known_hashes_are_not_computed_again(root):
    path = root / "val.en"
    stat = path.stat()
    known = {str(path): {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": "k"}}
    assert data_sources.fingerprint([path], known)[str(path)]["sha256"] == "k"
    known[str(path)]["mtime_ns"] += 1  # another mtime: hashed
    assert data_sources.fingerprint([path], known)[str(path)]["sha256"] != "k"


def test_training_refuses_a_set_prepared_with_another_tokenizer(root, tmp_path):
    config = _config(root)
    _prepare(config, tmp_path / "p")
    work = tmp_path / "work"
    other = _config(root, **{"tokenizer.vocab_size": 200})
    prepare.prepare_tokenizer(other, work, root=str(root))  # work/tokenizer.model: another one
    config.data.prepared = str(tmp_path / "p")
    steps = pretrain.build_steps(config)
    with pytest.raises(DataError, match="prepared with tokenizer sha256 .* but this workdir's"):
        pretrain.build_data(config, work, steps)


def test_training_refuses_a_set_without_a_language_it_trains(root, tmp_path):
    config = _config(root)
    _prepare(config, tmp_path / "p")
    later = _config(root, **{"data.prepared": str(tmp_path / "p"), "mlm_steps": "en,fr,fr-en"})
    with pytest.raises(DataError, match=r"mlm_steps lists 'fr-en' but data.train has no "):
        pretrain.build_data(later, tmp_path / "work", pretrain.build_steps(later))
    other = _config(root, **{"data.prepared": str(tmp_path / "p"), "data.valid": "en: val.en"})
    with pytest.raises(DataError, match="was prepared from data.valid="):
        pretrain.build_data(other, tmp_path / "work2", pretrain.build_steps(other))


def test_a_manifest_of_another_format_or_missing_is_refused(root, tmp_path):
    with pytest.raises(DataError, match="no manifest; .* is not a finished prepared set"):
        prepared.PreparedSet.open(tmp_path)
    _prepare(_config(root), tmp_path / "p")
    file = tmp_path / "p" / prepared.MANIFEST
    file.write_text(json.dumps({**json.loads(file.read_text()), "format": 0}))
    with pytest.raises(DataError, match=f"format 0, this xlm_jax reads format {prepared.FORMAT}"):
        prepared.PreparedSet.open(tmp_path / "p")


REPO = Path(__file__).parent.parent


def _cli(args: list[str], env: dict | None = None, script: str = "") -> dict | None:
    """``python -m xlm_jax.prepare`` (or ``script``) on configs/demo.py, small settings."""
    import os
    import subprocess
    import sys

    command = (["bash", script, "--"] if script else [sys.executable, "-m", "xlm_jax.prepare"]) + [
        "--config=configs/demo.py",
        *args,
    ]
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", **(env or {})}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_slurm_array_parts_then_the_manifest_equal_one_run(root, tmp_path):
    """launch/prepare_array.sbatch as two array tasks (its SLURM variables set by hand)."""
    settings = [
        "--config.langs=en,fr",
        f"--config.data.root={root}",
        "--config.data.train=en: train.en, extra.en; fr: train.fr; en-fr: train.en|train.fr",
        "--config.data.valid=en: val.en",
        "--config.data.shard_lines=40",
        "--config.tokenizer.vocab_size=300",
        "--workers=1",
    ]
    parts = tmp_path / "parts"
    _cli([f"--out={parts}", "--tokenizer_only", *settings])
    for i in range(2):
        array = {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2"}
        out = _cli([f"--out={parts}", *settings], array, "launch/prepare_array.sbatch")
        assert f"part {i}/2" in out.stdout
    assert not (parts / prepared.MANIFEST).exists()
    _cli([f"--out={parts}", *settings])
    _cli([f"--out={tmp_path / 'one'}", *settings])
    manifests = [prepared.read_manifest(d) for d in (parts, tmp_path / "one")]
    assert manifests[0]["shards"] == manifests[1]["shards"]
    assert "0 to do" in _cli([f"--out={parts}", *settings]).stderr  # all done: nothing redone
