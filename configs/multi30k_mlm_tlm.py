"""MLM + TLM on Multi30k (en, de, fr): a small XLM that trains on one CPU in about half an hour.

MLM on each language's stream, TLM on the three line-aligned pairs; validation perplexity per
language and pair on Multi30k val. Results and their command: docs/results.md.

  python -m xlm_jax.main --config=configs/multi30k_mlm_tlm.py --workdir=/tmp/xlm_m30k
  # MLM only, at the same number of steps:
  python -m xlm_jax.main --config=configs/multi30k_mlm_tlm.py --workdir=/tmp/xlm_m30k_mlm \
      --config.mlm_steps=en,de,fr
"""

from xlm_jax.config import default_config


def get_config():
    c = default_config()
    c.langs = "en,de,fr"
    c.data.root = "../shared/data/multi30k"  # relative to where you run; override for a copy
    c.data.train = (
        "en: train.en; de: train.de; fr: train.fr; "
        "en-de: train.en|train.de; en-fr: train.en|train.fr; de-fr: train.de|train.fr"
    )
    c.data.valid = (
        "en: val.en; de: val.de; fr: val.fr; "
        "en-de: val.en|val.de; en-fr: val.en|val.fr; de-fr: val.de|val.fr"
    )
    c.tokenizer.vocab_size = 10_000
    c.tokenizer.n_sentences = 90_000

    c.model.emb_dim = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1

    c.mlm_steps = "en,de,fr,en-de,en-fr,de-fr"
    c.batch_size = 32
    c.bptt = 128
    c.tlm_batch_size = 64  # Multi30k pairs are ~30 tokens: about as many tokens as an MLM batch
    c.tlm_length = 96
    c.eval_batch_size = 32

    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 500
    c.max_steps = 6_000
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 500
    return c
