"""The XLM Transformer encoder (XLM's `TransformerModel` with `is_encoder=True`) and its head.

Port of facebookresearch/XLM `src/model/transformer.py` (`fwd` + `PredLayer` with
`share_inout_emb`) in `(batch, length)` layout: post-LN blocks, learned or sinusoidal positions,
optional language embeddings, exact GELU (or ReLU: `gelu_activation=False`), an output layer tied
to the token embedding (or a weight of its own: `share_inout_emb=False`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlm_jax.model import layers
from xlm_jax.model.layers import ACT_EMBED, ACT_VOCAB, EMBED, LANGS, POSITIONS, VOCAB
from xlm_jax.text.tokenizer import PAD_ID

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the XLM encoder (names follow XLM's command-line flags).

    `ffn_dim=None` resolves to `4 * emb_dim` (XLM's fixed ratio). `dtype` is the compute dtype of
    the matmuls; `param_dtype` the storage dtype of the parameters. `gelu_activation=False` is
    a ReLU FFN; `share_inout_emb=False` an output layer with its own `(vocab, emb_dim)` weight
    `pred_weight` instead of the token embedding (XLM's flags and defaults).
    """

    vocab_size: int
    n_langs: int
    emb_dim: int = 512
    n_layers: int = 6
    n_heads: int = 8
    ffn_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_positions: int = 512
    sinusoidal_embeddings: bool = False
    use_lang_emb: bool = True
    gelu_activation: bool = True
    share_inout_emb: bool = True
    pad_id: int = 2
    layer_norm_eps: float = 1e-12
    # How dropout draws its masks (layers.Dropout): "hash", or "threefry16", the masks of
    # checkpoints written before "hash" existed (metadata without this field: `from_saved`).
    dropout_rng: str = "hash"
    dtype: str = "float32"
    param_dtype: str = "float32"
    # How the model runs, not what it computes (left out of checkpoint compatibility checks):
    attention_impl: str = "explicit"  # or "xla" / "cudnn": jax.nn.dot_product_attention
    remat: str = "none"  # recompute blocks in the backward pass: "full", or "dots" (keep matmuls)

    def __post_init__(self) -> None:
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 4 * self.emb_dim)
        for name in (
            "vocab_size",
            "n_langs",
            "emb_dim",
            "n_layers",
            "n_heads",
            "ffn_dim",
            "max_positions",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("gelu_activation", "share_inout_emb"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"ModelConfig.emb_dim={self.emb_dim} must be a multiple of n_heads={self.n_heads}"
            )
        for name in ("dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {rate!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"ModelConfig.pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r}: expected one of "
                f"{layers.ATTENTION_IMPLS}"
            )
        if self.attention_impl != "explicit" and self.attention_dropout:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r} has no attention dropout; "
                f"set attention_dropout=0 (got {self.attention_dropout})"
            )
        if self.dropout_rng not in layers.DROPOUT_RNGS:
            raise ValueError(
                f"ModelConfig.dropout_rng={self.dropout_rng!r}: expected one of "
                f"{layers.DROPOUT_RNGS}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"ModelConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        for name in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {e}") from None
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"ModelConfig.{name} must be a float dtype, got {dt}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def has_lang_embeddings(self) -> bool:
        # As XLM: a single-language model has no language embedding (and its checkpoints have
        # no `lang_embeddings` tensor), even with use_lang_emb=True.
        return self.use_lang_emb and self.n_langs > 1

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> ModelConfig:
        """Builds a config from a dict or an ml_collections ConfigDict; unknown keys are errors."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: Mapping[str, Any]) -> ModelConfig:
        """A config from a checkpoint's metadata: a field it lacks takes the value of the code
        that wrote it (``FIELDS_BEFORE``), not today's default, so the model runs as it ran."""
        return cls.from_dict({**FIELDS_BEFORE, **dict(d)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ModelConfig fields added after checkpoints existed, with the value the code used before.
FIELDS_BEFORE: dict[str, Any] = {"dropout_rng": "threefry16"}


# ModelConfig fields that change how the model runs, not its function or parameters: a checkpoint
# written with other values resumes.
RUNTIME_FIELDS = ("attention_impl", "remat")

# Activation checkpointing: what the backward pass may keep instead of recomputing.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class EncoderLayer(nn.Module):
    """One post-LN block: x = LN1(x + drop(attn(x))); x = LN2(x + ffn(x)); zero padded rows."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, valid: Array, deterministic: bool = True) -> Array:
        # `deterministic` is positional so `nn.remat` can treat it as static (argnum 4).
        cfg = self.config
        dtype, param_dtype = cfg.compute_dtype, cfg.params_dtype
        attn = layers.MultiHeadAttention(
            cfg.n_heads,
            cfg.emb_dim,
            cfg.attention_dropout,
            dtype,
            param_dtype,
            cfg.attention_impl,
            cfg.dropout_rng,
            name="attention",
        )(x, x, mask, deterministic=deterministic)
        attn = layers.Dropout(cfg.dropout, cfg.dropout_rng)(attn, deterministic=deterministic)
        x = layers.layer_norm(
            cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name="layer_norm1"
        )(x + attn)
        ffn = layers.FeedForward(
            cfg.ffn_dim,
            cfg.dropout,
            dtype,
            param_dtype,
            cfg.gelu_activation,
            cfg.dropout_rng,
            name="ffn",
        )
        x = layers.layer_norm(
            cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name="layer_norm2"
        )(x + ffn(x, deterministic=deterministic))
        x = x * valid[..., None].astype(x.dtype)
        return nn.with_logical_constraint(x, ACT_EMBED)


class XLMEncoder(nn.Module):
    """XLM Transformer encoder with a prediction layer (tied to the token embedding, or not).

    Methods (all take `(batch, length)` int32 arrays):
      encode(tokens, positions, langs, *, causal, deterministic, segments)
        -> (batch, length, emb_dim)
      logits(hidden) -> (..., vocab_size) float32
      __call__(tokens, positions, langs, *, causal, deterministic, pred_index, segments) -> logits
    Dropout draws from the rng stream 'dropout'.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        pdt = cfg.params_dtype
        # XLM zero-initialises the pad row (padding_idx); pad outputs are masked anyway.
        self.embeddings = layers.embedding(
            cfg.vocab_size, cfg.emb_dim, (VOCAB, EMBED), padding_idx=cfg.pad_id, param_dtype=pdt
        )
        if not cfg.sinusoidal_embeddings:
            self.position_embeddings = layers.embedding(
                cfg.max_positions, cfg.emb_dim, (POSITIONS, EMBED), param_dtype=pdt
            )
        if cfg.has_lang_embeddings:
            self.lang_embeddings = layers.embedding(
                cfg.n_langs, cfg.emb_dim, (LANGS, EMBED), param_dtype=pdt
            )
        self.layer_norm_emb = layers.layer_norm(
            cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=pdt
        )
        self.emb_dropout = layers.Dropout(cfg.dropout, cfg.dropout_rng)
        self.layers = self.make_layers()
        self.pred_bias = self.param(
            "pred_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (VOCAB,)),
            (cfg.vocab_size,),
            pdt,
        )
        if not cfg.share_inout_emb:
            # XLM's own `pred_layer.proj.weight`: laid out and sharded as the embedding table,
            # initialised as its torch Linear(emb_dim, vocab) (U(+-1/sqrt(emb_dim))).
            init = layers.torch_linear_kernel_init(in_axis=-1, out_axis=-2)
            self.pred_weight = self.param(
                "pred_weight",
                nn.with_logical_partitioning(init, (VOCAB, EMBED)),
                (cfg.vocab_size, cfg.emb_dim),
                pdt,
            )

    def make_layers(self) -> list[nn.Module]:
        # The decoder subclass overrides this (and only this) part of the setup.
        layer = EncoderLayer
        if self.config.remat != "none":
            # Same parameter names, so checkpoints do not depend on the setting.
            layer = nn.remat(
                EncoderLayer, policy=REMAT_POLICIES[self.config.remat], static_argnums=(4,)
            )
        return [layer(self.config, name=f"layer_{i}") for i in range(self.config.n_layers)]

    def encode(
        self,
        tokens: Array,
        positions: Array,
        langs: Array,
        *,
        causal: bool = False,
        deterministic: bool = True,
        segments: Array | None = None,
        n_layers: int | None = None,
    ) -> Array:
        """XLM's `fwd`: hidden states `(batch, length, emb_dim)`, exactly zero at pad tokens.

        `causal=True` restricts attention to positions <= t (CLM). `langs` is ignored when the
        model has no language embedding. `positions` must be < max_positions: out-of-range
        lookups are NaN (jnp.take's fill mode), never a silently clipped row. `segments`
        (`(batch, length)` ints, 0 at padding) packs several sequences per row (packed TLM): a
        token attends only within its segment; None = one sequence per row. `n_layers`: the
        states after that many layers (0 = the embeddings' output; None = all), for probes of
        the intermediate layers.
        """
        if tokens.ndim != 2 or positions.shape != tokens.shape or langs.shape != tokens.shape:
            raise ValueError(
                "tokens, positions and langs must all be (batch, length); got "
                f"{tokens.shape}, {positions.shape}, {langs.shape}"
            )
        if segments is not None and segments.shape != tokens.shape:
            raise ValueError(f"segments must be {tokens.shape} as tokens, got {segments.shape}")
        x, valid = self.embed(tokens, positions, langs, deterministic=deterministic)
        mask = layers.make_attention_mask(valid, causal=causal, segments=segments)
        for layer in self.layers[:n_layers]:
            x = layer(x, mask, valid, deterministic)
        return x

    def embed(
        self, tokens: Array, positions: Array, langs: Array, *, deterministic: bool
    ) -> tuple[Array, Array]:
        """LayerNorm(token + position [+ language] embeddings), zero at pads; and the valid mask."""
        cfg = self.config
        valid = layers.padding_mask(tokens, cfg.pad_id)
        x = self.embeddings(tokens)
        if cfg.sinusoidal_embeddings:
            table = jnp.asarray(layers.sinusoidal_table(cfg.max_positions, cfg.emb_dim))
            x = x + jnp.take(table, positions, axis=0)
        else:
            x = x + self.position_embeddings(positions)
        if cfg.has_lang_embeddings:
            x = x + self.lang_embeddings(langs)
        x = self.layer_norm_emb(x)
        x = self.emb_dropout(x, deterministic=deterministic)
        x = x * valid[..., None].astype(x.dtype)
        return nn.with_logical_constraint(x, ACT_EMBED), valid

    def logits(self, hidden: Array) -> Array:
        """Output layer: `hidden @ W.T + pred_bias`, in float32 (loss precision); W is the token
        embedding table (tied, XLM's default) or `pred_weight` (`share_inout_emb=False`)."""
        hidden = hidden.astype(jnp.float32)
        if self.config.share_inout_emb:
            out = self.embeddings.attend(hidden)
        else:
            out = jnp.dot(hidden, self.pred_weight.astype(jnp.float32).T)  # as `attend` does
        out = out + self.pred_bias.astype(jnp.float32)
        if out.ndim == len(ACT_VOCAB):
            out = nn.with_logical_constraint(out, ACT_VOCAB)
        return out

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        langs: Array,
        *,
        causal: bool = False,
        deterministic: bool = True,
        pred_index: Array | None = None,
        segments: Array | None = None,
    ) -> Array:
        """Logits `(batch, length, vocab)`, or `(batch, n_slots, vocab)` at `pred_index`.

        `pred_index` (int32 `(batch, n_slots)`) selects, per row, the positions to predict, so
        the (large) output layer runs only there, as XLM's `predict` does for MLM. `segments`:
        see `encode`.
        """
        hidden = self.encode(
            tokens,
            positions,
            langs,
            causal=causal,
            deterministic=deterministic,
            segments=segments,
        )
        if pred_index is not None:
            if pred_index.ndim != 2 or pred_index.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"pred_index must be (batch, n_slots) with batch={tokens.shape[0]}, "
                    f"got {pred_index.shape}"
                )
            hidden = jnp.take_along_axis(hidden, pred_index[:, :, None], axis=1)
        return self.logits(hidden)


# How a row's last-layer states become its sentence vector: the first position (XLM's, the
# leading </s>) or the mean over the row's non-pad tokens.
POOLINGS = ("first", "mean")


def pooled(hidden: jax.Array, tokens: jax.Array, pooling: str) -> jax.Array:
    """``(batch, length, dim)`` states of ``(batch, length)`` tokens → ``(batch, dim)``."""
    if pooling == "first":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling={pooling!r}: one of {POOLINGS}")
    valid = (tokens != PAD_ID).astype(jnp.float32)[..., None]  # sums in float32 under bfloat16
    mean = (hidden.astype(jnp.float32) * valid).sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1.0)
    return mean.astype(hidden.dtype)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays, boxed params or `jax.eval_shape` output)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def xlm_flops_per_token(config: ModelConfig, length: int, n_pred_fraction: float) -> float:
    """Training (forward + backward) FLOPs per input token.

    With d = emb_dim, f = ffn_dim, L = n_layers, T = length, V = vocab_size, p = n_pred_fraction
    (fraction of tokens at which the output layer runs: ~0.15 for MLM/TLM, 1 for CLM):

        6 * L * (4 d^2 + 2 d f)    weight matmuls (q, k, v, out, lin1, lin2); 2 FLOPs per MAC,
                                   x3 for forward + backward (grads w.r.t. inputs and weights)
      + 12 * L * T * d             attention scores q.k and weights.v: 2 * 2 T d forward, x3
      + 6 * p * d * V              output projection, only at predicted slots (tied or not:
                                   the same matmul; untied adds V * d parameters, not FLOPs)

    Embedding lookups, LayerNorms, softmax, biases and GELU/ReLU are ignored (O(d) per token). The
    causal mask is applied to a full T x T product, so CLM is counted like MLM.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= n_pred_fraction <= 1.0:
        raise ValueError(f"n_pred_fraction must be in [0, 1], got {n_pred_fraction}")
    d, f, n = config.emb_dim, config.ffn_dim, config.n_layers
    assert f is not None  # resolved in __post_init__
    matmul = 6.0 * n * (4 * d * d + 2 * d * f)
    attention = 12.0 * n * length * d
    output = 6.0 * n_pred_fraction * d * config.vocab_size
    return matmul + attention + output
