"""The benchmark runs on a tiny config and reports consistent numbers (not timed here)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import tiny_config
from xlm_jax.core import train_state
from xlm_jax.model.encoder import ModelConfig, xlm_flops_per_token
from xlm_jax.tools import bench

# Not XLM's code: its TransformerModel's interface over a tiny model, for the harness in CI.
XLM_STAND_IN = Path(__file__).parent / "data" / "xlm_stand_in"


def test_bench_steps_reports_every_kind():
    config = tiny_config()
    config.tokenizer.vocab_size = 256
    out = bench.bench_steps(config, n_steps=1, floor=False)  # the floor: tested below
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


def test_memory_only_refuses_what_it_would_not_time():
    with pytest.raises(ValueError, match="times nothing; --pipeline, --xlm_original would"):
        bench.run(tiny_config(), memory_only=True, pipeline=True, xlm_original="/elsewhere")


def test_run_reports_ratios_from_one_run_and_writes_markdown():
    """The whole benchmark in its tiny mode (what CI runs so it cannot rot): every section, the
    ceilings, and ratios computed from the numbers of the same report."""
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
        sample_seconds=0.002,  # tiny products: short timing samples keep CI fast
        rounds=2,
        xlm_original=str(XLM_STAND_IN),
    )
    peaks = report["matmul_peak_flops"]
    assert set(peaks) == {"jax float32", "jax bfloat16", "torch float32"}
    mlm = report["steps"]["mlm"]
    assert mlm["mfu"] == pytest.approx(mlm["achieved_flops"] / peaks["jax float32"])
    (ref,) = report["reference"]
    assert ref["mode"] == "eager" and ref["batch"] == mlm["batch"]
    assert ref["ours_over_theirs"] == pytest.approx(mlm["tokens_per_s"] / ref["tokens_per_s"])
    # the ceiling: the step's and the decoders' matrix products timed alone
    rows, length = mlm["batch"]
    assert mlm["floor_tokens_per_s"] == pytest.approx(rows * length / mlm["matmul_floor_s"])
    assert mlm["matmul_flops_per_token"] > 0
    for r in [mlm, *(r for r in report["decoding"]["runs"] if r["kv_cache"])]:
        # timed in 2 turns with its products: the share of the ceiling is their median
        assert len(r["ceiling_shares"]) == 2 and min(r["ceiling_shares"]) > 0
        assert r["ceiling_share"] == pytest.approx(sum(r["ceiling_shares"]) / 2)
        turns = zip(r["turns_matmul_floor_s"], r["turns_program_s"], strict=True)
        assert r["ceiling_shares"] == [f / p for f, p in turns]
    assert ref["floor_over_theirs"] == pytest.approx(
        mlm["floor_tokens_per_s"] / ref["tokens_per_s"]
    )
    runs = report["decoding"]["runs"]  # every variant (bench_decoding checks full lengths)
    assert [(r["search"], r["kv_cache"]) for r in runs] == [
        ("greedy", True),
        ("greedy", False),
        ("beam 4", True),
        ("beam 4", False),
    ]
    for r in runs:
        assert r["sentences_per_s"] == pytest.approx(2 / r["seconds"])
        assert r["tokens_per_s"] == pytest.approx(2 * 3 / r["seconds"])
    cached = [r for r in runs if r["kv_cache"]]
    assert all(r["floor_sentences_per_s"] == pytest.approx(2 / r["matmul_floor_s"]) for r in cached)
    for r in cached:  # the same products with operands from memory
        assert r["floor_cold_sentences_per_s"] == pytest.approx(2 / r["matmul_floor_cold_s"])
    assert not any("matmul_floor_s" in r for r in runs if not r["kv_cache"])
    # beam 4 runs 4 hypotheses per sentence through the decoder's products (the encoder's once)
    greedy, beam = cached
    assert 2 * greedy["matmul_flops"] < beam["matmul_flops"] < 4 * greedy["matmul_flops"]
    pipe = report["pipeline"]
    assert pipe["mlm"]["batch"] == [config.batch_size, config.bptt]
    assert pipe["tlm"]["batch"] == [config.tlm_batch_size, config.tlm_length]
    assert pipe["mlm"]["over_step"] == pytest.approx(
        pipe["mlm"]["tokens_per_s"] / mlm["tokens_per_s"]
    )
    assert "over_step" not in pipe["tlm"]  # TLM's step was not timed
    orig = report["xlm_original"]  # the original code's harness, on a stand-in checkout
    assert orig["steps"]["mlm"]["batch"] == mlm["batch"]
    assert orig["steps"]["mlm"]["ours_over_original"] == pytest.approx(
        mlm["tokens_per_s"] / orig["steps"]["mlm"]["tokens_per_s"]
    )
    assert [r["search"] for r in orig["decoding"]] == ["greedy", "beam 4"]
    for r, ours in zip(orig["decoding"], cached, strict=True):
        assert r["ours_over_original"] == pytest.approx(
            ours["sentences_per_s"] / r["sentences_per_s"]
        )
    text = bench.markdown(report, "python -m xlm_jax.bench ...")
    for r in [orig["steps"]["mlm"], *orig["decoding"]]:
        assert f"**{r['ours_over_original']:.2f}×**" in text
    assert f"{ref['ours_over_theirs']:.2f}x" in text
    assert f"{ref['floor_over_theirs']:.2f}x" in text
    # the decoding table's two rows each, and one each in the original code's table
    assert text.count("| greedy |") == 3 and text.count("| beam 4 |") == 3
    for r in [mlm, *cached]:  # % of each ceiling: the turns' median, and their range
        lo, hi = min(r["ceiling_shares"]), max(r["ceiling_shares"])
        assert f"| {r['ceiling_share']:.0%} ({lo:.0%}–{hi:.0%}) |" in text
    for r in cached:  # and of the ceiling with operands from memory
        pct_cold = r["sentences_per_s"] / r["floor_cold_sentences_per_s"]
        assert f"{r['matmul_floor_cold_s']:.2f} | {pct_cold:.0%} |" in text
    assert "(128 x 128)" in text
    assert "| step | batch |" in text
    assert "| step | batch |" not in bench.markdown({**report, "steps": {}})  # --kinds= --decode


def test_the_original_xlm_code_is_read_from_a_checkout(tmp_path):
    from xlm_jax.tools import bench_xlm

    with pytest.raises(FileNotFoundError, match="expected a checkout of facebookresearch/XLM"):
        bench_xlm.load(tmp_path)


def test_peak_lookup_and_throughput():
    from types import SimpleNamespace

    from xlm_jax.core import mfu

    def device(kind):
        return SimpleNamespace(device_kind=kind)

    assert mfu.peak_flops_per_device(0, device("TPU v5 lite")) == 197e12
    assert mfu.peak_flops_per_device(0, device("NVIDIA H100 80GB HBM3")) == 989e12
    assert mfu.peak_flops_per_device(0, device("cpu")) is None
    assert mfu.peak_flops_per_device(2.9e11, device("cpu")) == 2.9e11  # configured wins
    out = mfu.throughput(tokens=4096, flops=4096 * 1e9, seconds=2.0, n_devices=4, peak=1e12)
    assert out == {"tokens_per_s": 2048.0, "tflops_per_device": 0.512, "mfu": 0.512}
    assert "mfu" not in mfu.throughput(1, 1, 1, 1, None)


def test_dot_products_counts_nested_jits_loops_and_branches():
    from jax import lax

    from xlm_jax.tools import roofline

    def f(x, w):
        y = jax.jit(lambda a: a @ w)(x)  # 1
        y = lax.fori_loop(0, 3, lambda i, a: a @ w, y)  # static trip count: a scan of 3
        y = lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] @ w), (0, y))[1]
        return lax.cond(x.sum() > 0, lambda a: a @ w @ w, lambda a: a, y)  # the larger branch: 2

    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    counts = roofline.program_dot_products(f, x, w, loop_trips=7)
    ((dot, n),) = counts.items()
    assert (dot.lhs, dot.rhs, n) == ((4, 8), (8, 8), 1 + 3 + 7 + 2)
    assert dot.flops == 2 * 4 * 8 * 8
    batched = roofline.DotProduct(
        (2, 3, 5), (2, 5, 7), "float32", (((2,), (1,)), ((0,), (0,))), None
    )
    assert batched.flops == 2 * 2 * 3 * 5 * 7
    timed = roofline.time_dot_products(counts)
    assert timed["flops"] == 13 * dot.flops and timed["seconds"] > 0
    assert timed["products"][0]["calls"] == 13
    cold = roofline.time_dot_products(counts, cold=True)  # the same products, other operands
    assert cold["flops"] == timed["flops"] and cold["seconds"] > 0
    # copies rotated: enough to exceed COLD_BYTES, at most MAX_COPIES, one when warm
    mb = 2**20
    assert roofline.operand_copies(100 * mb, cold=True) == 3  # 300 MB >= 256 MB
    assert roofline.operand_copies(300 * mb, cold=True) == 1
    assert roofline.operand_copies(1 * mb, cold=True) == roofline.MAX_COPIES == 64
    assert roofline.operand_copies(100 * mb, cold=False) == 1


def test_a_program_and_its_products_are_timed_in_turns():
    from xlm_jax.tools import roofline

    x = jnp.ones((16, 16))
    counts = roofline.program_dot_products(lambda a: a @ a @ a, x)  # one shape, called twice
    calls = []

    def program():
        calls.append(len(calls))
        return x

    t = roofline.interleaved(program, 4, counts, rounds=3, sample_seconds=0.001)
    assert len(calls) == 2 + 3 * 4  # warm-up once, then 4 timed calls per round
    assert t["flops"] == 2 * (2 * 16**3)
    assert len(t["program_seconds"]) == len(t["floor_seconds"]) == 3
    pairs = zip(t["floor_seconds"], t["program_seconds"], strict=True)
    assert t["shares"] == [f / p for f, p in pairs]
    with pytest.raises(ValueError, match="rounds=0: expected at least 1"):
        roofline.interleaved(program, 4, counts, rounds=0)


def test_the_flop_formula_counts_the_training_steps_own_products():
    """``xlm_flops_per_token`` (MFU's numerator) equals the FLOPs of the matrix products in the
    traced MLM and CLM training steps, forward and backward, with the step's predicted slots."""
    import numpy as np

    from xlm_jax.core import parallel
    from xlm_jax.model.encoder import XLMEncoder
    from xlm_jax.model.objectives import n_pred_slots
    from xlm_jax.tasks import pretrain
    from xlm_jax.tools import roofline

    config = tiny_config()
    config.tokenizer.vocab_size = 256
    config.model.n_layers = 2
    model = XLMEncoder(pretrain.model_config(config, 256))
    tx = train_state.make_optimizer(config.optimizer)
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    abstract, shardings, _ = train_state.abstract_state(model, tx, mesh, rules, 1)
    steps = pretrain.Steps(config, model, tx, mesh, rules, shardings, np.zeros(256))
    rows, length = config.batch_size, config.bptt
    batch = {
        k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
        for k in bench._batch(np.random.default_rng(0), rows, length, 256, False)
    }
    slots = n_pred_slots(length, config.word_pred)
    with parallel.mesh_context(mesh, rules):
        for kind, fraction in (("masked", slots / length), ("clm", 1.0)):
            counts = roofline.program_dot_products(
                steps.train[kind], abstract, batch, np.int32(1), np.float32(1.0)
            )
            traced = sum(d.flops * n for d, n in counts.items()) / (rows * length)
            assert traced == pytest.approx(xlm_flops_per_token(model.config, length, fraction))
