"""Result tables and charts: CSV, markdown (the paper's language columns, the average last) and a
bar chart per language.

``write_results`` / ``write_sweep`` lay out the results dicts of ``xnli.finetune`` /
``xnli.run_sweep``; ``retrieval.write_retrieval`` uses the same table writers. Every file is
written atomically (``files.write_atomic``), so a reader never sees half a table.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xlm_jax.core.files import write_atomic
from xlm_jax.data.nli import PAPER_LANGS

# The evaluated splits of a fine-tuning record, in table order.
SPLITS = ("valid", "test", "translate_test")


def ordered_langs(langs: Sequence[str]) -> list[str]:
    """Languages in the paper's column order, any others after them in their given order."""
    return [lang for lang in PAPER_LANGS if lang in langs] + [
        lang for lang in langs if lang not in PAPER_LANGS
    ]


def _langs_of(record: Mapping[str, Any], split: str) -> list[str]:
    return [
        k.split("/")[1]
        for k in record
        if k.startswith(f"{split}/") and k.endswith("/acc") and k.split("/")[1] != "avg"
    ]


def result_rows(results: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Table 1-style rows: per split and selection, the selected epoch's accuracy per language."""
    history = results["history"]
    if not history:
        return ["row", "epoch"], []
    langs = ordered_langs(
        list(dict.fromkeys(lang for h in history for s in SPLITS for lang in _langs_of(h, s)))
    )
    columns = ["row", "epoch", *langs, "avg"]
    rows = []
    untrained = [h for h in history if h["epoch"] == 0]
    for split in SPLITS:
        if not any(f"{split}/avg/acc" in h for h in history):
            continue
        picks = [
            (f"selected by {by} valid", results["selected"].get(by)) for by in results["selected"]
        ]
        if untrained:
            picks.append(("untrained head", untrained[0]))
        for label, record in picks:
            if record is None:
                continue
            row = {"row": f"{split}, {label}", "epoch": record["epoch"]}
            for lang in [*langs, "avg"]:
                value = record.get(f"{split}/{lang}/acc")
                row[lang] = None if value is None else round(value, 2)
            rows.append(row)
    return columns, rows


def csv_bytes(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    """A CSV table of ``columns``; a missing or None cell is empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buf.getvalue().encode()


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of ``columns``; floats with one decimal, a missing or None cell empty."""

    def cell(v):
        if v is None:
            return ""
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(workdir: Path, results: Mapping[str, Any]) -> None:
    """``results.json`` (everything), ``results.csv`` / ``results.md`` (the table),
    ``results.png`` (per-language validation accuracy at the selected epoch)."""
    columns, rows = result_rows(results)
    write_atomic(workdir / "results.csv", csv_bytes(columns, rows))
    head = (
        f"# XNLI {results['mode']}\n\n"
        f"Encoder: {results['init']}. Fine-tuned on {results['n_train']} pairs "
        f"({', '.join(results['train_langs'])}), batch {results['batch_size']}, "
        f"lr {results['lr_e']:g} (encoder) / {results['lr_p']:g} (head), rows of "
        f"{results['row_length']} tokens. Accuracy (%); the model is selected by the "
        f"{results['select_lang']} validation accuracy (no target-language labels); the epoch "
        "the language average would pick is shown for reference.\n\n"
    )
    write_atomic(workdir / "results.md", (head + markdown_table(columns, rows)).encode())
    write_atomic(workdir / "results.json", json.dumps(results, indent=1).encode())
    chosen = results["selected"].get(results["select_lang"])
    if chosen is not None:
        plot_accuracy(
            workdir / "results.png",
            {
                lang: chosen[f"valid/{lang}/acc"]
                for lang in ordered_langs(_langs_of(chosen, "valid"))
            },
            title=f"XNLI {results['mode']}: validation accuracy\n"
            f"epoch {chosen['epoch']}, selected by {results['select_lang']}",
        )


def plot_accuracy(
    path: Path, accs: Mapping[str, float], *, title: str, chance: float = 100 / 3
) -> None:
    """A bar per language plus the average; a dashed line at chance."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [*accs, "avg"]
    values = [*accs.values(), float(np.mean(list(accs.values())))]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(names) + 1.5), 3.2))
    bars = ax.bar(names, values, color=["#4c72b0"] * len(accs) + ["#dd8452"])
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(100.0, max(values) + 5))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_sweep(workdir: Path, summary: Sequence[Mapping[str, Any]], select_lang: str) -> None:
    """``sweep.csv`` / ``sweep.md``: each run's validation accuracy at its selected epoch."""
    langs: list[str] = []
    for s in summary:
        chosen = s["results"]["selected"].get(select_lang)
        if chosen:
            langs += [x for x in _langs_of(chosen, "valid") if x not in langs]
    langs = ordered_langs(langs)
    columns = ["run", "lr", "batch_size", "epoch", *langs, "avg", "epoch_by_avg", "avg_by_avg"]
    rows = []
    for s in summary:
        sel = s["results"]["selected"]
        chosen, by_avg = sel.get(select_lang), sel.get("avg")
        row: dict[str, Any] = {"run": s["run"], "lr": s["lr"], "batch_size": s["batch_size"]}
        if chosen:
            row["epoch"] = chosen["epoch"]
            for lang in [*langs, "avg"]:
                v = chosen.get(f"valid/{lang}/acc")
                row[lang] = None if v is None else round(v, 2)
        if by_avg:
            row["epoch_by_avg"] = by_avg["epoch"]
            row["avg_by_avg"] = round(by_avg["valid/avg/acc"], 2)
        rows.append(row)
    write_atomic(workdir / "sweep.csv", csv_bytes(columns, rows))
    scored = [r for r in rows if r.get(select_lang) is not None]
    best = max(scored, key=lambda r: r[select_lang])["run"] if scored else "none"
    head = (
        "# XNLI sweep\n\nValidation accuracy (%) at each run's epoch selected by "
        f"{select_lang}; `epoch_by_avg` / `avg_by_avg`: the epoch and average the language "
        f"average would pick. Best run by {select_lang} validation accuracy: **{best}**.\n\n"
    )
    write_atomic(workdir / "sweep.md", (head + markdown_table(columns, rows)).encode())
