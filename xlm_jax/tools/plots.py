"""Pictures of runs: training curves, XNLI accuracy per language, attention maps.

  # curves from metrics.jsonl: one panel per metric, one line per run
  python -m xlm_jax.plots --out=curves.png --metrics=valid/en-fr/bleu,valid/fr-en/bleu \
      mlm_init=/tmp/unmt_enfr random_init=/tmp/unmt_enfr_random
  # XNLI zero-shot accuracy per language (results.json of --mode=xnli runs), one bar per run
  python -m xlm_jax.plots xnli --out=xnli.png mlm_tlm=/tmp/xnli_mlm_tlm random=/tmp/xnli_random
  # A − B per language over seeds (runs paired in order): a markdown table and bars with the spread
  python -m xlm_jax.plots gap --out=gap.png mlm_tlm=/tmp/x_tlm_s0,/tmp/x_tlm_s1 \
      mlm=/tmp/x_mlm_s0,/tmp/x_mlm_s1
  # attention of a pretrained model over a TLM pair (a word and its translation)
  python -m xlm_jax.plots attention --workdir=/tmp/xlm_demo --out=attention.png \
      --lang=en --lang2=fr "The cat sleeps." "Le <mask> dort."

A run is `LABEL=WORKDIR` (or just `WORKDIR`, labelled by its folder name). Curves skip steps with
no value for a metric; the last record of a step wins (as after a resume). Figures are built with
matplotlib's object API (no pyplot, no backend switch), so notebooks can call these functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xlm_jax.core.metrics import read_jsonl
from xlm_jax.tasks.report import markdown_table, ordered_langs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xlm_jax.tools.explore import AttentionMaps

CHANCE_XNLI = 100.0 / 3  # three balanced classes


def _figure(
    width: float, height: float, n: int = 1, ncols: int | None = None
) -> tuple[Figure, np.ndarray]:
    """A figure of ``n`` panels of ``width`` x ``height`` inches, ``ncols`` a row (default all);
    its axes, flat, with any unused ones of the last row hidden."""
    from matplotlib.figure import Figure

    ncols = min(ncols or n, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def parse_runs(items: Sequence[str]) -> dict[str, str]:
    """``LABEL=WORKDIR`` or ``WORKDIR`` (labelled by its folder name) → {label: workdir}."""
    runs = {}
    for item in items:
        label, sep, workdir = item.partition("=")
        runs[label if sep else Path(item).name] = workdir if sep else item
    return runs


# --- training curves ------------------------------------------------------------------------------


def series(records: Sequence[Mapping], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric`, in step order, one value per step."""
    by_step: dict[int, float] = {}
    for rec in records:
        if isinstance(rec.get(metric), int | float):
            by_step[int(rec["step"])] = float(rec[metric])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_runs(
    runs: Mapping[str, str | os.PathLike],
    metrics: Sequence[str],
    out: str | os.PathLike,
    *,
    ncols: int | None = None,
) -> Path:
    """Writes a PNG with one panel per metric (``ncols`` a row; default all in one row);
    returns its path. Raises if nothing to plot."""
    records = {label: read_jsonl(Path(w) / "metrics.jsonl") for label, w in runs.items()}
    fig, axes = _figure(4.5, 3.4, len(metrics), ncols)
    drawn = 0
    for ax, metric in zip(axes, metrics, strict=True):
        for label, recs in records.items():
            steps, values = series(recs, metric)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=label)
                drawn += 1
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if not drawn:
        raise ValueError(f"none of the runs {list(runs)} logged any of {list(metrics)}")
    return _save(fig, out)


# --- XNLI accuracy per language ------------------------------------------------------------------


def read_results(run: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """An XNLI results dict: given, or read from a run's ``results.json``."""
    if isinstance(run, Mapping):
        return run
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no XNLI results (has --mode=xnli finished there?)")
    return json.loads(path.read_text())


def xnli_accuracies(results: Mapping[str, Any], split: str = "valid") -> dict[str, float]:
    """Accuracy (%) per language, in the paper's column order, at the epoch the run selected by
    its ``select_lang`` validation accuracy (the zero-shot protocol: no target-language labels).
    """
    chosen = results["selected"].get(results["select_lang"])
    if chosen is None:
        raise ValueError("the run has no selected epoch yet (no fine-tuned epoch evaluated)")
    prefix, suffix = f"{split}/", "/acc"
    langs = [
        k[len(prefix) : -len(suffix)]
        for k in chosen
        if k.startswith(prefix) and k.endswith(suffix) and k.count("/") == 2
    ]
    langs = [lang for lang in langs if lang != "avg"]
    if not langs:
        raise ValueError(f"the selected epoch has no {split} accuracies")
    return {lang: float(chosen[f"{prefix}{lang}{suffix}"]) for lang in ordered_langs(langs)}


def plot_xnli(
    runs: Mapping[str, str | os.PathLike | Mapping[str, Any]],
    out: str | os.PathLike,
    *,
    split: str = "valid",
    title: str | None = None,
) -> Path:
    """Grouped bars: per language (and the average, last), one bar per run, at each run's
    selected epoch; a dashed line at chance (33.3%). Returns the PNG's path."""
    accs = {label: xnli_accuracies(read_results(r), split) for label, r in runs.items()}
    langs = ordered_langs(list(dict.fromkeys(lang for a in accs.values() for lang in a)))
    groups = [*langs, "avg"]
    width = 0.8 / len(accs)
    fig, (ax,) = _figure(max(4.5, 0.45 * len(groups) * (1 + 0.5 * len(accs)) + 1.5), 3.4)
    x = np.arange(len(groups))
    for i, (label, a) in enumerate(accs.items()):
        values = [a.get(lang, np.nan) for lang in langs]
        values.append(float(np.mean(list(a.values()))))  # over the run's own languages
        bars = ax.bar(x + (i - (len(accs) - 1) / 2) * width, values, width, label=label)
        if len(accs) <= 2:
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.axhline(CHANCE_XNLI, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, groups)
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"XNLI zero-shot, {split} accuracy per language", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


@dataclasses.dataclass(frozen=True)
class Gap:
    """XNLI accuracies of two groups of runs (seeds), paired in order, per language and "avg"."""

    a: str
    b: str
    langs: list[str]  # paper order, then "avg" (each run's mean over these languages)
    acc_a: np.ndarray  # (seeds, langs) accuracy (%)
    acc_b: np.ndarray

    @property
    def gap(self) -> np.ndarray:  # (seeds, langs): a − b, seed by seed
        return self.acc_a - self.acc_b

    def rows(self) -> list[dict[str, Any]]:
        """The table: per language, each group's accuracy and the gap, as the mean over seeds
        (pairs) and its range, "mean (min..max)"."""

        def row(name: str, x: np.ndarray, sign: str) -> dict[str, Any]:
            fmt = f"{{:{sign}.1f}} ({{:{sign}.1f}}..{{:{sign}.1f}})"
            stats = zip(x.mean(0), x.min(0), x.max(0), strict=True)
            return {"": name, **{g: fmt.format(*v) for g, v in zip(self.langs, stats, strict=True)}}

        return [
            row(self.a, self.acc_a, ""),
            row(self.b, self.acc_b, ""),
            row(f"{self.a} − {self.b}", self.gap, "+"),
        ]


def xnli_gap(
    a: tuple[str, Sequence[Any]], b: tuple[str, Sequence[Any]], split: str = "valid"
) -> Gap:
    """``(label, runs)`` twice, the runs of each label paired in order (seed i with seed i); the
    languages are those every run evaluated."""
    (la, ra), (lb, rb) = a, b
    if len(ra) != len(rb) or not ra:
        raise ValueError(f"{la} has {len(ra)} runs and {lb} {len(rb)}: pair the seeds one to one")
    accs = [[xnli_accuracies(read_results(r), split) for r in runs] for runs in (ra, rb)]
    langs = ordered_langs([g for g in accs[0][0] if all(g in x for y in accs for x in y)])

    def table(group: list[dict[str, float]]) -> np.ndarray:
        values = np.array([[x[g] for g in langs] for x in group])
        return np.concatenate([values, values.mean(1, keepdims=True)], axis=1)

    return Gap(la, lb, [*langs, "avg"], table(accs[0]), table(accs[1]))


def plot_gap(gap: Gap, out: str | os.PathLike, *, title: str | None = None) -> Path:
    """Bars of the mean gap per language, whiskers from the smallest to the largest seed pair."""
    diff = gap.gap
    mean = diff.mean(0)
    fig, (ax,) = _figure(max(4.5, 0.45 * len(gap.langs) + 1.5), 3.2)
    x = np.arange(len(gap.langs))
    ax.bar(x, mean, 0.6, yerr=[mean - diff.min(0), diff.max(0) - mean], capsize=3)
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set_xticks(x, gap.langs)
    ax.set_ylabel("accuracy gap (points)")
    ax.set_title(title or f"XNLI: {gap.a} − {gap.b}, {len(diff)} seed pairs", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


# --- attention maps ------------------------------------------------------------------------------


def plot_attention(
    maps: AttentionMaps,
    out: str | os.PathLike,
    *,
    layers: Sequence[int] | None = None,
    head: int | None = None,
) -> Path:
    """Heat maps of attention weights (rows: queries, columns: keys), one panel per layer in
    ``layers`` (default: every layer), averaged over heads unless ``head`` is given. Lines mark
    where a TLM pair's second sentence starts. Returns the PNG's path."""
    from xlm_jax.tools.explore import display_piece

    layers = list(range(maps.n_layers)) if layers is None else list(layers)
    labels = [display_piece(p) for p in maps.pieces]
    n = len(labels)
    side = max(3.5, 0.22 * n + 1.2)
    fig, axes = _figure(side, side, len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        w = maps.weights[layer]
        w = w.mean(axis=0) if head is None else w[head]
        image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-6))
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        if maps.boundary < n:
            for line in (ax.axhline, ax.axvline):
                line(maps.boundary - 0.5, color="white", linewidth=1)
        which = "mean of heads" if head is None else f"head {head}"
        ax.set_title(f"layer {layer % maps.n_layers} ({which})", fontsize=9)
        ax.set_xlabel("attends to (key)", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    axes[0].set_ylabel("token (query)", fontsize=8)
    return _save(fig, out)


# --- command line --------------------------------------------------------------------------------


def _curves(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m xlm_jax.plots [curves]")
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR or WORKDIR")
    parser.add_argument("--metrics", required=True, help="comma-separated metric names")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--ncols", type=int, default=None, help="panels a row (default: all)")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    return plot_runs(parse_runs(args.runs), metrics, args.out, ncols=args.ncols)


def _xnli(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m xlm_jax.plots xnli")
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR (an --mode=xnli run) or WORKDIR")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--split", default="valid", help="valid, test or translate_test")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    return plot_xnli(parse_runs(args.runs), args.out, split=args.split, title=args.title)


def _gap(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m xlm_jax.plots gap")
    parser.add_argument("a", help="LABEL=WORKDIR,WORKDIR,... (--mode=xnli runs, one a seed)")
    parser.add_argument("b", help="LABEL=WORKDIR,WORKDIR,... (as many, paired in order)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--split", default="valid", help="valid, test or translate_test")
    args = parser.parse_args(argv)
    groups = []
    for item in (args.a, args.b):
        label, sep, runs = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected LABEL=WORKDIR,WORKDIR,...")
        groups.append((label, [r for r in runs.split(",") if r]))
    gap = xnli_gap(*groups, split=args.split)
    print(markdown_table(["", *gap.langs], gap.rows()))
    return plot_gap(gap, args.out)


def _attention(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m xlm_jax.plots attention")
    parser.add_argument("text", help="a sentence; <mask> for a masked token")
    parser.add_argument("text2", nargs="?", help="its translation (a TLM pair)")
    parser.add_argument("--workdir", required=True, help="a pretraining or imported workdir")
    parser.add_argument("--lang", required=True)
    parser.add_argument("--lang2", default=None, help="the translation's language")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--layers", default="", help="comma-separated; default every layer")
    parser.add_argument("--head", type=int, default=None, help="default: mean of the heads")
    parser.add_argument("--step", type=int, default=-1, help="checkpoint; -1 = best or latest")
    args = parser.parse_args(argv)
    from xlm_jax.tools import explore  # jax and the model: only for this command

    enc = explore.Encoder.load(args.workdir, args.step)
    maps = explore.attention_maps(enc, args.text, args.lang, args.text2, args.lang2)
    layers = [int(x) for x in args.layers.split(",") if x] or None
    if args.text2:
        for token, attended, weight in explore.strongest_links(maps):
            print(f"{token}\t{attended}\t{weight:.3f}")
    return plot_attention(maps, args.out, layers=layers, head=args.head)


COMMANDS = {"curves": _curves, "xnli": _xnli, "gap": _gap, "attention": _attention}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # No command name = curves (the original form of this command line).
    command = COMMANDS[argv.pop(0)] if argv and argv[0] in COMMANDS else _curves
    print(command(argv))


if __name__ == "__main__":
    main()
