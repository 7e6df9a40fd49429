"""Supervised en→de translation on Multi30k (whole `train` as parallel data), random init.

A small Transformer encoder-decoder (XLM's blocks, tied embeddings) with a joint en/de BPE
vocabulary trained on the training text; validation BLEU (sacreBLEU and 13a-tokenized
multi-bleu) on `val`, test BLEU on `test_2016_flickr` at every evaluation; the best checkpoint by
validation BLEU. Results and their command: docs/results.md.

  python -m xlm_jax.main --mode=nmt --config=configs/multi30k_mt_ende.py --workdir=/tmp/mt_ende
  # translate with the trained model (best checkpoint), beam 4:
  python -m xlm_jax.translate --workdir=/tmp/mt_ende --src=en --tgt=de --beam_size=4 \
      < ../shared/data/multi30k/test_2016_flickr.en > /tmp/test.de
"""

from xlm_jax.tasks import nmt


def get_config():
    c = nmt.default_config()
    c.langs = "en,de"
    c.data.root = "../shared/data/multi30k"  # relative to where you run; override for a copy
    c.data.train = "en-de: train.en|train.de"
    c.data.valid = "en-de: val.en|val.de"
    c.data.test = "en-de: test_2016_flickr.en|test_2016_flickr.de"
    c.eval_directions = "en-de"  # the only direction trained
    c.init_checkpoint = ""  # random init; or a pretraining workdir whose langs include en, de
    c.tokenizer.vocab_size = 8_000
    c.tokenizer.n_sentences = 60_000

    c.model.emb_dim = 256
    c.model.n_layers = 3
    c.model.n_heads = 4
    c.model.dropout = 0.2
    c.model.attention_dropout = 0.1
    c.model.max_positions = 256

    c.ae_steps = ""
    c.bt_steps = ""
    c.mt_steps = "en-de"
    c.label_smoothing = 0.1
    c.batch_size = 64
    c.length_buckets = "24,40,64,96"  # Multi30k sentences: ~17 BPE tokens on average
    c.eval_batch_size = 128
    c.beam_size = 1  # greedy during training (fast); beam 4 with xlm_jax.translate

    c.optimizer.lr = 7e-4
    c.optimizer.warmup_steps = 800
    c.max_steps = 12_000
    c.log_every = 100
    c.eval_every = 1_000
    c.checkpoint_every = 1_000
    c.best_metric = "valid/en-de/bleu"
    return c
