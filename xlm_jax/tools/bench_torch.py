"""The reference point of `xlm_jax.tools.bench`: transformers' XLM training step, timed in PyTorch.

`XLMWithLMHeadModel` with random weights from an `XLMConfig` of the same sizes (nothing is
downloaded), the same batch shapes, MLM targets at the same fraction of positions, and the same
update as ours: Adam (XLM's betas and eps) after clipping the gradient norm. HF computes the
output layer at every position (the original XLM code only at the predicted ones; so do we).
Host-side masking is left out of its timing, which if anything favours PyTorch.

Needs the optional `torch` and `transformers` (requirements-dev.txt pins a CPU build of torch).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from xlm_jax.text.tokenizer import N_SPECIAL, PAD_ID
from xlm_jax.tools.roofline import median_seconds


def available() -> str | None:
    """None if torch and transformers import, else why not."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def bench_hf_step(
    config,
    *,
    rows: int,
    length: int,
    n_steps: int,
    warmup: int = 2,
    compile: bool = False,
    causal: bool = False,
) -> dict[str, Any]:
    """Median seconds of one training step of transformers' XLM (forward, backward, clip, Adam).

    ``config`` is ours (``config.model``, ``config.tokenizer.vocab_size``, ``config.optimizer``,
    ``config.word_pred``); ``compile=True`` runs it through ``torch.compile`` (its compile time
    is reported separately, as the first call's).
    """
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    m, opt = config.model, config.optimizer
    hf_config = transformers.XLMConfig(
        vocab_size=config.tokenizer.vocab_size,
        emb_dim=m.emb_dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        gelu_activation=True,
        sinusoidal_embeddings=m.sinusoidal_embeddings,
        causal=causal,
        n_langs=2,
        use_lang_emb=m.use_lang_emb,
        max_position_embeddings=m.max_positions,
        pad_index=PAD_ID,
    )
    if m.ffn_dim not in (None, 4 * m.emb_dim):
        raise ValueError("transformers' XLM has a fixed 4 x emb_dim feed-forward layer")
    model = transformers.XLMWithLMHeadModel(hf_config).train()
    adam = torch.optim.Adam(
        model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
    )

    rng = np.random.default_rng(0)
    tokens = rng.integers(N_SPECIAL, config.tokenizer.vocab_size, (rows, length))
    if causal:
        labels = np.concatenate([tokens[:, 1:], np.full((rows, 1), -100)], axis=1)
    else:  # word_pred of the positions are targets, the rest ignored (-100), as MLM
        labels = np.where(rng.random((rows, length)) < config.word_pred, tokens, -100)
    batch = {
        "input_ids": torch.as_tensor(tokens),
        "langs": torch.zeros((rows, length), dtype=torch.long),
        "position_ids": torch.arange(length).expand(rows, length).contiguous(),
        "labels": torch.as_tensor(labels),
    }

    def step() -> None:
        adam.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        if opt.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad_norm)
        adam.step()

    compile_s = None
    if compile:
        step = torch.compile(step)
        t = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t
    seconds = median_seconds(step, n_steps, warmup)
    return {
        "framework": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "mode": "torch.compile" if compile else "eager",
        "threads": torch.get_num_threads(),
        "batch": [rows, length],
        "compile_s": compile_s,
        "step_s": seconds,
        "tokens_per_s": rows * length / seconds,
    }


def torch_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """float32 FLOP/s of a square matmul in PyTorch (to compare the frameworks' ceilings)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ a, repeats, 2)
