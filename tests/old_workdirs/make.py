"""Writes the workdirs of tests/test_old_workdirs.py with the code of commit 11e1f74, the last
before the one loop (run it from a checkout of that commit: `git worktree add /tmp/old 11e1f74`,
then `cd /tmp/old && JAX_PLATFORMS=cpu python /path/to/make.py OUT_DIR`).

Each task: a run stopped after its first checkpoint (the workdir to resume) and the same run
uninterrupted (its final numbers, in expected.json). The settings are those of
tests/test_old_workdirs.py, which must stay equal to these.
"""

import contextlib
import json
import shutil
import sys
from pathlib import Path

from tests.conftest import SHARED_DATA, tiny_config, tiny_nmt
from xlm_jax import nmt, train, xnli


class Stop(Exception):
    pass


def stop_at(n):
    def hook(step, state):
        if step == n:
            raise Stop

    return hook


def pretrain_config():
    return tiny_config(**{"max_steps": 12, "checkpoint_every": 6, "eval_every": 6, "data.root": ""})


def nmt_config():
    return tiny_nmt(init_checkpoint="", max_steps=8, checkpoint_every=4)


def xnli_config():
    c = xnli.default_config()
    c.init_checkpoint = ""
    c.langs = "en,fr"
    c.tokenizer.vocab_size = 200
    c.tokenizer.character_coverage = 1.0
    c.model.emb_dim, c.model.n_layers, c.model.n_heads, c.model.max_positions = 16, 1, 2, 64
    c.data.root = str(SHARED_DATA)
    c.data.train = "en: xnli/en.tsv@0:200"
    c.data.valid = "en: xnli/en.tsv@200:260; fr: xnli/fr.tsv@200:260"
    c.max_len, c.seq_len = 24, 48
    c.batch_size, c.eval_batch_size, c.epoch_size, c.n_epochs = 8, 20, -1, 2
    c.checkpoint_every, c.log_every = 10, 5
    return c


RUNS = {
    "pretrain": (pretrain_config, train.train_and_evaluate, 9),
    "nmt": (nmt_config, nmt.train_and_evaluate, 6),
    "xnli": (xnli_config, xnli.finetune, 12),
}


def main(out: Path) -> None:
    expected = {}
    for name, (config, fn, crash) in RUNS.items():
        full = fn(config(), out / "full" / name)
        expected[name] = (
            full["history"]
            if name == "xnli"
            else {k: v for k, v in full.items() if k.startswith(("valid/", "train/")) and "/" in k}
        )
        with contextlib.suppress(Stop):
            fn(config(), out / name, on_step=stop_at(crash))
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True))
    shutil.rmtree(out / "full")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
