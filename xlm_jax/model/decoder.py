"""The XLM Transformer decoder (XLM's `TransformerModel` with `is_decoder=True`) and its KV cache.

Same embeddings, parameter names, FFN activation and output layer (tied, or XLM's untied
`share_inout_emb=False`) as `XLMEncoder` (so a pretrained encoder initialises it by name); each
block adds cross-attention to the source with its own LayerNorm:
x = LN1(x + self_attn(x)); x = LN15(x + cross_attn(x, src)); x = LN2(x + ffn(x)), post-LN.
The target language reaches the decoder through the language embedding.

Two ways to run it: teacher forcing over a whole `(batch, length)` target (training), and `step`,
one token per row with a cache of keys/values (decoding). The cache is a dict of arrays whose
leading axis is the row, so beam search reorders it with a gather along axis 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlm_jax.model import layers
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.model.layers import ACT_EMBED

Array = jax.Array
Cache = dict[str, Array]
KV = tuple[Array, Array]


class DecoderLayer(nn.Module):
    """Self-attention (causal) → cross-attention → FFN, each followed by residual + LayerNorm."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, pdt = cfg.compute_dtype, cfg.params_dtype

        def attention() -> layers.MultiHeadAttention:
            return layers.MultiHeadAttention(
                cfg.n_heads,
                cfg.emb_dim,
                cfg.attention_dropout,
                dtype,
                pdt,
                cfg.attention_impl,
                cfg.dropout_rng,
            )

        def norm() -> nn.LayerNorm:
            return layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdt)

        # Names as the encoder's block (so pretrained weights load by name) plus XLM's
        # `encoder_attn` / `layer_norm15` pair for cross-attention.
        self.attention, self.layer_norm1 = attention(), norm()
        self.cross_attention, self.layer_norm15 = attention(), norm()
        self.ffn = layers.FeedForward(
            cfg.ffn_dim, cfg.dropout, dtype, pdt, cfg.gelu_activation, cfg.dropout_rng
        )
        self.layer_norm2 = norm()
        self.dropout = layers.Dropout(cfg.dropout, cfg.dropout_rng)

    def __call__(
        self,
        x: Array,
        self_kv: KV,
        self_mask: Array,
        cross_kv: KV,
        cross_mask: Array,
        valid: Array,
        *,
        deterministic: bool,
        cache_layout: bool = False,
        history: Array | None = None,
    ) -> Array:
        """One block given the keys/values to attend to (fresh projections, or a cache in
        `MultiHeadAttention.to_cache_layout`'s layout, its rows read through beam search's
        `history`: see `MultiHeadAttention.attend`)."""
        kw = {"deterministic": deterministic, "cache_layout": cache_layout}
        a = self.attention.attend(x, *self_kv, self_mask, history=history, **kw)
        x = self.layer_norm1(x + self.dropout(a, deterministic=deterministic))
        a = self.cross_attention.attend(x, *cross_kv, cross_mask, **kw)
        x = self.layer_norm15(x + self.dropout(a, deterministic=deterministic))
        x = self.layer_norm2(x + self.ffn(x, deterministic=deterministic))
        x = x * valid[..., None].astype(x.dtype)
        return nn.with_logical_constraint(x, ACT_EMBED)


class XLMDecoder(XLMEncoder):
    """Decoder with the encoder's embeddings and output layer (`XLMEncoder.logits`).

    Methods (`(batch, length)` int32 inputs; `memory` = encoder output, `memory_valid` its mask):
      __call__(tokens, positions, langs, memory, memory_valid, *, deterministic) -> logits
      init_cache(memory, memory_valid, langs, max_len, beam_size=1) -> cache
      step(tokens, index, cache) -> (logits (n, vocab), cache)
    """

    # The cache entries beam search reorders (`decoding.beam_search`'s `reordered`): the rest
    # stays in place, the source's the same for all beams, the keys/values read through it.
    BEAM_REORDERED = ("beam_history",)

    def make_layers(self) -> list[nn.Module]:
        if self.config.remat != "none":
            # The decoder reaches into its layers (projecting keys/values for the cache), which
            # a lifted `nn.remat` module does not allow; not needed for translation sizes so far.
            raise ValueError(f"remat={self.config.remat!r} is implemented for the encoder only")
        return [DecoderLayer(self.config, name=f"layer_{i}") for i in range(self.config.n_layers)]

    def decode(
        self,
        tokens: Array,
        positions: Array,
        langs: Array,
        memory: Array,
        memory_valid: Array,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Teacher-forced hidden states `(batch, length, emb_dim)`; position t sees targets <= t."""
        x, valid = self.embed(tokens, positions, langs, deterministic=deterministic)
        self_mask = layers.make_attention_mask(valid, causal=True)
        cross_mask = memory_valid[:, None, :]
        for layer in self.layers:
            x = layer(
                x,
                layer.attention.project_kv(x),
                self_mask,
                layer.cross_attention.project_kv(memory),
                cross_mask,
                valid,
                deterministic=deterministic,
            )
        return x

    def __call__(  # type: ignore[override]
        self,
        tokens: Array,
        positions: Array,
        langs: Array,
        memory: Array,
        memory_valid: Array,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Logits `(batch, length, vocab)` (float32) for the token after each position."""
        hidden = self.decode(
            tokens, positions, langs, memory, memory_valid, deterministic=deterministic
        )
        return self.logits(hidden)

    def init_cache(
        self, memory: Array, memory_valid: Array, langs: Array, max_len: int, beam_size: int = 1
    ) -> Cache:
        """A cache for decoding up to `max_len` tokens per row (the start token included), with
        `beam_size` rows per source sentence (row b * beam_size + j = beam j of sentence b).

        Cross-attention keys/values are projected once here, not at every step, and kept once
        per sentence: every beam's query reads the same rows. `langs` (batch,) is each sentence's
        target language. With beams, `beam_history` (rows, max_len) names the row whose keys and
        values hold each beam's position t: beam search reorders it (`BEAM_REORDERED`), and
        the cache itself stays in place.
        """
        cfg = self.config
        n = memory.shape[0] * beam_size
        to_cache = layers.MultiHeadAttention.to_cache_layout
        langs = jnp.repeat(langs.astype(jnp.int32), beam_size)
        cache: Cache = {"memory_valid": memory_valid, "langs": langs}
        if beam_size > 1:
            cache["beam_history"] = jnp.zeros((n, max_len), jnp.int32)
        for i, layer in enumerate(self.layers):
            cache[f"cross_k_{i}"], cache[f"cross_v_{i}"] = to_cache(
                *layer.cross_attention.project_kv(memory)
            )
            # In the layouts the products read (to_cache_layout's), with beams one row per beam:
            # `(sentences, beams, ...)` (read through `beam_history`; see `attend`).
            rows = (n,) if beam_size == 1 else (memory.shape[0], beam_size)
            dt, heads, head_dim = cfg.compute_dtype, cfg.n_heads, cfg.head_dim
            cache[f"self_k_{i}"] = jnp.zeros((*rows, heads, head_dim, max_len), dt)
            cache[f"self_v_{i}"] = jnp.zeros((*rows, heads, max_len, head_dim), dt)
        return cache

    def step(self, tokens: Array, index: Array, cache: Cache) -> tuple[Array, Cache]:
        """Feeds `tokens` (n,) at position `index` (a scalar, the same for all rows); returns the
        logits `(n, vocab)` of the next token and the cache with this position's keys/values.

        The n rows are `beams` per sentence of `memory_valid`; inside the blocks they are laid
        out `(sentences, beams, dim)`, each beam one query position of its sentence."""
        n = tokens.shape[0]
        sentences = cache["memory_valid"].shape[0]
        beams = n // sentences
        positions = jnp.full((n, 1), index, jnp.int32)
        x, valid = self.embed(
            tokens[:, None], positions, cache["langs"][:, None], deterministic=True
        )
        x, valid = x.reshape(sentences, beams, -1), valid.reshape(sentences, beams)
        max_len = cache["self_k_0"].shape[-1]
        # Row-independent: positions <= index are filled (earlier steps, or this one).
        self_mask = (jnp.arange(max_len) <= index)[None, None, :]
        cross_mask = cache["memory_valid"][:, None, :]
        cache = dict(cache)
        history = None
        if "beam_history" in cache:  # this position's keys/values go to each beam's own row
            own = (jnp.arange(n, dtype=jnp.int32) % beams)[:, None]
            cache["beam_history"] = jax.lax.dynamic_update_slice_in_dim(
                cache["beam_history"], own, index, axis=1
            )
            history = cache["beam_history"].reshape(sentences, beams, max_len)
        for i, layer in enumerate(self.layers):
            k, v = layer.attention.project_kv(x)  # (sentences, beams, heads, head_dim)
            if history is None:  # one row per sentence: (n, heads, head_dim, 1), (n, heads, 1, _)
                k, v = layers.MultiHeadAttention.to_cache_layout(k, v)
            else:  # (sentences, beams, heads, head_dim, 1), (sentences, beams, heads, 1, head_dim)
                k, v = k[..., None], v[..., None, :]
            # the position axis: last for keys, the one before last for values
            for name, new, axis in ((f"self_k_{i}", k, k.ndim - 1), (f"self_v_{i}", v, v.ndim - 2)):
                cache[name] = jax.lax.dynamic_update_slice_in_dim(
                    cache[name], new.astype(cache[name].dtype), index, axis=axis
                )
            x = layer(
                x,
                (cache[f"self_k_{i}"], cache[f"self_v_{i}"]),
                self_mask,
                (cache[f"cross_k_{i}"], cache[f"cross_v_{i}"]),
                cross_mask,
                valid,
                deterministic=True,
                cache_layout=True,
                history=history,
            )
        return self.logits(x.reshape(n, -1)), cache
