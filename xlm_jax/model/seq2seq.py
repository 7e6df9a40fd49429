"""XLM's translation model: an `XLMEncoder` and an `XLMDecoder`, each with its own embeddings.

As XLM's `build_model` for MT, both are initialised from a pretrained cross-lingual LM (by
parameter name; `init_from_pretrained`), the decoder's cross-attention fresh. Batches follow the
project's convention with `src_` / `tgt_` prefixes (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xlm_jax.model import decoding
from xlm_jax.model.decoder import Cache, XLMDecoder
from xlm_jax.model.encoder import ModelConfig, XLMEncoder, xlm_flops_per_token

Array = jax.Array


class EncoderDecoder(nn.Module):
    """Methods:
    __call__(batch, *, deterministic) -> logits (batch, tgt_len, vocab) for the next target token
    encode(tokens, positions, langs) -> memory (batch, src_len, emb_dim)
    init_cache(src_tokens, src_positions, src_langs, tgt_langs (batch,), max_len, kv_cache,
               beam_size) -> cache with beam_size rows per sentence
    step(tokens (n,), index, cache) -> (logits (n, vocab), cache)
    """

    encoder_config: ModelConfig
    decoder_config: ModelConfig
    # What beam search reorders: the KV cache's history index, or the recomputed prefix.
    BEAM_REORDERED = (*XLMDecoder.BEAM_REORDERED, "prefix")

    def setup(self) -> None:
        self.encoder = XLMEncoder(self.encoder_config)
        self.decoder = XLMDecoder(self.decoder_config)

    def encode(
        self, tokens: Array, positions: Array, langs: Array, *, deterministic: bool = True
    ) -> Array:
        return self.encoder.encode(tokens, positions, langs, deterministic=deterministic)

    def __call__(self, batch: Mapping[str, Array], *, deterministic: bool = True) -> Array:
        memory = self.encode(
            batch["src_tokens"],
            batch["src_positions"],
            batch["src_langs"],
            deterministic=deterministic,
        )
        return self.decoder(
            batch["tgt_tokens"],
            batch["tgt_positions"],
            batch["tgt_langs"],
            memory,
            batch["src_tokens"] != self.encoder_config.pad_id,
            deterministic=deterministic,
        )

    def init_cache(
        self,
        src_tokens: Array,
        src_positions: Array,
        src_langs: Array,
        tgt_langs: Array,
        max_len: int,
        kv_cache: bool = True,
        beam_size: int = 1,
    ) -> Cache:
        """Encodes the source (inference mode) and builds the decoder's cache for `max_len`,
        with `beam_size` rows per sentence (`XLMDecoder.init_cache`).

        `kv_cache=False` keeps only the generated prefix, and every `step` runs the decoder over
        all of it again: the same outputs, the reference that the KV cache is measured against.
        """
        memory = self.encode(src_tokens, src_positions, src_langs, deterministic=True)
        memory_valid = src_tokens != self.encoder_config.pad_id
        if kv_cache:
            return self.decoder.init_cache(memory, memory_valid, tgt_langs, max_len, beam_size)
        n = src_tokens.shape[0]
        cache = {
            "memory": memory,
            "memory_valid": memory_valid,
            "langs": tgt_langs.astype(jnp.int32),
            "prefix": jnp.full((n, max_len), self.decoder_config.pad_id, jnp.int32),
        }
        return decoding.tile_beams(cache, beam_size)

    def step(self, tokens: Array, index: Array, cache: Cache) -> tuple[Array, Cache]:
        if "prefix" not in cache:
            return self.decoder.step(tokens, index, cache)
        prefix = jax.lax.dynamic_update_slice_in_dim(cache["prefix"], tokens[:, None], index, 1)
        n, length = prefix.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
        langs = jnp.broadcast_to(cache["langs"][:, None], (n, length))
        hidden = self.decoder.decode(
            prefix, positions, langs, cache["memory"], cache["memory_valid"]
        )
        # Positions after `index` are pads: masked as keys, so they cannot change position index.
        hidden = jax.lax.dynamic_index_in_dim(hidden, index, axis=1, keepdims=False)
        return self.decoder.logits(hidden), {**cache, "prefix": prefix}


def init_from_pretrained(
    params: Mapping[str, Any],
    pretrained: Mapping[str, Any],
    put: Callable[[Any, Any], Any] = lambda host, like: np.asarray(host, like.dtype),
) -> tuple[dict[str, Any], list[str]]:
    """Copies a pretrained encoder's parameters into both halves of `params` by name.

    `params` is the fresh initialisation (host or device arrays), `pretrained` a host tree;
    `put(host_value, fresh_leaf)` places a copied value like the leaf it replaces.
    The decoder takes the first `n_layers` layers of the pretrained model (XLM's reload rule);
    what has no counterpart (cross-attention, `layer_norm15`) keeps its fresh values. Returns the
    new tree and the names left fresh. Shapes must agree: a mismatch is an error naming it.
    """
    source = traverse_util.flatten_dict(dict(pretrained), sep="/")
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    fresh, mismatched = [], []
    for name, value in flat.items():
        part, _, inner = name.partition("/")
        if part not in ("encoder", "decoder") or inner not in source:
            fresh.append(name)
            continue
        src = source[inner]
        if tuple(np.shape(src)) != tuple(value.shape):
            mismatched.append(f"{name}: pretrained {np.shape(src)} vs model {value.shape}")
            continue
        flat[name] = put(src, value)
    if mismatched:
        raise ValueError(
            "the pretrained model does not fit the translation model:\n  " + "\n  ".join(mismatched)
        )
    return traverse_util.unflatten_dict(flat, sep="/"), fresh


def seq2seq_flops_per_token(enc: ModelConfig, dec: ModelConfig, length: int) -> float:
    """Training FLOPs of one source token plus one target token in ``length``-token rows: the
    encoder's (no output layer), the decoder's (output layer at every target) and the decoder's
    cross-attention (q/out projections per target token, k/v per source token, scores and
    weights over ``length`` sources); counted as ``xlm_flops_per_token`` counts."""
    d, n = dec.emb_dim, dec.n_layers
    cross = 6.0 * n * 4 * d * d + 12.0 * n * length * d
    return xlm_flops_per_token(enc, length, 0.0) + xlm_flops_per_token(dec, length, 1.0) + cross
