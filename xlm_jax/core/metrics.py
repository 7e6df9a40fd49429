"""Training metrics: a console progress line with ETA, TensorBoard scalars and a JSONL log.

The training step reports per-objective sums (`loss_sum`, `n_pred`, `n_correct`) that are
accumulated over steps; `summarize` turns them into loss / accuracy / perplexity only when
logging, so averages are token-weighted over the whole interval.

Console output uses `print(..., flush=True)`, not absl logging: orbax and jax log verbosely at
INFO, and a run that raises the absl threshold to quiet them must still show progress.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from xlm_jax.core import files

# exp() of larger losses would overflow float32 (TensorBoard stores float32 scalars).
_MAX_LOG_PPL = 80.0


def summarize(sums: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{'mlm_en': {'loss_sum', 'n_pred', 'n_correct'}} -> {'mlm_en/loss', '/acc' (%), '/ppl'}.

    Keys with no predictions in the interval (n_pred == 0) are left out rather than divided by
    zero; `n_correct` is optional.
    """
    out: dict[str, float] = {}
    for key, s in sums.items():
        n_pred = float(s["n_pred"])
        if n_pred <= 0:
            continue
        loss = float(s["loss_sum"]) / n_pred
        out[f"{key}/loss"] = loss
        if "n_correct" in s:
            out[f"{key}/acc"] = 100.0 * float(s["n_correct"]) / n_pred
        out[f"{key}/ppl"] = math.exp(min(loss, _MAX_LOG_PPL))
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a metrics JSONL file; skips a line left incomplete by a crash mid-write.

    A resumed run re-logs the steps after its checkpoint, so a step can appear twice; plots
    should keep the last record per step.
    """
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _scalar(value: Any) -> float | int:
    """Python float/int from python, numpy (or 0-d jax) scalars; ints stay ints in the JSON."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu":
        return int(value)
    return float(value)


def format_si(x: float) -> str:
    """3400 -> '3.4k', 1.2e6 -> '1.2M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.1f}"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m"
    return f"{s}s"


def _format_value(name: str, value: float) -> str:
    if name == "acc":
        return f"{value:.1f}%"
    if name == "loss":
        return f"{value:.2f}"
    if name == "ppl":
        return f"{value:.1f}" if value < 1e4 else f"{value:.2e}"
    return f"{value:.4g}"


def _format_scalars(scalars: Mapping[str, Any]) -> str:
    """Groups 'mlm_en/loss', 'mlm_en/acc' as 'mlm_en loss 3.21 acc 41.2%'; keeps input order."""
    groups: dict[str, list[str]] = {}
    for key, value in scalars.items():
        group, _, name = key.rpartition("/")
        groups.setdefault(group, []).append(f"{name} {_format_value(name, float(value))}")
    return " | ".join(
        " ".join([g, *items]) if g else " ".join(items) for g, items in groups.items()
    )


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard, and prints progress lines.

    Only the primary process writes or prints anything; the others may call every method. No
    history is kept in memory: each call writes through, so host memory stays flat.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        is_primary: bool = True,
        tensorboard: bool = True,
    ):
        self._total_steps = total_steps
        self._is_primary = is_primary
        self._jsonl = None
        self._tb = None
        # (step, time) of the previous progress() call: rates are measured from there.
        self._last: tuple[int, float] | None = None
        if not is_primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._path = os.path.join(workdir, "metrics.jsonl")
        # Append so a resumed run continues the file; terminate a line cut short by a crash,
        # or the first new record would be glued onto it.
        with files.errors_name(self._path, "opening"):
            if os.path.exists(self._path) and os.path.getsize(self._path) > 0:
                with open(self._path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            else:
                needs_newline = False
            # Unbuffered: each record reaches the file (or fails, naming it) in its write() call,
            # and a failed one leaves no buffered bytes for close() to fail on again.
            self._jsonl = open(self._path, "ab", buffering=0)  # noqa: SIM115 (until close())
        if needs_newline:
            self._append("\n")
        if tensorboard:
            from tensorboardX import SummaryWriter  # heavy import, only where used

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "") -> None:
        """Appends one JSONL record and the TensorBoard scalars; `prefix` e.g. 'valid'."""
        if not self._is_primary:
            return
        head = prefix.rstrip("/") + "/" if prefix else ""
        values = {f"{head}{k}": _scalar(v) for k, v in scalars.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._append(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, int(step))
            self._tb.flush()

    def _append(self, text: str) -> None:
        """Appends to the JSONL file; an error (a full disk, say) names it. A line it cuts
        short is skipped by ``read_jsonl`` and terminated by the next writer."""
        assert self._jsonl is not None
        data = text.encode()
        with files.errors_name(self._path, "appending a record to"):
            while data:  # an unbuffered write may take only part of the data
                data = data[self._jsonl.write(data) :]

    def progress(self, step: int, scalars: Mapping[str, Any], *, tokens: int) -> None:
        """Prints one line: step, grouped scalars, steps/s and tokens/s since the last call, ETA.

        `tokens` = tokens processed since the previous call. The first call only sets the
        reference point (its interval would include compilation), so it shows no rates.
        """
        now = time.perf_counter()
        last, self._last = self._last, (step, now)
        if not self._is_primary:
            return
        parts = [f"step {step}/{self._total_steps}"]
        if scalars:
            parts.append(_format_scalars(scalars))
        if last is not None and now > last[1] and step > last[0]:
            dt = now - last[1]
            steps_per_s = (step - last[0]) / dt
            eta = (self._total_steps - step) / steps_per_s
            parts.append(f"{steps_per_s:.3g} steps/s {format_si(tokens / dt)} tok/s")
            parts.append(f"ETA {format_duration(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def history_table(records: list[dict], columns: list[str]) -> str:
    """A markdown table of ``columns`` by step (the last record of a step wins, as on resume)."""
    by_step: dict[int, dict] = {}
    for rec in records:
        if any(c in rec for c in columns):
            by_step.setdefault(rec["step"], {}).update(rec)
    lines = ["| step | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for step in sorted(by_step):
        row = by_step[step]
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float | int) else "" for c in columns]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m xlm_jax.metrics WORKDIR [COLUMN ...]``: a run's history as a markdown table.

    Columns default to every ``valid/*_ppl`` average (e.g. valid/mlm_ppl, valid/tlm_ppl).
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m xlm_jax.metrics WORKDIR [COLUMN ...]")
    records = read_jsonl(os.path.join(args[0], "metrics.jsonl"))
    columns = args[1:] or sorted(
        {k for r in records for k in r if k.startswith("valid/") and k.endswith("_ppl")}
    )
    print(history_table(records, columns))


if __name__ == "__main__":
    main()
