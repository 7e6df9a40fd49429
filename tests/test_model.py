"""Tests of xlm_jax.model (layers + encoder) on a tiny config."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from xlm_jax.model import layers
from xlm_jax.model.encoder import ModelConfig, XLMEncoder, count_params, xlm_flops_per_token

PAD = 2
TINY = ModelConfig(
    vocab_size=40, n_langs=3, emb_dim=16, n_layers=2, n_heads=4, max_positions=32, pad_id=PAD
)


def make_batch(batch: int = 3, length: int = 8, seed: int = 0) -> dict[str, jax.Array]:
    """Random non-pad tokens, right-padded rows of lengths length, length-3, 0 (all pads)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(PAD + 1, TINY.vocab_size, size=(batch, length))
    lengths = [length, length - 3, 0][:batch]
    for i, n in enumerate(lengths):
        tokens[i, n:] = PAD
    positions = np.broadcast_to(np.arange(length), (batch, length))
    langs = rng.integers(0, TINY.n_langs, size=(batch, length))
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "positions": jnp.asarray(positions, jnp.int32),
        "langs": jnp.asarray(langs, jnp.int32),
    }


def init_args(batch: dict[str, jax.Array]) -> tuple:
    return jax.random.key(0), batch["tokens"], batch["positions"], batch["langs"]


def param_shapes(config: ModelConfig, batch: dict[str, jax.Array]) -> dict:
    # Abstract init: compiling the RNG-heavy init costs seconds on CPU, tracing does not.
    return jax.eval_shape(XLMEncoder(config).init, *init_args(batch))["params"]


@functools.partial(jax.jit, static_argnames=("config", "causal"))
def run(
    config: ModelConfig,
    variables: dict,
    tokens: jax.Array,
    positions: jax.Array,
    langs: jax.Array,
    causal: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(hidden, logits) of one jitted forward pass."""

    def fn(model: XLMEncoder):
        hidden = model.encode(tokens, positions, langs, causal=causal)
        return hidden, model.logits(hidden)

    return XLMEncoder(config).apply(variables, method=fn)


@pytest.fixture(scope="module")
def setup() -> tuple[dict[str, jax.Array], dict]:
    batch = make_batch()
    return batch, jax.jit(XLMEncoder(TINY).init)(*init_args(batch))


def test_output_shapes_and_dtypes(setup):
    batch, variables = setup
    model = XLMEncoder(TINY)
    hidden = model.apply(variables, **batch, method=model.encode)
    assert hidden.shape == (3, 8, TINY.emb_dim) and hidden.dtype == jnp.float32
    logits = model.apply(variables, **batch)
    assert logits.shape == (3, 8, TINY.vocab_size) and logits.dtype == jnp.float32
    pred_index = jnp.array([[0, 3], [1, 4], [0, 0]], jnp.int32)
    sub = model.apply(variables, **batch, pred_index=pred_index)
    assert sub.shape == (3, 2, TINY.vocab_size) and sub.dtype == jnp.float32


def test_n_layers_stops_after_that_many_layers(setup):
    """encode(n_layers=k) is the encoder of the first k layers with the same weights; 0 is the
    embeddings' output, None all layers (probes read intermediate states this way)."""
    batch, variables = setup
    model = XLMEncoder(TINY)
    full = model.apply(variables, **batch, method=model.encode)
    all_layers = model.apply(variables, **batch, method=model.encode, n_layers=2)
    np.testing.assert_array_equal(all_layers, full)
    one_layer = XLMEncoder(dataclasses.replace(TINY, n_layers=1))
    first = {"params": {k: v for k, v in variables["params"].items() if k != "layer_1"}}
    np.testing.assert_array_equal(
        model.apply(variables, **batch, method=model.encode, n_layers=1),
        one_layer.apply(first, **batch, method=one_layer.encode),
    )
    embedded = model.apply(variables, **batch, method=model.encode, n_layers=0)
    expected, _ = model.apply(variables, **batch, deterministic=True, method=model.embed)
    np.testing.assert_array_equal(embedded, expected)
    assert not np.allclose(embedded, full)


def test_pred_index_equals_gathered_full_logits(setup):
    batch, variables = setup
    model = XLMEncoder(TINY)
    pred_index = jnp.array([[0, 7, 3], [4, 1, 1], [2, 0, 5]], jnp.int32)
    full = model.apply(variables, **batch)
    sub = model.apply(variables, **batch, pred_index=pred_index)
    expected = np.take_along_axis(np.asarray(full), np.asarray(pred_index)[:, :, None], axis=1)
    np.testing.assert_allclose(sub, expected, rtol=0, atol=1e-6)


def test_causal_mask_blocks_future_tokens(setup):
    batch, variables = setup
    tokens = batch["tokens"][:1]  # an unpadded row
    args = (batch["positions"][:1], batch["langs"][:1])
    base_causal = np.asarray(run(TINY, variables, tokens, *args, causal=True)[1])
    base_full = np.asarray(run(TINY, variables, tokens, *args)[1])
    for t in range(tokens.shape[1]):
        changed = tokens.at[0, t].set(PAD + 1 + (tokens[0, t] - PAD) % (TINY.vocab_size - PAD - 1))
        assert int(changed[0, t]) != int(tokens[0, t]) and int(changed[0, t]) != PAD
        causal = np.asarray(run(TINY, variables, changed, *args, causal=True)[1])
        # Exact: masked keys get exactly zero weight.
        np.testing.assert_array_equal(causal[:, :t], base_causal[:, :t])
        assert not np.allclose(causal[:, t], base_causal[:, t])
        if t > 0:
            full = np.asarray(run(TINY, variables, changed, *args)[1])
            assert not np.allclose(full[:, :t], base_full[:, :t])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_never_leaks(setup, causal):
    batch, variables = setup
    tokens, positions, langs = batch["tokens"], batch["positions"], batch["langs"]
    pad = np.asarray(tokens) == PAD
    real = ~pad
    base_hidden, base_logits = map(np.asarray, run(TINY, variables, *batch.values(), causal))
    np.testing.assert_array_equal(base_hidden[pad], 0.0)

    # Arbitrary content at padded slots: other positions / langs, and another pad embedding.
    positions2 = jnp.where(pad, 31 - positions, positions)
    langs2 = jnp.where(pad, (langs + 1) % TINY.n_langs, langs)
    variables2 = jax.tree.map(lambda x: x, variables)
    table = variables2["params"]["embeddings"]["embedding"]
    variables2["params"]["embeddings"]["embedding"] = table.replace_boxed(
        table.value.at[PAD].set(1.0)
    )
    hidden, logits = map(np.asarray, run(TINY, variables2, tokens, positions2, langs2, causal))
    np.testing.assert_array_equal(hidden, base_hidden)
    # Every logit but the pad token's own (its row of the tied table was changed) is unchanged.
    keep = np.arange(TINY.vocab_size) != PAD
    np.testing.assert_array_equal(logits[real][:, keep], base_logits[real][:, keep])

    # Extra trailing padding changes the shapes, not the real outputs (summation order may).
    extend = lambda x, v: jnp.pad(x, ((0, 0), (0, 4)), constant_values=v)
    longer = np.asarray(
        run(TINY, variables, extend(tokens, PAD), extend(positions, 0), extend(langs, 0), causal)[1]
    )
    np.testing.assert_allclose(longer[:, :8][real], base_logits[real], rtol=0, atol=1e-6)


def test_fully_padded_row_is_finite(setup):
    batch, variables = setup
    assert bool(jnp.all(batch["tokens"][2] == PAD))
    for causal in (False, True):
        hidden, logits = run(TINY, variables, **batch, causal=causal)
        assert bool(jnp.all(jnp.isfinite(logits)))
        np.testing.assert_array_equal(hidden[2], 0.0)


def test_logical_axis_names(setup):
    _, variables = setup
    specs = nn.get_partition_spec(variables)["params"]
    layer = specs["layer_0"]
    expected = {
        ("embeddings", "embedding"): ("vocab", "embed"),
        ("position_embeddings", "embedding"): ("positions", "embed"),
        ("lang_embeddings", "embedding"): ("langs", "embed"),
        ("layer_norm_emb", "scale"): ("embed",),
        ("pred_bias",): ("vocab",),
    }
    for path, names in expected.items():
        node = specs
        for key in path:
            node = node[key]
        assert node == PartitionSpec(*names), path
    for name in ("query", "key", "value"):
        assert layer["attention"][name]["kernel"] == PartitionSpec("embed", "heads", "kv")
        assert layer["attention"][name]["bias"] == PartitionSpec("heads", "kv")
    assert layer["attention"]["out"]["kernel"] == PartitionSpec("heads", "kv", "embed")
    assert layer["attention"]["out"]["bias"] == PartitionSpec("embed")
    assert layer["ffn"]["lin1"]["kernel"] == PartitionSpec("embed", "mlp")
    assert layer["ffn"]["lin1"]["bias"] == PartitionSpec("mlp")
    assert layer["ffn"]["lin2"]["kernel"] == PartitionSpec("mlp", "embed")
    assert layer["ffn"]["lin2"]["bias"] == PartitionSpec("embed")
    assert layer["layer_norm1"]["bias"] == PartitionSpec("embed")
    assert layer["layer_norm2"]["scale"] == PartitionSpec("embed")
    params = variables["params"]
    assert params["layer_1"]["attention"]["query"]["kernel"].value.shape == (16, 4, 4)
    assert params["layer_1"]["attention"]["out"]["kernel"].value.shape == (4, 4, 16)


def test_constraints_are_noops_without_rules_and_work_under_a_mesh(setup):
    batch, variables = setup
    model = XLMEncoder(TINY)
    apply = lambda v: model.apply(v, **batch)
    assert "sharding_constraint" not in str(jax.make_jaxpr(apply)(variables))
    with nn.logical_axis_rules((("batch", "data"),)):  # rules but no mesh: still no-ops
        assert "sharding_constraint" not in str(jax.make_jaxpr(apply)(variables))
    expected = run(TINY, variables, **batch)[1]
    # One device is enough to exercise the constraint code path, including flax#3676 (3-D
    # logical kernels through DenseGeneral fail while tracing init under a mesh).
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rules = (("batch", "data"), ("vocab", "data"), ("heads", "data"), ("mlp", "data"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shapes = jax.eval_shape(model.init, *init_args(batch))
        assert jax.tree.structure(shapes) == jax.tree.structure(variables)
        assert "sharding_constraint" in str(jax.make_jaxpr(apply)(variables))
        logits = jax.jit(apply)(variables)  # a fresh jit: rules are not part of jit's cache key
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)


def test_tied_output_projection(setup):
    batch, variables = setup
    model = XLMEncoder(TINY)
    params = variables["params"]
    bias = jax.random.normal(jax.random.key(3), (TINY.vocab_size,))
    params = {**params, "pred_bias": params["pred_bias"].replace_boxed(bias)}
    variables = {"params": params}
    hidden = np.asarray(model.apply(variables, **batch, method=model.encode), np.float64)
    logits = model.apply(variables, **batch)
    table = np.asarray(params["embeddings"]["embedding"].value, np.float64)
    expected = hidden @ table.T + np.asarray(bias, np.float64)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    direct = model.apply(variables, jnp.asarray(hidden, jnp.float32), method=model.logits)
    np.testing.assert_allclose(direct, logits, rtol=0, atol=1e-6)


def test_sinusoidal_and_no_lang_embeddings(setup):
    batch, _ = setup
    config = ModelConfig(**{**TINY.to_dict(), "sinusoidal_embeddings": True, "use_lang_emb": False})
    shapes = param_shapes(config, batch)
    params = dict(setup[1]["params"])
    del params["position_embeddings"], params["lang_embeddings"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    out = run(config, {"params": params}, **batch)[1]
    langs = batch["langs"] + 1
    other_langs = run(config, {"params": params}, batch["tokens"], batch["positions"], langs)[1]
    np.testing.assert_array_equal(out, other_langs)
    assert bool(jnp.all(jnp.isfinite(out)))
    # A single-language model has no language embedding either (as XLM: n_langs > 1 only).
    mono = ModelConfig(**{**TINY.to_dict(), "n_langs": 1})
    assert "lang_embeddings" not in param_shapes(mono, batch)
    # The table of XLM's create_sinusoidal_embeddings, written out element by element.
    table = layers.sinusoidal_table(5, 6)
    for pos in range(5):
        for j in range(6):
            angle = pos / 10000 ** (2 * (j // 2) / 6)
            ref = np.sin(angle) if j % 2 == 0 else np.cos(angle)
            assert abs(table[pos, j] - ref) < 1e-7


def xlm15_param_count(v: int, n_langs: int, d: int, n_layers: int, f: int, p: int) -> int:
    embeddings = v * d + p * d + n_langs * d + 2 * d  # token, position, language, layer_norm_emb
    attention = 4 * (d * d + d)  # q, k, v, out
    ffn = d * f + f + f * d + d
    layer_norms = 2 * 2 * d
    return embeddings + n_layers * (attention + ffn + layer_norms) + v  # + pred_bias (tied W)


def test_xlm15_parameter_count_without_materialising():
    config = ModelConfig(
        vocab_size=95000, n_langs=15, emb_dim=1024, n_layers=12, n_heads=8, max_positions=512
    )
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    shapes = jax.eval_shape(XLMEncoder(config).init, jax.random.key(0), tokens, tokens, tokens)
    expected = xlm15_param_count(95000, 15, 1024, 12, 4096, 512)
    assert expected == 249_071_384  # "250M" in the XLM paper
    assert count_params(shapes["params"]) == expected


def test_flops_formula_matches_kernel_count(setup):
    _, variables = setup
    kernels = sum(
        leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(variables))
        if "kernel" in jax.tree_util.keystr(path)
    )
    d, n, v, length, p = TINY.emb_dim, TINY.n_layers, TINY.vocab_size, 8, 0.15
    expected = 6 * kernels + 12 * n * length * d + 6 * p * d * v
    assert xlm_flops_per_token(TINY, length, p) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        xlm_flops_per_token(TINY, length, 1.5)


def test_dropout_uses_dropout_rng(setup):
    batch, variables = setup
    model = XLMEncoder(TINY)
    apply = jax.jit(
        lambda key, det: model.apply(variables, **batch, deterministic=det, rngs={"dropout": key}),
        static_argnums=1,
    )
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, a_again, b = apply(k1, False), apply(k1, False), apply(k2, False)
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(apply(k1, True), apply(k2, True))
    # Without any rng (eager, so fusion may differ in the last bit).
    plain = model.apply(variables, **batch)
    np.testing.assert_allclose(apply(k1, True), plain, rtol=0, atol=1e-6)


def test_initialisation_follows_xlm(setup):
    _, variables = setup
    params = nn.meta.unbox(variables)["params"]
    table = np.asarray(params["embeddings"]["embedding"])
    np.testing.assert_array_equal(table[PAD], 0.0)  # XLM's padding_idx row
    np.testing.assert_array_equal(params["pred_bias"], 0.0)
    attn, ffn = params["layer_0"]["attention"], params["layer_0"]["ffn"]
    # PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias.
    for w, fan_in in [
        (attn["query"]["kernel"], 16),
        (attn["out"]["kernel"], 16),
        (attn["query"]["bias"], 16),
        (ffn["lin1"]["kernel"], 16),
        (ffn["lin2"]["kernel"], 64),
        (ffn["lin2"]["bias"], 64),
    ]:
        bound = fan_in**-0.5
        assert float(jnp.max(jnp.abs(w))) <= bound
        assert float(jnp.max(jnp.abs(w))) > 0.5 * bound


def test_bfloat16_compute_keeps_float32_logits(setup):
    batch, variables = setup
    config = ModelConfig(**{**TINY.to_dict(), "dtype": "bfloat16"})
    shapes = param_shapes(config, batch)
    assert shapes["layer_0"]["ffn"]["lin1"]["kernel"].value.dtype == jnp.float32  # param_dtype
    hidden, logits = run(config, variables, **batch)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    reference = run(TINY, variables, **batch)[1]
    np.testing.assert_allclose(logits, reference, rtol=0, atol=0.1)


def test_config_validation_and_dict_round_trip():
    assert TINY.ffn_dim == 4 * TINY.emb_dim and TINY.head_dim == 4
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig(vocab_size=10, n_langs=1, emb_dim=10, n_heads=4)
    with pytest.raises(ValueError, match="pad_id"):
        ModelConfig(vocab_size=2, n_langs=1)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(vocab_size=10, n_langs=1, dropout=1.0)
    with pytest.raises(ValueError, match="float dtype"):
        ModelConfig(vocab_size=10, n_langs=1, dtype="int32")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"vocab_size": 10, "n_langs": 1, "emb_size": 3})


@pytest.mark.parametrize("rng, resolution", [("hash", 2**32), ("threefry16", 2**16)])
def test_dropout_rate_scale_and_determinism(rng, resolution):
    """The realised rate is the configured one (to the rng's resolution, within sampling error),
    kept values carry the exact inverse keep probability, the mean is unbiased, the same key
    gives the same mask, and neighbours along either axis, or two keys, decide independently."""
    from xlm_jax.model.layers import Dropout

    x = jnp.ones((64, 257, 33), jnp.float32)  # odd size: one half of the last word is unused
    drop = Dropout(0.1, rng)
    y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    kept = np.asarray(y != 0)
    n = kept.size
    keep = round(0.9 * resolution) / resolution
    # 5 standard deviations of a binomial proportion: fails on a wrong rate, not by chance
    assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)
    np.testing.assert_array_equal(np.asarray(y)[kept], np.float32(1 / keep))
    assert abs(float(y.mean()) - 1.0) < 5 * np.sqrt((1 - keep) / keep / n)
    again = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(np.asarray(again), np.asarray(y))
    other = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    dropped, other_dropped = ~kept, np.asarray(other) == 0
    # both dropped, for pairs of neighbours (last axis, first axis) and of keys: the rate squared
    for a, b in [
        (dropped[..., 1:], dropped[..., :-1]),
        (dropped[1:], dropped[:-1]),
        (dropped, other_dropped),
    ]:
        p = (1 - keep) ** 2
        assert abs((a & b).mean() - p) < 5 * np.sqrt(p * (1 - p) / a.size)
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)


def _loss_and_grads(config: ModelConfig, variables: dict, batch: dict, *, causal: bool = False):
    """Mean logit of real tokens in training mode (dropout on) and its gradients."""
    model = XLMEncoder(config)

    def loss(params):
        logits = model.apply(
            {"params": params},
            batch["tokens"],
            batch["positions"],
            batch["langs"],
            causal=causal,
            deterministic=False,
            rngs={"dropout": jax.random.key(7)},
        )
        weights = (batch["tokens"] != PAD)[..., None]
        return jnp.sum(jnp.where(weights, jnp.tanh(logits), 0.0))

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("causal", [False, True])
def test_dot_product_attention_matches_the_explicit_one(causal):
    """`attention_impl="xla"` (jax.nn.dot_product_attention, the cuDNN path's XLA twin) computes
    the explicit attention: same parameters, same loss and gradients (padded rows included)."""
    import dataclasses

    explicit = dataclasses.replace(TINY, attention_dropout=0.0)
    fused = dataclasses.replace(explicit, attention_impl="xla")
    batch = make_batch()
    variables = XLMEncoder(explicit).init(*init_args(batch))
    assert jax.tree.structure(XLMEncoder(fused).init(*init_args(batch))) == jax.tree.structure(
        variables
    )
    loss_a, grads_a = _loss_and_grads(explicit, variables, batch, causal=causal)
    loss_b, grads_b = _loss_and_grads(fused, variables, batch, causal=causal)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        # Two float32 summation orders: an element's error scales with the leaf's largest terms,
        # not with the element (a Zen 3 EPYC measured up to 4.8e-7 of the leaf's largest value).
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_memory_not_results(policy):
    """Recomputing blocks in the backward pass keeps parameter names, loss and gradients (with
    dropout on: the recomputed masks are the same)."""
    import dataclasses

    rematted = dataclasses.replace(TINY, remat=policy)
    batch = make_batch()
    variables = XLMEncoder(TINY).init(*init_args(batch))
    assert jax.tree.structure(XLMEncoder(rematted).init(*init_args(batch))) == jax.tree.structure(
        variables
    )
    loss_a, grads_a = _loss_and_grads(TINY, variables, batch)
    loss_b, grads_b = _loss_and_grads(rematted, variables, batch)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        # Recomputed blocks are fused differently, so float32 sums round differently: 1e-7, or a
        # few ulps of the tensor's largest entry if more (1e-7 alone held on an Intel Xeon; on an
        # AMD EPYC "dots" differed by 1.6e-7 in one entry of a tensor whose largest is 0.7).
        ulps = 4 * np.finfo(np.float32).eps * float(np.max(np.abs(a)))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=max(1e-7, ulps))


def test_runtime_options_are_validated():
    import dataclasses

    with pytest.raises(ValueError, match="attention_impl='flash'"):
        dataclasses.replace(TINY, attention_impl="flash")
    with pytest.raises(ValueError, match="has no attention dropout"):
        dataclasses.replace(TINY, attention_impl="cudnn", attention_dropout=0.1)
    with pytest.raises(ValueError, match="remat='some'"):
        dataclasses.replace(TINY, remat="some")


# --- XLM's --gelu_activation false and --share_inout_emb false ---------------------------------

RELU_UNTIED = ModelConfig(**{**TINY.to_dict(), "gelu_activation": False, "share_inout_emb": False})


def test_relu_ffn_is_max_zero_between_the_two_linears():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    relu = layers.FeedForward(64, gelu_activation=False)
    variables = relu.init(jax.random.key(1), x)
    p = nn.meta.unbox(variables)["params"]
    h = np.asarray(x, np.float64) @ np.asarray(p["lin1"]["kernel"], np.float64) + p["lin1"]["bias"]
    expected = np.maximum(h, 0.0) @ np.asarray(p["lin2"]["kernel"], np.float64) + p["lin2"]["bias"]
    np.testing.assert_allclose(relu.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
    gelu = layers.FeedForward(64).apply(variables, x)  # same parameters, the default activation
    assert not np.allclose(gelu, expected, atol=1e-3)


def test_untied_output_layer_has_its_own_weight(setup):
    batch, tied = setup
    shapes = param_shapes(RELU_UNTIED, batch)
    assert set(shapes) == set(tied["params"]) | {"pred_weight"}
    spec = nn.get_partition_spec(shapes)["pred_weight"]
    assert spec == PartitionSpec("vocab", "embed")  # sharded as the embedding table
    assert shapes["pred_weight"].value.shape == (TINY.vocab_size, TINY.emb_dim)
    # V * d more parameters (XLM's proj.weight), the same matmul FLOPs
    assert count_params(shapes) - count_params(tied["params"]) == TINY.vocab_size * TINY.emb_dim
    assert xlm_flops_per_token(RELU_UNTIED, 8, 0.15) == xlm_flops_per_token(TINY, 8, 0.15)

    model = XLMEncoder(RELU_UNTIED)
    hidden = jax.random.normal(jax.random.key(4), (3, 8, TINY.emb_dim))
    # Only the output layer's parameters: the untied head never reads the embeddings.
    head = nn.meta.unbox(model.init(jax.random.key(0), hidden, method=model.logits))["params"]
    assert set(head) == {"pred_bias", "pred_weight"}
    weight = np.asarray(head["pred_weight"])
    bound = TINY.emb_dim**-0.5  # torch's Linear(emb_dim, vocab) init, as XLM's PredLayer
    assert 0.5 * bound < np.abs(weight).max() <= bound
    bias = np.asarray(jax.random.normal(jax.random.key(3), (TINY.vocab_size,)))
    table = np.asarray(tied["params"]["embeddings"]["embedding"].value)
    logits = jax.jit(lambda p: model.apply({"params": p}, hidden, method=model.logits))

    embeddings = {"embedding": table}
    out = np.asarray(logits({"pred_bias": bias, "pred_weight": weight, "embeddings": embeddings}))
    expected = np.asarray(hidden, np.float64) @ weight.T.astype(np.float64) + bias
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    changed = logits(
        {"pred_bias": bias, "pred_weight": weight, "embeddings": {"embedding": table + 1}}
    )
    np.testing.assert_array_equal(changed, out)  # not the embeddings ...
    moved = logits({"pred_bias": bias, "pred_weight": weight + 1.0, "embeddings": embeddings})
    assert not np.allclose(moved, out)  # ... its own weight


def test_encoder_and_decoder_blocks_honour_both_settings(setup):
    """Traced, not compiled: every block's FFN uses ReLU (no erf left), and the decoder gets its
    own output weight too."""
    from xlm_jax.model.decoder import XLMDecoder

    batch, _ = setup
    args = (batch["tokens"], batch["positions"], batch["langs"])
    memory = jnp.zeros((3, 8, TINY.emb_dim))
    for cls, extra in ((XLMEncoder, ()), (XLMDecoder, (memory, batch["tokens"] != PAD))):
        for config in (TINY, RELU_UNTIED):
            model = cls(config)
            shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args, *extra))
            assert ("pred_weight" in shapes["params"]) == (not config.share_inout_emb)
            jaxpr = str(jax.make_jaxpr(model.apply)(shapes, *args, *extra))
            # exact GELU is the only erf of the model: one per block, or none at all
            gelus = TINY.n_layers if config.gelu_activation else 0
            assert jaxpr.count("= erf ") == gelus, cls.__name__
            assert ("name=relu" in jaxpr) == (not config.gelu_activation), cls.__name__


def test_activation_and_tying_settings_reach_the_model_and_the_resume_check():
    from xlm_jax.tasks import pretrain, pretrain_config

    config = pretrain_config.default_config()
    assert pretrain.model_config(config, 40) == ModelConfig(vocab_size=40, n_langs=2)  # defaults
    config.model.gelu_activation, config.model.share_inout_emb = False, False
    relu = pretrain.model_config(config, 40)
    assert not relu.gelu_activation and not relu.share_inout_emb
    with pytest.raises(ValueError, match="gelu_activation must be a bool"):
        ModelConfig(vocab_size=10, n_langs=1, gelu_activation="false")

    def fingerprint(model: ModelConfig, drop: tuple[str, ...] = ()) -> dict:
        d = {k: v for k, v in model.to_dict().items() if k not in drop}
        return {"model": d | {"langs": ["en", "fr"]}, "tokenizer_sha256": "x"}

    gelu = pretrain.model_config(pretrain_config.default_config(), 40)
    # A checkpoint written before the two settings existed resumes as GELU + tied ...
    old = fingerprint(gelu, drop=("gelu_activation", "share_inout_emb"))
    assert ModelConfig.from_dict({k: v for k, v in old["model"].items() if k != "langs"}) == gelu
    pretrain.check_compatible(old, fingerprint(gelu), "old")
    with pytest.raises(ValueError, match="model.gelu_activation: checkpoint True vs config False"):
        pretrain.check_compatible(old, fingerprint(relu), "old")
    # ... and a change of activation or tying is refused like any other model change.
    with pytest.raises(ValueError, match="model.share_inout_emb: checkpoint False vs config True"):
        pretrain.check_compatible(fingerprint(relu), fingerprint(gelu), "relu")
