"""Workdirs written before the one loop (commit 11e1f74, `tests/old_workdirs/make.py`) resume
with today's code and end where the old code's uninterrupted runs ended.

Each workdir holds the checkpoints of a run stopped after its first checkpoint (pretraining at
step 6 of 12, translation at 4 of 8, XNLI at update 10 of 50, inside its first epoch); the
settings below are those of make.py, plus ``model.dropout_rng="threefry16"``: the dropout masks
of that code, which a resume under today's default ("hash") is refused without.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, needs_xnli, tiny_config, tiny_nmt
from xlm_jax.tasks import nmt, pretrain, xnli

OLD = Path(__file__).resolve().parent / "old_workdirs"
EXPECTED = json.loads((OLD / "expected.json").read_text())
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
needs_multi30k = pytest.mark.skipif(
    not (SHARED_DATA / "multi30k").is_dir(), reason="needs ../shared/data/multi30k"
)


def copy_of(name: str, tmp_path: Path) -> Path:
    work = tmp_path / name
    shutil.copytree(OLD / name, work)
    return work


def compared(scalars: dict) -> dict:
    """Loss, accuracy, perplexity, gradient norm, learning rate: not timings."""
    rates = ("tokens_per_s", "tflops_per_device", "mfu", "compiled_programs")
    return {k: v for k, v in scalars.items() if not k.endswith(rates)}


def assert_same(got: dict, want: dict) -> None:
    """Equal numbers for every key both report (a resumed run logs only its own steps; the old
    run's last values of objectives not trained since the checkpoint are not in it)."""
    want, got = compared(want), compared(got)
    evaluated = {k for k in want if not k.startswith("train/")}
    assert evaluated <= set(got), sorted(evaluated - set(got))
    common = set(want) & set(got)
    assert len(common - evaluated) >= 2, sorted(common)
    for key, value in sorted((k, want[k]) for k in common):
        # float32 on device; the old and new code run the same programs on the same inputs
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


OLD_DROPOUT = {"model.dropout_rng": "threefry16"}


def pretraining_config(**overrides):
    return tiny_config(
        **{"max_steps": 12, "checkpoint_every": 6, "eval_every": 6, "data.root": "", **overrides}
    )


def test_a_pretraining_workdir_resumes(tmp_path):
    got = pretrain.train_and_evaluate(
        pretraining_config(**OLD_DROPOUT), copy_of("pretrain", tmp_path)
    )
    assert_same(got, EXPECTED["pretrain"])


def test_an_old_workdir_is_not_resumed_with_other_dropout_masks(tmp_path):
    """Its metadata has no dropout_rng: it ran threefry16, and today's default is refused."""
    want = "model.dropout_rng: checkpoint 'threefry16' vs config 'hash'"
    with pytest.raises(ValueError, match=want):
        pretrain.train_and_evaluate(pretraining_config(), copy_of("pretrain", tmp_path))


@needs_multi30k
def test_a_translation_workdir_resumes(tmp_path):
    config = tiny_nmt(init_checkpoint="", max_steps=8, checkpoint_every=4, **OLD_DROPOUT)
    got = nmt.train_and_evaluate(config, copy_of("nmt", tmp_path))
    assert_same(got, EXPECTED["nmt"])


def xnli_config():
    c = xnli.default_config()
    c.init_checkpoint = ""
    c.langs = "en,fr"
    c.tokenizer.vocab_size = 200
    c.tokenizer.character_coverage = 1.0
    c.model.emb_dim, c.model.n_layers, c.model.n_heads, c.model.max_positions = 16, 1, 2, 64
    c.model.dropout_rng = "threefry16"
    c.data.root = str(SHARED_DATA)
    c.data.train = "en: xnli/en.tsv@0:200"
    c.data.valid = "en: xnli/en.tsv@200:260; fr: xnli/fr.tsv@200:260"
    c.max_len, c.seq_len = 24, 48
    c.batch_size, c.eval_batch_size, c.epoch_size, c.n_epochs = 8, 20, -1, 2
    c.checkpoint_every, c.log_every = 10, 5
    return c


@needs_xnli
def test_an_xnli_workdir_resumes_inside_its_epoch(tmp_path):
    seen = []
    got = xnli.finetune(
        xnli_config(), copy_of("xnli", tmp_path), on_step=lambda s, _: seen.append(s)
    )
    assert seen[0] == 11  # from the mid-epoch checkpoint at update 10, not from the start
    assert [h["epoch"] for h in got["history"]] == [1, 2]
    for record, want in zip(got["history"], EXPECTED["xnli"], strict=True):
        assert_same(record, want)
