"""A small 15-language XLM for CPU: the XNLI-15 data and objectives at 4 x 256.

Pretrains on Tatoeba (the first 80% of each pair) + Multi30k (en/de/fr), validating on the
held-out Tatoeba lines and Multi30k val. The argument picks the objectives, so that MLM and
MLM + TLM are compared at equal steps (the paper's claim: TLM helps cross-lingual transfer):

  python -m xlm_jax.main --config=configs/xnli15_small.py:mlm_tlm --workdir=/tmp/xlm15_mlm_tlm
  python -m xlm_jax.main --config=configs/xnli15_small.py:mlm --workdir=/tmp/xlm15_mlm

",parallel" adds ../shared/data/parallel (news, UN, NTREX: about 150k more en-xx pairs) for TLM
and, one side at a time, for MLM, with packed TLM rows, 32-token MLM windows and lr 1e-3 (same
validation):

  python -m xlm_jax.main --config=configs/xnli15_small.py:mlm_tlm,parallel \
      --workdir=/tmp/x15p_mlm_tlm
  python -m xlm_jax.main --config=configs/xnli15_small.py:mlm,parallel --workdir=/tmp/x15p_mlm
  # then XNLI fine-tuned on SNLI + the XNLI English rows: configs/xnli_snli.py
"""

from xlm_jax.data import presets
from xlm_jax.tasks.pretrain_config import default_config


def get_config(arg: str = "mlm_tlm"):
    objectives, _, corpus = arg.partition(",")
    if objectives not in ("mlm_tlm", "mlm") or corpus not in ("", "parallel"):
        raise ValueError(f"{arg!r}: expected 'mlm_tlm' or 'mlm', optionally with ',parallel'")
    c = default_config()
    c.langs = ",".join(presets.XNLI15)
    c.data.root = "../shared/data"
    c.data.train, c.data.valid = presets.xnli15_sources(parallel=corpus == "parallel")
    c.tokenizer.vocab_size = 16_000
    c.tokenizer.n_sentences = 200_000

    c.model.emb_dim = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1

    # Each iteration: 5 MLM steps on sampled languages, then (mlm_tlm) 5 TLM steps on sampled
    # en-xx pairs (lg_sampling_factor 0.7). max_steps counts both, so `mlm` makes twice as many
    # MLM updates at the same compute.
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
    if corpus == "parallel":
        c.tokenizer.n_sentences = 300_000
        c.tlm_batch_size = 32  # x 128 = 4,096 tokens, an MLM step's; pairs packed (news is long)
        c.tlm_length = 128
        c.tlm_pack = True
        # MLM windows of 32 tokens, not 128: 128-token windows (several unrelated sentences a row)
        # kept this model at the MLM's unigram plateau through 2,000 steps; the short windows and
        # lr 1e-3 leave it by step 1,000 (MLM) / 1,500 (MLM + TLM, half the MLM updates), later
        # than on Multi30k's 2 languages (docs/results.md, issue 19). Same 4,096 tokens a step.
        c.bptt = 32
        c.batch_size = 128
        c.optimizer.lr = 1e-3
        c.optimizer.warmup_steps = 300
        c.max_steps = 1_500  # 47 min (MLM), 57 min (MLM + TLM) side by side on 2 CPU cores
        c.eval_every = 250
        c.checkpoint_every = 250
    return c
