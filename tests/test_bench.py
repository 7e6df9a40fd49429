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


def test_run_reports_ratios_from_one_run_and_writes_markdown():
    """The whole benchmark in its tiny mode (what CI runs so it cannot rot): every section, and
    ratios computed from the numbers of the same report."""
    config = tiny_config()
    config.tokenizer.vocab_size = 256
    report = bench.run(
        config,
        n_steps=1,
        kinds=("mlm",),
        torch_modes=("eager",),
        decode_shape=(2, 5, 3),
        pipeline=True,
        peak_size=128,
    )
    peaks = report["matmul_peak_flops"]
    assert set(peaks) == {"jax float32", "jax bfloat16", "torch float32"}
    mlm = report["steps"]["mlm"]
    assert mlm["mfu"] == pytest.approx(mlm["achieved_flops"] / peaks["jax float32"])
    (ref,) = report["reference"]
    assert ref["mode"] == "eager" and ref["batch"] == mlm["batch"]
    assert ref["ours_over_theirs"] == pytest.approx(mlm["tokens_per_s"] / ref["tokens_per_s"])
    pipe = report["pipeline"]
    assert pipe["mlm"]["batch"] == [config.batch_size, config.bptt]
    assert pipe["tlm"]["batch"] == [config.tlm_batch_size, config.tlm_length]
    assert pipe["mlm"]["over_step"] == pytest.approx(
        pipe["mlm"]["tokens_per_s"] / mlm["tokens_per_s"]
    )
    assert "over_step" not in pipe["tlm"]  # TLM's step was not timed
    text = bench.markdown(report, "python -m xlm_jax.bench ...")
    assert f"{ref['ours_over_theirs']:.2f}x" in text
    assert text.count("| greedy |") == 2 and text.count("| beam 4 |") == 2
    assert "(128 x 128)" in text


def test_peak_lookup_and_throughput():
    from types import SimpleNamespace

    from xlm_jax import mfu

    def device(kind):
        return SimpleNamespace(device_kind=kind)

    assert mfu.peak_flops_per_device(0, device("TPU v5 lite")) == 197e12
    assert mfu.peak_flops_per_device(0, device("NVIDIA H100 80GB HBM3")) == 989e12
    assert mfu.peak_flops_per_device(0, device("cpu")) is None
    assert mfu.peak_flops_per_device(2.9e11, device("cpu")) == 2.9e11  # configured wins
    out = mfu.throughput(tokens=4096, flops=4096 * 1e9, seconds=2.0, n_devices=4, peak=1e12)
    assert out == {"tokens_per_s": 2048.0, "tflops_per_device": 0.512, "mfu": 0.512}
    assert "mfu" not in mfu.throughput(1, 1, 1, 1, None)
