"""Training curves from runs' `metrics.jsonl`: one panel per metric, one line per run.

  python -m xlm_jax.plots --out=curves.png --metrics=valid/en-fr/bleu,valid/fr-en/bleu \
      mlm_init=/tmp/unmt_enfr random_init=/tmp/unmt_enfr_random

A run is `LABEL=WORKDIR` (or just `WORKDIR`, labelled by its folder name). Steps with no value for
a metric are skipped; the last record of a step wins (as after a resume).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from xlm_jax.metrics import read_jsonl


def series(records: Sequence[Mapping], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric`, in step order, one value per step."""
    by_step: dict[int, float] = {}
    for rec in records:
        if isinstance(rec.get(metric), int | float):
            by_step[int(rec["step"])] = float(rec[metric])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_runs(
    runs: Mapping[str, str | os.PathLike], metrics: Sequence[str], out: str | os.PathLike
) -> Path:
    """Writes a PNG with one panel per metric; returns its path. Raises if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    records = {label: read_jsonl(Path(w) / "metrics.jsonl") for label, w in runs.items()}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    drawn = 0
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, recs in records.items():
            steps, values = series(recs, metric)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=label)
                drawn += 1
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        raise ValueError(f"none of the runs {list(runs)} logged any of {list(metrics)}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR or WORKDIR")
    parser.add_argument("--metrics", required=True, help="comma-separated metric names")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, workdir = item.partition("=")
        runs[label if sep else Path(item).name] = workdir if sep else item
    print(plot_runs(runs, [m for m in args.metrics.split(",") if m], args.out))


if __name__ == "__main__":
    main()
