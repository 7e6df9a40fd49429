"""Evaluators chosen by name in a config: ``evals = "valid,retrieval@5"``.

An evaluator is a function ``(params, step) -> {metric: value}``. A task offers some by name
(pretraining: ``valid``, its held-out text's loss per objective, and ``retrieval``, the Tatoeba
probe); the config picks which run at each of the loop's evaluations, ``NAME@K`` only at every
K-th. Their metrics are merged into one record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Evaluator = Callable[[Any, int], dict[str, float]]


def parse(spec: str, available: Sequence[str], where: str = "evals") -> dict[str, int]:
    """``"valid,retrieval@5"`` -> ``{"valid": 1, "retrieval": 5}``; unknown names, bad or
    repeated entries fail here, before anything is read or compiled."""
    out: dict[str, int] = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, _, every = item.partition("@")
        if name not in available:
            raise ValueError(
                f"{where}={spec!r}: no evaluator {name!r}; choose from {list(available)}"
            )
        if name in out:
            raise ValueError(f"{where}={spec!r}: {name!r} is listed twice")
        if every and not (every.isdigit() and int(every) > 0):
            raise ValueError(f"{where}={spec!r}: {item!r}; expected NAME or NAME@K with K >= 1")
        out[name] = int(every or 1)
    return out


def combine(
    selected: Mapping[str, int], built: Mapping[str, Evaluator], eval_every: int
) -> Evaluator:
    """One evaluator running each of ``selected`` (name -> K) at every K-th evaluation of a loop
    that evaluates every ``eval_every`` steps (the last evaluation counts as the next one)."""

    def evaluate(params: Any, step: int) -> dict[str, float]:
        count = -(-step // max(eval_every, 1))  # this evaluation's number, from 1
        metrics: dict[str, float] = {}
        for name, every in selected.items():
            if count % every == 0:
                metrics |= built[name](params, step)
        return metrics

    return evaluate
