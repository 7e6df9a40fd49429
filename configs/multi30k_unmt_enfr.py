"""Unsupervised en↔fr translation on Multi30k (Lample et al. 2018 protocol; XLM §4.2 recipe).

No sentence pair is ever seen: English takes `train` lines 0..14,499, French lines
14,500..28,999 (../shared/data/README.md). Two stages, both on those monolingual halves:

  # 1. pretrain a cross-lingual MLM on both halves (configs/multi30k_mlm_tlm.py:unmt_enfr)
  python -m xlm_jax.main --config=configs/multi30k_mlm_tlm.py:unmt_enfr --workdir=/tmp/mlm_enfr
  # 2. denoising auto-encoding + online back-translation from that MLM
  python -m xlm_jax.main --mode=nmt --config=configs/multi30k_unmt_enfr.py \
      --config.init_checkpoint=/tmp/mlm_enfr --workdir=/tmp/unmt_enfr
  # the baseline: the same budget from a random init (same sizes, tokenizer trained here)
  python -m xlm_jax.main --mode=nmt --config=configs/multi30k_unmt_enfr.py:random \
      --workdir=/tmp/unmt_enfr_random

Validation BLEU (model selection, as XLM) on `val` in both directions; test BLEU on
`test_2016_flickr`. Results and their commands: docs/results.md.
"""

from ml_collections import config_dict

from xlm_jax.tasks import nmt


def get_config(init: str = "mlm"):
    if init not in ("mlm", "random"):
        raise ValueError(f"init {init!r}: expected 'mlm' or 'random'")
    c = nmt.default_config()
    c.langs = "en,fr"
    c.data.root = "../shared/data/multi30k"
    c.data.train = "en: train.en@0:14500; fr: train.fr@14500:29000"
    c.data.valid = "en-fr: val.en|val.fr"
    c.data.test = "en-fr: test_2016_flickr.en|test_2016_flickr.fr"
    # stage 1's workdir, required for init=mlm: --config.init_checkpoint=/tmp/mlm_enfr
    c.init_checkpoint = config_dict.placeholder(str) if init == "mlm" else ""
    # init=random: the same model as stage 1 (configs/multi30k_mlm_tlm.py), vocabulary trained
    # on the two halves.
    c.tokenizer.vocab_size = 10_000
    c.tokenizer.n_sentences = 90_000
    c.model.emb_dim = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.max_positions = 512
    c.dropout = 0.1
    c.attention_dropout = 0.1

    c.ae_steps = "en,fr"
    c.bt_steps = "en-fr-en,fr-en-fr"
    c.mt_steps = ""
    # XLM's schedule shrunk to this run's length, in iterations of 4 steps (AE en, AE fr and the
    # two BT directions): λ_ae falls to 0.1 at step 3,000 and to 0 at step 6,000 of 8,000
    c.lambda_ae = "0:1,750:0.1,1500:0"
    c.word_shuffle = 3.0
    c.word_dropout = 0.1
    c.word_blank = 0.1
    c.batch_size = 32
    c.length_buckets = "24,40,64,96"
    c.eval_batch_size = 128

    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1_000
    c.max_steps = 8_000
    c.log_every = 100
    c.eval_every = 1_000
    c.checkpoint_every = 1_000
    c.best_metric = "valid/bleu"
    return c
