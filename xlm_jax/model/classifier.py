"""Sentence-pair classifier on top of the XLM encoder (XLM's XNLI fine-tuning model).

As XLM's ``SentenceEmbedder.get_embeddings`` + projection: the encoder runs without a causal mask,
the last layer's hidden state at position 0 (the first ``</s>`` of ``</s> s1 </s> s2 </s>``) is the
pair's representation, then dropout and one linear layer give the class logits. ``pooling="mean"``
averages the last layer over the row's tokens instead (a choice for small encoders, not XLM's).

Parameters are ``{'encoder': <the pretrained XLMEncoder tree>, 'head': {'kernel', 'bias'}}``, so a
pretraining checkpoint's parameters drop in under ``encoder``. The head's kernel carries the logical
axes ``('embed', 'classes')``; ``classes`` has no axis rule, so it is never split (flax maps names
without a rule to no mesh axis) and the kernel is sharded like any ``embed`` weight.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlm_jax.model import layers
from xlm_jax.model.encoder import POOLINGS, ModelConfig, XLMEncoder, pooled
from xlm_jax.model.layers import BATCH, EMBED

Array = jax.Array

CLASSES = "classes"  # logical axis of the class dimension (unsharded)


class XNLIClassifier(nn.Module):
    """XLM encoder + dropout + linear head on the pooled last layer (by default position 0).

    Methods (all inputs ``(batch, length)`` int32, as the encoder's):
      pool(tokens, positions, langs, *, deterministic) -> (batch, emb_dim) the pooled last layer
      classify(pooled, *, deterministic) -> (batch, n_classes) float32 logits
      __call__(tokens, positions, langs, *, deterministic) -> classify(pool(...))
    Dropout (the encoder's and the head's) draws from the rng stream 'dropout'.
    """

    config: ModelConfig
    n_classes: int = 3
    dropout: float = 0.1
    pooling: str = "first"  # one of encoder.POOLINGS

    def setup(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: one of {POOLINGS}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        cfg = self.config
        self.encoder = XLMEncoder(cfg)
        self.head_dropout = layers.Dropout(self.dropout, cfg.dropout_rng)
        self.head = layers.dense(
            self.n_classes,
            fan_in=cfg.emb_dim,
            kernel_axes=(EMBED, CLASSES),
            bias_axes=(CLASSES,),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )

    def pool(
        self, tokens: Array, positions: Array, langs: Array, *, deterministic: bool = True
    ) -> Array:
        hidden = self.encoder.encode(tokens, positions, langs, deterministic=deterministic)
        return nn.with_logical_constraint(pooled(hidden, tokens, self.pooling), (BATCH, EMBED))

    def classify(self, pooled: Array, *, deterministic: bool = True) -> Array:
        x = self.head_dropout(pooled, deterministic=deterministic)
        return self.head(x).astype(jnp.float32)

    def __call__(
        self, tokens: Array, positions: Array, langs: Array, *, deterministic: bool = True
    ) -> Array:
        pooled = self.pool(tokens, positions, langs, deterministic=deterministic)
        return self.classify(pooled, deterministic=deterministic)
