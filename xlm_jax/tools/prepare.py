"""``python -m xlm_jax.prepare``: a config's data (``data.prepare_splits``), prepared once.

    python -m xlm_jax.prepare --config=configs/xnli15_mlm_tlm.py --out=/data/xnli15_prepared
    python -m xlm_jax.main --config=configs/xnli15_mlm_tlm.py --workdir=/ckpt/run \\
        --config.data.prepared=/data/xnli15_prepared
    # fine-tuning data is tokenized by the pretrained model's tokenizer (XNLI: NLI records)
    python -m xlm_jax.prepare --config=configs/xnli.py --out=/data/xnli_prepared \\
        --tokenizer=/ckpt/run/tokenizer.model

Every core tokenizes by default (``--workers``). Run again after an interruption: finished shards
are kept. Corpora beyond one machine: train the tokenizer once (``--tokenizer_only``), then run
``--part=I/N`` as N independent jobs on any machines sharing ``--out`` (a SLURM array:
``launch/prepare_array.sbatch``), then once more without ``--part`` to check every shard and write
the manifest (docs/data.md).
"""

from __future__ import annotations

import logging as std_logging
import re
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from xlm_jax.data import prepare

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_OUT = flags.DEFINE_string("out", None, "Directory of the prepared set (created; resumed).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Tokenizing processes; 0 = every core.")
_PART = flags.DEFINE_string(
    "part", "", "I/N: only shards I, I+N, I+2N, ... (one of N independent jobs); no manifest."
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "Use this tokenizer.model instead of training one (copied into --out)."
)
_TOKENIZER_ONLY = flags.DEFINE_bool(
    "tokenizer_only", False, "Only plan and train the tokenizer (before --part jobs)."
)


def parse_part(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise app.UsageError(f"--part={text!r}: expected I/N with 0 <= I < N, e.g. 0/8")
    return int(m[1]), int(m[2])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _OUT.value:
        raise app.UsageError("--out is required: the directory to prepare into")
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("xlm_jax").setLevel(std_logging.INFO)
    config, out = _CONFIG.value, Path(_OUT.value)
    root = prepare.root_or_toy(config, out)
    tokenizer = Path(_TOKENIZER.value) if _TOKENIZER.value else None
    if _TOKENIZER_ONLY.value:
        prepare.prepare_tokenizer(config, out, root=root, tokenizer_path=tokenizer)
        return
    prepare.prepare(
        config,
        out,
        root=root,
        tokenizer_path=tokenizer,
        workers=_WORKERS.value,
        part=parse_part(_PART.value),
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
