"""The benchmark runs on a tiny config and reports consistent numbers (not timed here)."""

import pytest

from tests.conftest import tiny_config
from xlm_jax import bench
from xlm_jax.model.encoder import ModelConfig, xlm_flops_per_token


def test_bench_steps_reports_every_kind():
    config = tiny_config()
    config.tokenizer.vocab_size = 256
    out = bench.bench_steps(config, n_steps=1)
    assert set(out) == {"mlm", "tlm", "clm"}
    for kind, r in out.items():
        rows, length = r["batch"]
        assert r["tokens_per_s"] == pytest.approx(rows * length / r["step_s"])
        assert r["achieved_flops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"])
        b = r["memory_breakdown"]
        assert r["memory_bytes_per_device"] == b["argument"] + b["output"] + b["temp"] - b["alias"]
        assert b["alias"] > 0, kind  # the train state is donated
    # CLM runs the output layer at every position, MLM at 15% of them
    assert out["clm"]["flops_per_token"] > out["mlm"]["flops_per_token"]
    model = ModelConfig(vocab_size=256, n_langs=3, emb_dim=32, n_layers=1, n_heads=2)
    assert out["mlm"]["flops_per_token"] == pytest.approx(xlm_flops_per_token(model, 32, 0.15))


def test_memory_only_compiles_without_running():
    config = tiny_config()
    config.tokenizer.vocab_size = 256
    out = bench.bench_steps(config, n_steps=1, memory_only=True, only=("mlm",))
    assert set(out) == {"mlm"} and "step_s" not in out["mlm"]
    assert out["mlm"]["memory_bytes_per_device"] > 0


def test_bench_decoding_runs_every_variant_at_full_length():
    config = tiny_config()
    config.tokenizer.vocab_size = 256
    runs = bench.bench_decoding(config, batch=4, src_len=6, out_tokens=5, n_runs=1)
    assert [(r["search"], r["kv_cache"]) for r in runs] == [
        ("greedy", True),
        ("greedy", False),
        ("beam 4", True),
        ("beam 4", False),
    ]
    for r in runs:
        assert r["sentences_per_s"] == pytest.approx(4 / r["seconds"])
        assert r["tokens_per_s"] == pytest.approx(4 * 5 / r["seconds"])
