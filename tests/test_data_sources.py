"""A resumed run whose data files changed (size or content hash) is refused, or, with
``allow_data_change``, goes on with a warning and the change recorded in the checkpoint's
metadata (xlm_jax/core/data_sources.py). The pure functions on temporary files, then the loop
end to end on the toy task of tests/toy_task.py (milliseconds per step)."""

import dataclasses
import hashlib

import pytest

from tests import toy_task
from xlm_jax.core import data_sources, loop
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.data import corpus, sources

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")


def test_fingerprint_files_and_directories(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\n")
    nested = tmp_path / "dataset" / "1.0.0"
    nested.mkdir(parents=True)
    (nested / "b.rec").write_bytes(b"\x00\x01")
    (tmp_path / "dataset" / "info.json").write_text("{}")
    fp = data_sources.fingerprint([tmp_path / "a.txt", tmp_path / "dataset", tmp_path / "gone"])
    assert list(fp) == [
        str(tmp_path / "a.txt"),
        str(nested / "b.rec"),
        str(tmp_path / "dataset" / "info.json"),
    ]  # absolute, a directory's files recursively, sorted; a missing path left out
    assert fp[str(tmp_path / "a.txt")] == {
        "size": 4,
        "sha256": hashlib.sha256(b"one\n").hexdigest(),
    }


def test_changes_name_changed_missing_and_new_files_but_not_moved_ones(tmp_path):
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    a.write_text("hello\n")
    b.write_text("world\n")
    saved = data_sources.fingerprint([a, b])
    assert data_sources.changes(saved, data_sources.fingerprint([a, b])) == {}
    a.write_text("hellO\n")  # same size, other content
    b.rename(c)  # moved, same content: not a change
    diff = data_sources.changes(saved, data_sources.fingerprint([a, c]))
    assert list(diff) == ["changed"] and list(diff["changed"]) == [str(a)]
    assert diff["changed"][str(a)]["old"]["size"] == diff["changed"][str(a)]["new"]["size"]
    c.write_text("world!\n")
    diff = data_sources.changes(saved, data_sources.fingerprint([a, c]))
    assert list(diff["missing"]) == [str(b)] and list(diff["new"]) == [str(c)]


def test_check_records_refuses_or_allows(tmp_path, caplog):
    f = tmp_path / "train.en"
    f.write_text("a\nb\n")
    fresh = data_sources.check(None, [f], False, None, "")
    assert fresh == {"data_sources": data_sources.fingerprint([f]), "data_changes": []}
    old = data_sources.check({"config": {}}, [f], False, 3, "checkpoint 3")  # before this check
    assert old == fresh
    f.write_text("a\nb\nc\n")
    with pytest.raises(RuntimeError, match=r"checkpoint 3 in D[\s\S]*changed .*train.en: 4 bytes"):
        data_sources.check(fresh, [f], False, 3, "checkpoint 3 in D")
    caplog.set_level("WARNING")
    earlier = {"step": 1, "changed": {}}
    allowed = data_sources.check({**fresh, "data_changes": [earlier]}, [f], True, 3, "ckpt 3")
    assert allowed["data_sources"] == data_sources.fingerprint([f])
    assert allowed["data_changes"][0] == earlier and allowed["data_changes"][1]["step"] == 3
    assert str(f) in allowed["data_changes"][1]["changed"]["changed"]
    assert any("allow_data_change=true" in r.getMessage() for r in caplog.records)


def test_a_tfds_source_is_its_prepared_dataset_directory(shared_data, tmp_path):
    sources.prepare_local("tatoeba_local/sw-en", shared_data / "tatoeba", tmp_path)
    spec = "tfds:tatoeba_local/sw-en:test"
    text = f"sw: {spec}:sw@0:9, {spec}:sw@9:; sw-en: {spec}:sw|tatoeba/tatoeba.swh-eng.eng"
    paths = corpus.split_paths({"data.train": text}, root=shared_data, data_dir=tmp_path)
    assert paths == [
        tmp_path / "tatoeba_local" / "sw-en" / "1.0.0",
        shared_data / "tatoeba" / "tatoeba.swh-eng.eng",
    ]  # each once
    assert any("array_record" in k for k in data_sources.fingerprint(paths[:1]))


# --- the loop, end to end -----------------------------------------------------------------------


def toy_reading(path):
    """The toy task, declaring that it reads ``path``."""
    return loop.Task(
        "toy",
        lambda config, env: dataclasses.replace(toy_task.setup(config, env), sources=[path]),
        toy_task.TASK.batch_sizes,
    )


def run(task, workdir, max_steps: int, **overrides):
    config = toy_task.default_config()
    config.update_from_flattened_dict({"max_steps": max_steps, "checkpoint_every": 2, **overrides})
    return loop.run(task, config, workdir)


def meta(workdir, step: int) -> dict:
    return Checkpointer(workdir / "checkpoints", read_only=True).restore_meta(step)


def warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "allow_data_change" in r.getMessage()]


def test_a_resume_over_changed_data_is_refused_unless_allowed(tmp_path, caplog):
    data, work = tmp_path / "train.txt", tmp_path / "work"
    data.write_text("the cat\nthe dog\n")
    task = toy_reading(data)
    run(task, work, 2)
    first = meta(work, 2)["data_sources"]
    assert list(first) == [str(data)]

    data.write_text("the cat\nthe dot\n")  # one byte, same size: only the hash tells
    with pytest.raises(RuntimeError, match=rf"checkpoint 2 in .*\n  changed {data}: 16 bytes"):
        run(task, work, 4)
    data.write_text("the cat\nthe dog\na new line\n")  # appended: the size differs
    with pytest.raises(RuntimeError, match=r"16 bytes, sha256 \w+ -> 27 bytes[\s\S]*=true"):
        run(task, work, 4)
    assert Checkpointer(work / "checkpoints", read_only=True).all_steps() == [2]  # nothing ran

    caplog.set_level("WARNING")
    run(task, work, 4, allow_data_change=True)
    assert any(str(data) in m for m in warned(caplog))
    saved = meta(work, 4)
    assert saved["data_sources"][str(data)]["size"] == 27
    [change] = saved["data_changes"]
    assert (
        change["step"] == 2 and change["changed"]["changed"][str(data)]["old"] == first[str(data)]
    )

    caplog.clear()
    run(task, work, 6)  # unchanged since: resumes, no warning, the history kept
    assert warned(caplog) == []
    assert meta(work, 6)["data_changes"] == saved["data_changes"]
