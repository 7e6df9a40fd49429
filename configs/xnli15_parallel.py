"""The 15-language small XLM on all the pretraining text of ../shared/data, for XNLI zero-shot.

Tatoeba (first 80% of each file) + Multi30k (en/de/fr) as `xnli15_small.py`, plus `parallel/`
(news, UN, NTREX: about 150k more en-xx pairs) for TLM and, one side at a time, for MLM; XNLI text
never. Validation: Tatoeba's held-out lines and Multi30k val. The argument picks the objectives;
both variants see the same tokens per step and run the same steps (equal compute):

  python -m xlm_jax.main --config=configs/xnli15_parallel.py:mlm_tlm --workdir=/tmp/x15p_mlm_tlm
  python -m xlm_jax.main --config=configs/xnli15_parallel.py:mlm --workdir=/tmp/x15p_mlm
  # then XNLI fine-tuned on SNLI + XNLI English rows (configs/xnli.py:snli)
"""

from xlm_jax.data import presets
from xlm_jax.tasks.pretrain_config import default_config


def get_config(objectives: str = "mlm_tlm"):
    if objectives not in ("mlm_tlm", "mlm"):
        raise ValueError(f"objectives {objectives!r}: expected 'mlm_tlm' or 'mlm'")
    c = default_config()
    c.langs = ",".join(presets.XNLI15)
    c.data.root = "../shared/data"
    c.data.train, c.data.valid = presets.xnli15_sources(parallel=True)
    c.tokenizer.vocab_size = 16_000
    c.tokenizer.n_sentences = 300_000

    c.model.emb_dim = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1

    # Each iteration: 5 MLM steps on sampled languages, then (`:mlm_tlm`) 5 TLM steps on sampled
    # en-xx pairs (lg_sampling_factor 0.7). max_steps counts both, so `:mlm` makes twice as many
    # MLM updates at the same compute.
    c.mlm_steps = presets.xnli15_steps(tlm=objectives == "mlm_tlm")
    c.batch_size = 32  # x 128 = 4,096 tokens per MLM step
    c.bptt = 128
    c.tlm_batch_size = 32  # x 128 = 4,096 tokens per TLM step, pairs packed (news pairs are long)
    c.tlm_length = 128
    c.tlm_pack = True
    c.eval_batch_size = 32

    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 500
    c.max_steps = 6_000
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    return c
