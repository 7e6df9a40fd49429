"""Training curves from metrics.jsonl."""

import json

import pytest

from xlm_jax import plots


def _run(path, records):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_series_keeps_the_last_value_of_a_step_in_order():
    recs = [{"step": 2, "m": 1.0}, {"step": 1, "m": 5.0}, {"step": 2, "m": 3.0}, {"step": 3}]
    assert plots.series(recs, "m") == ([1, 2], [5.0, 3.0])


def test_plot_runs_writes_a_png(tmp_path):
    a = _run(tmp_path / "a", [{"step": s, "valid/bleu": s / 10} for s in (1, 2, 3)])
    b = _run(tmp_path / "b", [{"step": 2, "valid/bleu": 0.5}])
    out = plots.plot_runs({"a": a, "b": b}, ["valid/bleu"], tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the runs"):
        plots.plot_runs({"a": a}, ["valid/other"], tmp_path / "d.png")
