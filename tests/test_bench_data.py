"""The data-path benchmark runs at a minuscule size and its numbers agree with what it prepared
(not timed here; the training child is left out: tests/test_train.py covers training)."""

import json
from pathlib import Path

import pytest

from xlm_jax.data import prepared
from xlm_jax.data.toy import write_toy_corpus
from xlm_jax.tools import bench_data


def test_run_reports_every_section_consistent_with_the_prepared_sets(tmp_path):
    source = write_toy_corpus(tmp_path / "toy", langs=bench_data.LANGS, n_train=400, n_val=40)
    once = sum((source / f"train.{lang}").stat().st_size for lang in bench_data.LANGS)
    settings = bench_data.Settings(
        source=source, work=tmp_path / "work", n_batches=3, shard_lines=300, train=False
    )
    report = bench_data.run([2.4 * once / 1e6], settings, step_tokens_per_s=1000.0)

    (size,) = report["sizes"]
    corpus = size["corpus"]
    assert corpus["repeats"] == 2 and corpus["text_bytes"] == 2 * once
    assert corpus["train_lines"] == 800
    assert size["spm"]["lines"] == 3 * 300  # the first shard of en, fr and de
    assert set(size["prepare"]) == {"1", "2"}
    for workers, r in size["prepare"].items():
        manifest = prepared.read_manifest(Path(r["dir"]))
        train = manifest["splits"]["train"]
        assert r["tokens"] == {k: e["tokens"] for k, e in train.items()}
        assert r["sentences"] == {k: 800 for k in ("en", "fr", "de", "en-fr", "en-de")}
        # 800 lines = 3 shards of each of the 5 train keys, 1 of each of the 5 valid keys
        assert r["shards"] == 5 * 3 + 5 == len(manifest["shards"])
        sides = bench_data.LANGS + ("en", "fr", "en", "de")  # en-fr and en-de read them again
        text = {lang: (Path(corpus["dir"]) / f"train.{lang}").stat().st_size for lang in sides}
        val = {lang: (source / f"val.{lang}").stat().st_size for lang in sides}
        assert r["tokenized_bytes"] == sum(text[s] for s in sides) + sum(val[s] for s in sides)
        assert r["mb_per_s"] == pytest.approx(r["tokenized_bytes"] / 1e6 / r["wall_s"])
        assert r["per_worker_of_spm"] == pytest.approx(
            r["mb_per_s"] / int(workers) / size["spm"]["mb_per_s"]
        )
        assert 0 < r["tokenize_s"] <= r["wall_s"]
    assert size["speedup_2_workers"] == pytest.approx(
        size["prepare"]["1"]["wall_s"] / size["prepare"]["2"]["wall_s"]
    )

    # the MLM stream is </s> s1 </s> s2 ... of the prepared en sentences; TLM reads en-fr pairs
    mlm, tlm = size["pipeline"]["mlm"], size["pipeline"]["tlm"]
    en = size["prepare"]["2"]
    assert mlm["stream_tokens"] == en["tokens"]["en"][0] + en["sentences"]["en"] + 1
    assert mlm["batch"] == tlm["batch"] == [16, 128]  # configs/bench.py's rows
    for r in (mlm, tlm):
        assert r["over_step"] == pytest.approx(r["tokens_per_s"] / 1000.0)

    pad, packed = report["tlm_padding"][:2]
    assert pad["batch"] == packed["batch"] == [32, 64]  # configs/demo.py's TLM rows
    assert not pad["packed"] and packed["packed"] and packed["rows"] <= pad["rows"]
    assert packed["pad_share"] <= pad["pad_share"]
    assert pad["pairs"] + pad["dropped"] == 400 and pad["batches"] == -(-pad["pairs"] // 32)
    # a pair of n tokens fills n of the row's 64 positions: the share is close to the epoch's
    assert pad["pad_share"] == pytest.approx(1 - pad["pair_tokens"] / (pad["pairs"] * 64), abs=0.02)

    assert report["step"] == {"tokens_per_s": 1000.0, "source": "--step_tokens_per_s"} | {
        "batch": [16, 128]
    }
    assert report["machine"]["processor"]
    assert set(report["met"]) == {"per_worker_of_spm", "pipeline_over_step", "speedup_2_workers"}
    json.dumps(report)  # what --out writes
    table = bench_data.markdown(report)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and "TLM padding share" in table  # the header and one size
