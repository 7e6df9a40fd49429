"""The translation model: decoder causality, KV-cache decoding, initialisation by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from xlm_jax.model import decoding
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.model.seq2seq import EncoderDecoder, init_from_pretrained
from xlm_jax.tasks import nmt
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

B, S, T, V = 3, 7, 6, 40


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_langs=2, emb_dim=16, n_layers=2, n_heads=2, dropout=0.0)
    return ModelConfig(**{**base, "attention_dropout": 0.0, **kw})


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, V, (B, S)).astype(np.int32)
    src[:, 0] = EOS_ID
    src[1, 5:] = PAD_ID  # a shorter source: its pads must not be attended to
    tgt = rng.integers(4, V, (B, T)).astype(np.int32)
    tgt[:, 0] = EOS_ID
    return {k: jnp.asarray(v) for k, v in nmt.pair_batch(src, 0, tgt, 1).items()}


@pytest.fixture(scope="module", params=["learned", "sinusoidal"])
def model_and_params(request):
    cfg = small(sinusoidal_embeddings=request.param == "sinusoidal")
    model = EncoderDecoder(cfg, cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), _batch())["params"])
    return model, params


def test_decoder_is_causal(model_and_params):
    model, params = model_and_params
    batch = _batch()
    logits = model.apply({"params": params}, batch)
    for t in range(1, T):
        changed = dict(batch, tgt_tokens=batch["tgt_tokens"].at[:, t:].set(7))
        other = model.apply({"params": params}, changed)
        # exactly equal before t (no information flows backwards), different from t on
        np.testing.assert_array_equal(np.asarray(other[:, :t]), np.asarray(logits[:, :t]))
        assert float(jnp.abs(other[:, t:] - logits[:, t:]).max()) > 1e-3


def test_padded_source_tokens_are_ignored(model_and_params):
    model, params = model_and_params
    batch = _batch()
    logits = model.apply({"params": params}, batch)
    # a different token under a pad position of row 1 changes nothing (it is still a pad)
    longer = dict(batch, src_positions=batch["src_positions"].at[1, 5:].set(3))
    np.testing.assert_array_equal(
        np.asarray(model.apply({"params": params}, longer)), np.asarray(logits)
    )


def test_cached_decoding_equals_full_recomputation(model_and_params):
    model, params = model_and_params
    batch = _batch()
    full = model.apply({"params": params}, batch)
    cache = model.apply(
        {"params": params},
        batch["src_tokens"],
        batch["src_positions"],
        batch["src_langs"],
        jnp.ones((B,), jnp.int32),
        T + 3,  # a cache longer than the target: unused slots must be masked
        method=EncoderDecoder.init_cache,
    )
    steps = []
    for t in range(T):
        logits, cache = model.apply(
            {"params": params},
            batch["tgt_tokens"][:, t],
            jnp.int32(t),
            cache,
            method=EncoderDecoder.step,
        )
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.stack(steps, 1)), np.asarray(full), atol=1e-5)


def _decoder_fns(model, params, batch, max_len, beam_size=1):
    cache = model.apply(
        {"params": params},
        batch["src_tokens"],
        batch["src_positions"],
        batch["src_langs"],
        jnp.ones((B,), jnp.int32),
        max_len + 1,
        beam_size=beam_size,
        method=EncoderDecoder.init_cache,
    )

    def step_fn(tokens, index, cache):
        return model.apply({"params": params}, tokens, index, cache, method=EncoderDecoder.step)

    return step_fn, cache


def test_beam_cache_is_reordered_through_its_history(model_and_params):
    """Beam search's cache stays in place and only `beam_history` follows the parent beams: each
    step's logits equal those of a cache with one row per beam, every row gathered."""
    model, params = model_and_params
    batch, beams = _batch(5), 3
    step_fn, in_place = _decoder_fns(model, params, batch, 6, beam_size=beams)
    _, per_row = _decoder_fns(model, params, batch, 6)
    per_row = decoding.tile_beams(per_row, beams)
    rng = np.random.default_rng(0)
    for t in range(5):
        tokens = jnp.asarray(rng.integers(4, V, B * beams), jnp.int32)
        logits, in_place = step_fn(tokens, jnp.int32(t), in_place)
        expected, per_row = step_fn(tokens, jnp.int32(t), per_row)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)
        parents = rng.integers(0, beams, (B, beams))  # beams switch parents at every step
        rows = jnp.asarray((np.arange(B)[:, None] * beams + parents).reshape(-1))
        in_place = decoding._reorder_cache(in_place, rows, EncoderDecoder.BEAM_REORDERED)
        per_row = decoding._reorder_cache(per_row, rows)


def test_beam_one_equals_greedy_on_the_model(model_and_params):
    """XLM's beam search with one beam and early stopping is greedy search (tokens, lengths)."""
    model, params = model_and_params
    bias = params["decoder"]["pred_bias"]
    params = {**params, "decoder": {**params["decoder"], "pred_bias": bias.at[EOS_ID].add(2.0)}}
    batch = _batch(1)
    step_fn, cache = _decoder_fns(model, params, batch, 9)
    kw = dict(batch_size=B, max_len=9, bos_id=EOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
    greedy = decoding.greedy_decode(step_fn, cache, **kw)
    beam = decoding.beam_search(step_fn, cache, beam_size=1, early_stopping=True, **kw)
    np.testing.assert_array_equal(np.asarray(greedy[0]), np.asarray(beam[0]))
    np.testing.assert_array_equal(np.asarray(greedy[1]), np.asarray(beam[1]))
    assert int(greedy[1].min()) < 10  # some row ended on its own </s>


def test_generate_without_eos_fills_the_length(model_and_params):
    model, params = model_and_params
    batch = _batch(2)
    tokens, lengths = nmt.generate(
        model, params, batch, jnp.int32(1), max_len=(1.0, 3.0), eos_allowed=False
    )
    n_src = np.asarray((batch["src_tokens"] != PAD_ID).sum(1))
    # every row runs to its own limit int(1.0 * n + 3), ending with </s>
    np.testing.assert_array_equal(np.asarray(lengths), np.minimum(n_src + 3, S + 3))
    for row, n in zip(np.asarray(tokens), np.asarray(lengths), strict=True):
        assert row[0] == EOS_ID and row[n - 1] == EOS_ID and (row[1 : n - 1] != EOS_ID).all()
        assert (row[n:] == PAD_ID).all()


def test_xlm_s_batch_length_rule(model_and_params):
    """max_len_rule="batch" (XLM's evaluator and bt_step): every row may run to
    int(a * the batch's longest source + b), the short row 1 as well."""
    model, params = model_and_params
    batch = _batch(2)
    src = {k: v for k, v in batch.items() if k.startswith("src_")}
    kw = dict(max_len=(1.0, 3.0), eos_allowed=False)  # one limit for greedy and beam alike
    _, lengths = nmt.generate(model, params, src, jnp.int32(1), max_len_rule="batch", **kw)
    n_src = np.asarray((batch["src_tokens"] != PAD_ID).sum(1))
    assert n_src[1] < n_src.max()
    np.testing.assert_array_equal(np.asarray(lengths), np.full(B, n_src.max() + 3))
    _, per_row = nmt.generate(model, params, src, jnp.int32(1), **kw)
    np.testing.assert_array_equal(np.asarray(per_row), n_src + 3)


def test_beam_search_scores_its_own_output(model_and_params):
    """The returned beam score is the model's log-probability of the returned tokens / length."""
    model, params = model_and_params
    # make </s> likely enough that hypotheses end on their own within the limit
    bias = params["decoder"]["pred_bias"]
    params = {**params, "decoder": {**params["decoder"], "pred_bias": bias.at[EOS_ID].add(3.0)}}
    batch = _batch(3)
    src = {k: v for k, v in batch.items() if k.startswith("src_")}
    total = nmt.max_len_of(S, 1.0, 3.0)
    step_fn, cache = _decoder_fns(model, params, batch, total - 1, beam_size=3)

    tokens, lengths, scores = decoding.beam_search(
        step_fn,
        cache,  # the decoder's beam cache: rows in place, read through `beam_history`
        reordered=EncoderDecoder.BEAM_REORDERED,
        batch_size=B,
        beam_size=3,
        max_len=total - 1,
        bos_id=EOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        length_penalty=1.0,
    )
    tgt = nmt.pair_batch(src["src_tokens"], 0, tokens, 1)
    logp = jax.nn.log_softmax(model.apply({"params": params}, tgt), axis=-1)
    for b in range(B):
        n = int(lengths[b])
        assert n < total  # ended by the model's own </s>, not forced at the limit
        picked = logp[b, jnp.arange(n - 1), tokens[b, 1:n]]
        # XLM's BeamHypotheses: sum of log-probs / len(hyp) ** lp, hyp = start token + words
        np.testing.assert_allclose(float(picked.sum()) / (n - 1), float(scores[b]), rtol=1e-5)


def _encoder_params(cfg: ModelConfig):
    dummy = jnp.zeros((2, 5), jnp.int32)
    return nn.meta.unbox(XLMEncoder(cfg).init(jax.random.key(1), dummy, dummy, dummy)["params"])


def test_init_from_pretrained_copies_by_name():
    enc_params = _encoder_params(small())
    model = EncoderDecoder(small(), small(n_layers=1))
    fresh = nn.meta.unbox(model.init(jax.random.key(2), _batch())["params"])
    params, left = init_from_pretrained(fresh, enc_params)
    flat = traverse_util.flatten_dict(params, sep="/")
    src = traverse_util.flatten_dict(enc_params, sep="/")
    for name, value in flat.items():
        if name not in left:
            np.testing.assert_array_equal(value, src[name.split("/", 1)[1]])
    # fresh: only the decoder's cross-attention and its LayerNorm, nothing of the encoder
    assert sorted({k.split("/")[2] for k in left}) == ["cross_attention", "layer_norm15"]
    assert all(k.startswith("decoder/layer_0/") for k in left)
    # the one-layer decoder takes the pretrained layer_0; layer_1 goes to the encoder only
    assert not any(k.startswith("decoder/layer_1") for k in flat)
    assert "encoder/layer_1/ffn/lin1/kernel" in flat
    with pytest.raises(ValueError, match="does not fit"):
        init_from_pretrained(fresh, _encoder_params(small(emb_dim=8)))


def test_a_shallower_encoder_takes_the_first_pretrained_layers():
    """enc_layers=1 of a 2-layer source: the encoder's layer_0 is the source's, the decoder
    has both layers; the source's layer_1 reaches only the decoder."""
    enc_params = _encoder_params(small())
    model = EncoderDecoder(small(n_layers=1), small())
    fresh = nn.meta.unbox(model.init(jax.random.key(2), _batch())["params"])
    params, left = init_from_pretrained(fresh, enc_params)
    flat = traverse_util.flatten_dict(params, sep="/")
    src = traverse_util.flatten_dict(enc_params, sep="/")
    assert not any(k.startswith("encoder/layer_1") for k in flat)
    for half in ("encoder/layer_0", "decoder/layer_0", "decoder/layer_1"):
        copied = [k for k in flat if k.startswith(half) and k not in left]
        assert copied
        for name in copied:
            np.testing.assert_array_equal(flat[name], src[name.split("/", 1)[1]], err_msg=name)
    assert all(k.split("/")[0] == "decoder" for k in left)


def test_kv_cache_and_recomputation_translate_alike(model_and_params):
    """Greedy and beam-3 translations with the KV cache equal those that re-run the decoder
    over the whole prefix at every step."""
    model, params = model_and_params
    batch = _batch(4)
    for beam in (1, 3):
        out = [
            nmt.generate(
                model,
                params,
                batch,
                jnp.int32(1),
                max_len=(1.2, 3.0),
                beam_size=beam,
                kv_cache=kv,
            )
            for kv in (True, False)
        ]
        for a, b in zip(*out, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
