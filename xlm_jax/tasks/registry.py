"""Every ``--mode`` of ``python -m xlm_jax.main``: what it runs and where its settings come from.

``main`` dispatches through it, ``config_doc`` documents each family of settings from it, and
the notebooks' presets (``tools/tutorial.py``) check their modes against it. A new task adds one
entry here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from xlm_jax.tasks import nmt, pretrain, pretrain_config, retrieval, xnli


@dataclasses.dataclass(frozen=True)
class Mode:
    run: Callable[[ml_collections.ConfigDict, str | os.PathLike], Any]
    default_config: Callable[[], ml_collections.ConfigDict]
    family: str  # the section of docs/configuration.md that lists its settings
    family_modes: str  # how that section names the modes that read it


MODES: dict[str, Mode] = {
    "pretrain": Mode(
        pretrain.train_and_evaluate,
        pretrain_config.default_config,
        "Pretraining",
        "--mode=pretrain (the default)",
    ),
    "xnli": Mode(
        xnli.finetune, xnli.default_config, "XNLI fine-tuning", "--mode=xnli, --mode=xnli_sweep"
    ),
    "xnli_sweep": Mode(
        xnli.run_sweep, xnli.default_config, "XNLI fine-tuning", "--mode=xnli, --mode=xnli_sweep"
    ),
    "retrieval": Mode(
        retrieval.retrieval,
        retrieval.retrieval_default_config,
        "Retrieval probe",
        "--mode=retrieval",
    ),
    "nmt": Mode(
        nmt.train_and_evaluate,
        nmt.default_config,
        "Translation",
        "--mode=nmt (and python -m xlm_jax.translate)",
    ),
}


def families() -> list[tuple[str, str, Callable[[], ml_collections.ConfigDict]]]:
    """(title, modes, default_config) of each family of settings, in the order of ``MODES``."""
    out: dict[str, tuple[str, str, Callable]] = {}
    for mode in MODES.values():
        out.setdefault(mode.family, (mode.family, mode.family_modes, mode.default_config))
    return list(out.values())
