"""Unsupervised en↔fr at the paper's size (XLM §4.2: 6 layers × 1024, 8 heads, WMT'14 news).

Monolingual text through TFDS (any dataset with 'en'/'fr' features; prepared beforehand, never
downloaded at run time) or local files; newstest2014 for BLEU. Initialise from an MLM pretrained
on the same languages (e.g. configs/xnli15_mlm_tlm.py sizes, or an imported mlm_enfr_1024).

  python -m xlm_jax.main --mode=nmt --config=configs/wmt14_unmt_enfr.py \
      --config.init_checkpoint=/path/to/mlm_enfr --config.data.root=/path/to/wmt \
      --workdir=/path/to/unmt_enfr
"""

from ml_collections import config_dict

from xlm_jax.tasks import nmt


def get_config():
    c = nmt.default_config()
    c.langs = "en,fr"
    c.init_checkpoint = config_dict.placeholder(str)  # required: the pretraining workdir
    c.data.root = ""  # where the files below live
    c.data.train = "en: news.en; fr: news.fr"  # one sentence per line, tokenized by the model
    c.data.valid = "en-fr: newstest2013.en|newstest2013.fr"
    c.data.test = "en-fr: newstest2014.en|newstest2014.fr"
    c.dropout = 0.1
    c.attention_dropout = 0.1
    c.ae_steps = "en,fr"
    c.bt_steps = "en-fr-en,fr-en-fr"
    c.lambda_ae = "0:1,100000:0.1,300000:0"
    c.word_shuffle = 3.0
    c.word_dropout = 0.1
    c.word_blank = 0.1
    c.batch_size = 256  # XLM: tokens_per_batch 2000 per GPU × 8 GPUs ≈ 256 sentences
    c.length_buckets = "32,64,128,256"
    c.eval_batch_size = 256
    c.beam_size = 1  # XLM evaluates greedily during training
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 4_000
    c.max_steps = 1_000_000
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    c.mesh.shape = (-1, 1, 1)
    return c
