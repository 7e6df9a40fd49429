"""Tests for xlm_jax.metrics: JSONL resume, TensorBoard output, summarize, progress line."""

import math
import re

import numpy as np
import pytest

from xlm_jax.core import metrics as metrics_lib
from xlm_jax.core.metrics import MetricWriter, read_jsonl, summarize


def test_jsonl_appends_across_writers(tmp_path):
    with MetricWriter(tmp_path, total_steps=10, tensorboard=False) as w:
        w.write(1, {"mlm_en/loss": np.float32(3.5), "n": np.int64(4)})
        w.write(2, {"loss": 0.25}, prefix="valid")
    # A crash mid-line must not corrupt the next run's first record.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    with MetricWriter(tmp_path, total_steps=10, tensorboard=False) as w:  # resumed run
        w.write(4, {"mlm_en/loss": 3.0})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 4]
    assert records[0]["mlm_en/loss"] == 3.5 and records[0]["n"] == 4
    assert isinstance(records[0]["n"], int)
    assert records[1]["valid/loss"] == 0.25
    assert all(isinstance(r["time"], float) for r in records)
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_event_file(tmp_path):
    with MetricWriter(tmp_path, total_steps=10) as w:
        w.write(1, {"mlm_en/loss": 3.0})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_non_primary_writes_nothing(tmp_path, capsys):
    with MetricWriter(tmp_path / "w", total_steps=10, is_primary=False) as w:
        w.write(1, {"loss": 1.0})
        w.progress(1, {"loss": 1.0}, tokens=10)
        w.progress(2, {"loss": 1.0}, tokens=10)
    assert not (tmp_path / "w").exists()
    assert capsys.readouterr().out == ""


def test_summarize():
    sums = {
        "mlm_en": {"loss_sum": np.float32(30.0), "n_pred": np.int32(10), "n_correct": 4},
        "clm_fr": {"loss_sum": 1e6, "n_pred": 2.0},  # huge loss: ppl must not overflow
        "tlm_en-fr": {"loss_sum": 0.0, "n_pred": 0, "n_correct": 0},  # not run: skipped
    }
    out = summarize(sums)
    assert out["mlm_en/loss"] == pytest.approx(3.0)
    assert out["mlm_en/acc"] == pytest.approx(40.0)
    assert out["mlm_en/ppl"] == pytest.approx(math.exp(3.0))
    assert out["clm_fr/loss"] == pytest.approx(5e5)
    assert "clm_fr/acc" not in out
    assert math.isfinite(out["clm_fr/ppl"]) and math.isfinite(np.float32(out["clm_fr/ppl"]))
    assert not any(k.startswith("tlm_en-fr") for k in out)


def test_progress_line(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
    w = MetricWriter(tmp_path, total_steps=10000, tensorboard=False)
    scalars = summarize({"mlm_en": {"loss_sum": 321.0, "n_pred": 100, "n_correct": 41.2}})
    w.progress(1000, scalars, tokens=0)
    w.progress(1200, {**scalars, "lr": 1e-4}, tokens=81000)  # 200 steps, 81k tokens in 10 s
    w.close()
    first, second = capsys.readouterr().out.splitlines()
    assert first == "step 1000/10000 | mlm_en loss 3.21 acc 41.2% ppl 24.8"
    assert second.startswith("step 1200/10000 | mlm_en loss 3.21 acc 41.2% ppl 24.8 | lr 0.0001")
    assert "| 20 steps/s 8.1k tok/s |" in second
    assert re.search(r"ETA 7m$", second)  # 8800 steps at 20 steps/s = 440 s


def test_history_table_keeps_the_last_record_of_a_step():
    from xlm_jax.core.metrics import history_table

    records = [
        {"step": 2, "valid/mlm_ppl": 9.0},
        {"step": 1, "valid/mlm_ppl": 10.0, "valid/tlm_ppl": 7.0},
        {"step": 2, "valid/mlm_ppl": 8.0},  # a resumed run logged step 2 again
        {"step": 3, "train/x": 1.0},  # no requested column: no row
    ]
    assert history_table(records, ["valid/mlm_ppl", "valid/tlm_ppl"]).splitlines() == [
        "| step | valid/mlm_ppl | valid/tlm_ppl |",
        "|---|---|---|",
        "| 1 | 10 | 7 |",
        "| 2 | 8 |  |",
    ]
