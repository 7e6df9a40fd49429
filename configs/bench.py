"""Benchmark settings: XLM's model sizes at a fixed batch, for `python -m xlm_jax.bench`.

`:6x512` (default) is the setup the performance numbers in docs/benchmarks.md are measured on:
XLM's 6 layers x 512 (8 heads, 32k vocabulary), 16 rows x 128 tokens, float32.
`:12x1024` is the paper's XNLI-15 model (12 layers x 1024, 8 heads, 95k vocabulary) at 32 rows
x 256 tokens per device, in bfloat16 compute (float32 parameters and optimizer): for a GPU or a
TPU slice, where bfloat16 matmuls are the fast path.

  python -m xlm_jax.bench --config=configs/bench.py --torch --decode --pipeline \\
      --out=docs/bench/cpu_6x512.json --markdown=docs/benchmarks.md
  python -m xlm_jax.bench --config=configs/bench.py:12x1024 --kinds=mlm   # on an accelerator

The batch scales with the devices of the default data-parallel mesh (`--config.batch_size`
overrides it). No data or tokenizer is read: batches are random token ids of these shapes.
"""

import jax

from xlm_jax.tasks.pretrain_config import default_config


def get_config(arg: str = "6x512"):
    c = default_config()
    if arg == "6x512":
        c.model.emb_dim, c.model.n_layers, c.model.n_heads = 512, 6, 8
        c.tokenizer.vocab_size = 32_000
        rows, length = 16, 128
    elif arg == "12x1024":
        c.model.emb_dim, c.model.n_layers, c.model.n_heads = 1024, 12, 8
        c.tokenizer.vocab_size = 95_000
        c.model.dtype = "bfloat16"
        rows, length = 32 * jax.device_count(), 256
    else:
        raise ValueError(f"configs/bench.py:{arg}: expected 6x512 or 12x1024")
    c.batch_size, c.bptt = rows, length  # MLM and CLM windows
    c.tlm_batch_size, c.tlm_length = rows, length  # TLM pairs (two halves of `length`)
    return c
