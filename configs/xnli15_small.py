"""A small 15-language XLM for CPU: the XNLI-15 data and objectives at 4 x 256.

Pretrains on Tatoeba (the first 80% of each pair) + Multi30k (en/de/fr), validating on the
held-out Tatoeba lines and Multi30k val. The argument picks the objectives, so that MLM and
MLM + TLM are compared at equal steps (the paper's claim: TLM helps cross-lingual transfer):

  python -m xlm_jax.main --config=configs/xnli15_small.py:mlm_tlm --workdir=/tmp/xlm15_mlm_tlm
  python -m xlm_jax.main --config=configs/xnli15_small.py:mlm --workdir=/tmp/xlm15_mlm
"""

from xlm_jax.data import presets
from xlm_jax.tasks.pretrain_config import default_config


def get_config(objectives: str = "mlm_tlm"):
    if objectives not in ("mlm_tlm", "mlm"):
        raise ValueError(f"objectives {objectives!r}: expected 'mlm_tlm' or 'mlm'")
    c = default_config()
    c.langs = ",".join(presets.XNLI15)
    c.data.root = "../shared/data"
    c.data.train, c.data.valid = presets.xnli15_sources()
    c.tokenizer.vocab_size = 16_000
    c.tokenizer.n_sentences = 200_000

    c.model.emb_dim = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1

    c.mlm_steps = presets.xnli15_steps(tlm=objectives == "mlm_tlm")
    c.batch_size = 32
    c.bptt = 128
    c.tlm_batch_size = 64
    c.tlm_length = 64
    c.eval_batch_size = 32

    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 300
    c.max_steps = 1_200
    c.log_every = 50
    c.eval_every = 400
    c.checkpoint_every = 400
    return c
