"""Pictures: training curves, XNLI accuracy per language, attention maps; and their commands."""

import json

import numpy as np
import pytest
from matplotlib import image

from xlm_jax.tools import plots
from xlm_jax.tools.explore import AttentionMaps


def _run(path, records):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _png_shape(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(path).shape


def test_series_keeps_the_last_value_of_a_step_in_order():
    recs = [{"step": 2, "m": 1.0}, {"step": 1, "m": 5.0}, {"step": 2, "m": 3.0}, {"step": 3}]
    assert plots.series(recs, "m") == ([1, 2], [5.0, 3.0])


def test_plot_runs_writes_a_png(tmp_path):
    a = _run(tmp_path / "a", [{"step": s, "valid/bleu": s / 10} for s in (1, 2, 3)])
    b = _run(tmp_path / "b", [{"step": 2, "valid/bleu": 0.5}])
    out = plots.plot_runs({"a": a, "b": b}, ["valid/bleu"], tmp_path / "c.png")
    one = _png_shape(out)
    two = _png_shape(plots.plot_runs({"a": a}, ["valid/bleu", "m"], tmp_path / "e.png"))
    assert two[1] > one[1]  # a panel per metric
    stacked = _png_shape(
        plots.plot_runs({"a": a}, ["valid/bleu", "m"], tmp_path / "f.png", ncols=1)
    )
    assert stacked[0] > two[0] and stacked[1] < two[1]  # one panel a row
    with pytest.raises(ValueError, match="none of the runs"):
        plots.plot_runs({"a": a}, ["valid/other"], tmp_path / "d.png")


def _xnli_results(accs_by_epoch, select_lang="en"):
    """A results dict as xnli.finetune writes it: one record per epoch, the selections."""
    history = []
    for epoch, accs in enumerate(accs_by_epoch, 1):
        rec = {"epoch": epoch, **{f"valid/{k}/acc": v for k, v in accs.items()}}
        rec["valid/avg/acc"] = float(np.mean(list(accs.values())))
        history.append(rec)
    chosen = max(history, key=lambda h: h[f"valid/{select_lang}/acc"])
    by_avg = max(history, key=lambda h: h["valid/avg/acc"])
    return {
        "history": history,
        "selected": {select_lang: chosen, "avg": by_avg},
        "select_lang": select_lang,
    }


def test_xnli_accuracies_are_the_selected_epochs_in_the_papers_order():
    # epoch 1 is best in English, epoch 2 on average: the zero-shot protocol takes epoch 1
    results = _xnli_results([{"de": 40.0, "en": 70.0, "fr": 41.0}, {"de": 60, "en": 65, "fr": 62}])
    accs = plots.xnli_accuracies(results)
    assert list(accs) == ["en", "fr", "de"]
    assert accs == {"en": 70.0, "fr": 41.0, "de": 40.0}
    with pytest.raises(ValueError, match="no selected epoch"):
        plots.xnli_accuracies({"selected": {"en": None}, "select_lang": "en"})


def test_plot_xnli_draws_runs_side_by_side_and_the_command_reads_workdirs(tmp_path, capsys):
    a = _xnli_results([{"en": 70.0, "fr": 60.0, "de": 55.0}])
    b = _xnli_results([{"en": 60.0, "fr": 40.0}])
    for name, res in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    out = plots.plot_xnli({"a": a}, tmp_path / "one.png")
    assert _png_shape(out)[0] > 0
    plots.main(
        ["xnli", f"--out={tmp_path / 'two.png'}", f"mlm={tmp_path / 'a'}", str(tmp_path / "b")]
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "two.png")
    assert _png_shape(tmp_path / "two.png")[1] > _png_shape(out)[1]  # wider: two bars a language
    with pytest.raises(FileNotFoundError, match="no XNLI results"):
        plots.read_results(tmp_path / "missing")


def test_gap_pairs_seeds_in_order_and_the_command_prints_the_table(tmp_path, capsys):
    runs = {
        "t0": {"en": 70.0, "fr": 50.0, "de": 45.0},
        "t1": {"en": 72.0, "fr": 54.0, "de": 44.0},
        "m0": {"en": 69.0, "fr": 46.0, "de": 45.0},
        "m1": {"en": 70.0, "fr": 47.0, "de": 46.0, "es": 40.0},  # es: not in every run, left out
    }
    for name, accs in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_xnli_results([accs])))
    gap = plots.xnli_gap(
        ("tlm", [tmp_path / "t0", tmp_path / "t1"]), ("mlm", [tmp_path / "m0", tmp_path / "m1"])
    )
    assert gap.langs == ["en", "fr", "de", "avg"]
    # seed pairs (t0, m0) and (t1, m1); avg = each run's mean over the common languages
    np.testing.assert_allclose(gap.gap[:, :3], [[1.0, 4.0, 0.0], [2.0, 7.0, -2.0]])
    np.testing.assert_allclose(gap.gap[:, 3], [55.0 - 160 / 3, 170 / 3 - 163 / 3])
    rows = gap.rows()
    assert rows[0]["en"] == "71.0 (70.0..72.0)" and rows[2]["fr"] == "+5.5 (+4.0..+7.0)"
    assert rows[2]["de"] == "-1.0 (-2.0..+0.0)" and rows[2][""] == "tlm − mlm"
    with pytest.raises(ValueError, match="pair the seeds one to one"):
        plots.xnli_gap(("tlm", [tmp_path / "t0"]), ("mlm", [tmp_path / "m0", tmp_path / "m1"]))
    t, m = (",".join(str(tmp_path / f"{k}{i}") for i in range(2)) for k in "tm")
    plots.main(["gap", f"--out={tmp_path / 'gap.png'}", f"tlm={t}", f"mlm={m}"])
    out = capsys.readouterr().out
    assert "| tlm − mlm | +1.5 (+1.0..+2.0) | +5.5 (+4.0..+7.0) |" in out
    assert out.strip().endswith(str(tmp_path / "gap.png")) and _png_shape(tmp_path / "gap.png")


def _maps(n_layers=2, n=6):
    rng = np.random.default_rng(0)
    w = rng.random((n_layers, 3, n, n)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    return AttentionMaps(["</s>", "\u2581a", "</s>", "</s>", "\u2581b", "</s>"], w, 3, ("en", "fr"))


def test_plot_attention_has_a_panel_per_layer(tmp_path):
    both = _png_shape(plots.plot_attention(_maps(), tmp_path / "all.png"))
    one = _png_shape(plots.plot_attention(_maps(), tmp_path / "one.png", layers=[-1], head=2))
    assert both[1] > 1.5 * one[1]


def test_the_curves_command_keeps_its_original_form(tmp_path, capsys):
    run = _run(tmp_path / "r", [{"step": 1, "valid/bleu": 1.0}])
    plots.main([f"--out={tmp_path / 'c.png'}", "--metrics=valid/bleu", f"x={run}"])
    plots.main(["curves", f"--out={tmp_path / 'd.png'}", "--metrics=valid/bleu", str(run)])
    assert capsys.readouterr().out.split() == [str(tmp_path / "c.png"), str(tmp_path / "d.png")]
