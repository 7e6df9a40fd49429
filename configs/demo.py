"""Demo: a tiny XLM pretrained with MLM + TLM on en/fr/de in a few CPU minutes.

With no data it generates a small synthetic parallel corpus (xlm_jax/data/toy.py) in the workdir;
point it at real text with --config.data.root (files train.{en,fr,de} and val.{en,fr,de}):

  make demo                                    # = the command below
  python -m xlm_jax.main --config=configs/demo.py --workdir=/tmp/xlm_demo
  python -m xlm_jax.main --config=configs/demo.py --workdir=/tmp/xlm_demo_m30k \
      --config.data.root=../shared/data/multi30k
"""

from xlm_jax.tasks.pretrain_config import default_config


def get_config():
    c = default_config()
    c.langs = "en,fr,de"
    c.data.train = (
        "en: train.en; fr: train.fr; de: train.de; "
        "en-fr: train.en|train.fr; en-de: train.en|train.de"
    )
    c.data.valid = "en: val.en; fr: val.fr; de: val.de; en-fr: val.en|val.fr; en-de: val.en|val.de"
    c.tokenizer.vocab_size = 1000  # the toy corpus has a few hundred words; real text gets more
    c.tokenizer.n_sentences = 30_000
    c.tokenizer.character_coverage = 1.0  # keep every character of the small corpus

    c.model.emb_dim = 128
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.0

    c.mlm_steps = "en,fr,de,en-fr,en-de"
    c.batch_size = 16
    c.bptt = 64
    c.tlm_batch_size = 32
    c.tlm_length = 64
    c.eval_batch_size = 16

    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 100
    c.max_steps = 600
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    return c
