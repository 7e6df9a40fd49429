"""The training loop end to end: learning, exact resume, no recompilation, refusals."""

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config
from xlm_jax.core.metrics import read_jsonl
from xlm_jax.data.sources import DataError
from xlm_jax.tasks import pretrain


def _train_losses(workdir) -> dict[int, dict[str, float]]:
    out = {}
    for rec in read_jsonl(workdir / "metrics.jsonl"):
        losses = {k: v for k, v in rec.items() if k.startswith("train/") and k.endswith("/loss")}
        if losses:
            out[rec["step"]] = losses  # a resumed run may log a step twice: keep the last
    return out


def test_resume_equals_uninterrupted_run(tmp_path):
    captured = {}

    def keep(name):
        def on_step(step, state):
            captured[(name, step)] = jax.device_get(state.params)

        return on_step

    full = tmp_path / "full"
    pretrain.train_and_evaluate(tiny_config(max_steps=12), full, on_step=keep("full"))
    split = tmp_path / "split"
    pretrain.train_and_evaluate(tiny_config(max_steps=6), split, on_step=keep("a"))
    pretrain.train_and_evaluate(tiny_config(max_steps=12), split, on_step=keep("b"))

    full_losses, split_losses = _train_losses(full), _train_losses(split)
    assert sorted(full_losses) == list(range(1, 13)) == sorted(split_losses)
    for step in range(1, 13):
        for key, value in full_losses[step].items():
            assert split_losses[step][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (step, key)
    # the resumed run starts exactly where the first stopped, and ends with the same parameters
    assert ("b", 6) not in captured and ("b", 7) in captured
    jax.tree.map(np.testing.assert_array_equal, captured[("full", 12)], captured[("b", 12)])
    # and the losses actually moved, so the equality above is not trivial
    assert full_losses[12] != full_losses[1]

    # XLM's --eval_only on the last checkpoint: the perplexities logged at step 12, exactly
    logged = [r for r in read_jsonl(full / "metrics.jsonl") if "valid/mlm_ppl" in r][-1]
    result = pretrain.train_and_evaluate(tiny_config(max_steps=12, eval_only=True), full)
    assert logged["step"] == result.pop("step") == 12
    assert result == {k: v for k, v in logged.items() if k.startswith("valid/")}


def test_accumulated_micro_batches_give_the_large_batch_update(tmp_path):
    """accum_steps=k scans k micro-batches: the same losses and parameters as one big batch."""
    captured = {}

    def keep(name):
        def on_step(step, state):
            captured[(name, step)] = jax.device_get(state.params)

        return on_step

    common = {
        "max_steps": 4,
        "eval_every": 0,
        "batch_size": 8,
        "tlm_batch_size": 8,
        # dropout masks depend on the micro-batch shape: off, so the updates can be compared
        "model.dropout": 0.0,
        "model.attention_dropout": 0.0,
    }
    pretrain.train_and_evaluate(tiny_config(**common), tmp_path / "big", on_step=keep("big"))
    pretrain.train_and_evaluate(
        tiny_config(accum_steps=4, **common), tmp_path / "accum", on_step=keep("accum")
    )
    big, accum = _train_losses(tmp_path / "big"), _train_losses(tmp_path / "accum")
    for step in range(1, 5):
        for key, value in big[step].items():
            assert accum[step][key] == pytest.approx(value, rel=1e-6), (step, key)
    for step in range(1, 5):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            captured[("big", step)],
            captured[("accum", step)],
        )


def test_alternation_compiles_each_step_once(tmp_path, caplog):
    caplog.set_level("INFO")
    config = tiny_config(max_steps=20, clm_steps="en,fr,en-fr", eval_every=10, log_every=5)
    config.context_size = 2
    config.peak_flops_per_device = 1e9
    config.data.test = "en: val.en; en-fr: val.en|val.fr"  # evaluated too, by the same programs
    pretrain.train_and_evaluate(config, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "compiled programs" in r.getMessage()]
    # train: clm (4x32, and 4x48 for the pair), masked MLM (4x32), masked TLM (4x48); eval:
    # clm, masked (8x32, 8x48)
    assert lines == ["compiled programs: 8"]
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "valid/mlm_ppl" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:  # the test split's files are valid's: the same batches, masks and numbers
        tested = {k.removeprefix("test/"): v for k, v in r.items() if k.startswith("test/")}
        keys = {k.split("/")[0] for k in tested if "/" in k}
        assert keys == {"clm_en", "clm_en-fr", "mlm_en", "tlm_en-fr"}
        assert tested == {
            **{k: r[f"valid/{k}"] for k in tested if "/" in k},
            "clm_ppl": float(np.mean([r["valid/clm_en/ppl"], r["valid/clm_en-fr/ppl"]])),
            "mlm_ppl": r["valid/mlm_en/ppl"],
            "tlm_ppl": r["valid/tlm_en-fr/ppl"],
        }
    # throughput and MFU from the second logging window on (the first one compiles)
    logged = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/lr" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert "train/mfu" not in logged[0] and "train/tokens_per_s" not in logged[0]
    for r in logged[1:]:
        assert r["train/tokens_per_s"] > 0
        assert r["train/mfu"] == pytest.approx(r["train/tflops_per_device"] * 1e12 / 1e9)
    assert not (tmp_path / "tensorboard").exists()  # tiny_config's tensorboard=False reached it


def test_checkpoint_from_another_config_is_refused(tmp_path, caplog):
    caplog.set_level("INFO")
    pretrain.train_and_evaluate(tiny_config(max_steps=6), tmp_path)
    with pytest.raises(ValueError, match=r"model.emb_dim: checkpoint 32 vs config 48"):
        pretrain.train_and_evaluate(tiny_config(max_steps=12, **{"model.emb_dim": 48}), tmp_path)
    # how the model runs is not part of it: the run resumes with activation checkpointing on
    pretrain.train_and_evaluate(tiny_config(max_steps=8, **{"model.remat": "full"}), tmp_path)
    assert any("resumed from step 6" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")][-1] == 8


def test_objective_without_data_fails_before_compiling(tmp_path):
    config = tiny_config(mlm_steps="en,fr-de")
    with pytest.raises(
        DataError, match="mlm_steps lists 'fr-de' but data.train has no parallel text"
    ):
        pretrain.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_unknown_best_metric_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="best_metric 'valid/mlm_en/ppx' will not be measured"):
        pretrain.train_and_evaluate(tiny_config(best_metric="valid/mlm_en/ppx"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_mesh_that_does_not_divide_fails_fast(tmp_path):
    with pytest.raises(ValueError, match="needs 3 devices"):
        pretrain.train_and_evaluate(tiny_config(**{"mesh.shape": (3, 1, 1)}), tmp_path)


def test_pretraining_reads_tfds_sources(tmp_path, shared_data):
    """The same run from the project's TF-free TFDS builder, prepared from ../shared/data."""
    src = "tfds:multi30k_local:{split}:{lang}@0:{n}"
    train_spec = "; ".join(
        [f"{lang}: {src.format(split='train', lang=lang, n=3000)}" for lang in ("en", "fr", "de")]
        + [
            f"en-fr: {src.format(split='train', lang='en', n=3000)}|"
            f"{src.format(split='train', lang='fr', n=3000)}"
        ]
    )
    valid_spec = f"en: {src.format(split='validation', lang='en', n=200)}"
    config = tiny_config(
        max_steps=4,
        eval_every=4,
        checkpoint_every=4,
        **{
            "data.train": train_spec,
            "data.valid": valid_spec,
            "data.tfds_data_dir": str(tmp_path / "tfds"),
            "data.tfds_manual_dir": str(shared_data / "multi30k"),
        },
    )
    out = pretrain.train_and_evaluate(config, tmp_path / "run")
    assert np.isfinite(out["valid/mlm_en/loss"])
    assert (tmp_path / "tfds" / "multi30k_local").is_dir()


@pytest.mark.slow
def test_pretraining_on_real_text_lowers_validation_perplexity(tmp_path, shared_data):
    config = tiny_config(
        max_steps=300,
        eval_every=100,
        log_every=50,
        checkpoint_every=300,
        **{
            "data.root": str(shared_data / "multi30k"),
            "data.valid": "en: val.en@0:200; fr: val.fr@0:200; en-fr: val.en@0:200|val.fr@0:200",
            "tokenizer.vocab_size": 2000,
            "tokenizer.n_sentences": 20_000,
            "model.emb_dim": 64,
            "model.n_heads": 4,
            "bptt": 64,
            "tlm_length": 64,
            "batch_size": 8,
            "tlm_batch_size": 8,
            "tensorboard": True,  # the one loop run of the tests that writes TensorBoard
        },
    )
    last = pretrain.train_and_evaluate(config, tmp_path)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert b"valid/mlm_ppl" in events.read_bytes()  # the tag of a scalar summary
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "valid/mlm_ppl" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    ppl = [r["valid/mlm_ppl"] for r in evals]
    assert ppl[2] < ppl[1] < ppl[0]
    assert evals[-1]["valid/tlm_ppl"] < evals[0]["valid/tlm_ppl"]
    # an untrained model is near-uniform over the 2000 pieces; this one is far below
    assert last["valid/mlm_ppl"] < 0.25 * 2000
