"""XNLI zero-shot with enough English training pairs: SNLI + the XNLI English rows, 15 languages.

Fine-tunes on SNLI's dev + test (19,666 English pairs; Flickr30k captions, another domain than
XNLI's) plus the XNLI English dev rows 0..1,989 (21,656 pairs); validates on rows 1,990..2,489 of
every language as configs/xnli.py (../shared/data/README.md's protocol). The model is selected by
English validation accuracy. With --mode=xnli_sweep, `sweep.lrs` x `sweep.batch_sizes` is the grid:

  python -m xlm_jax.main --mode=xnli --config=configs/xnli_snli.py \
      --config.init_checkpoint=/tmp/x15p_mlm_tlm --workdir=/tmp/snli_mlm_tlm
  python -m xlm_jax.main --mode=xnli_sweep --config=configs/xnli_snli.py \
      --config.init_checkpoint=/tmp/x15p_mlm_tlm --workdir=/tmp/snli_sweep
"""

from xlm_jax.data import nli
from xlm_jax.tasks import xnli


def get_config(langs: str = "all"):
    c = xnli.default_config()
    eval_langs = nli.PAPER_LANGS if langs == "all" else tuple(langs.split(","))
    c.init_checkpoint = ""  # the pretraining workdir: --config.init_checkpoint=WORKDIR
    c.data.root = "../shared/data"  # relative to where you run; override for a copy
    xnli_train, c.data.valid = nli.xnli_dev_sources(eval_langs)
    c.data.train = xnli_train + ", nli/snli_dev.tsv, nli/snli_test.tsv"  # all English
    c.data.detokenize = "nli/snli_dev.tsv, nli/snli_test.tsv"  # Moses-tokenized, XNLI is not
    c.select_lang = "en"

    # XLM's recipe (Adam, constant lr, encoder dropout on) with batches of 32: 677 updates per pass
    # over the 21,656 pairs. Small encoders want a larger learning rate than XLM's 2.5e-5.
    c.optimizer_e.lr = 5e-5
    c.optimizer_p.lr = 5e-5
    c.batch_size = 32
    c.max_len = 128  # SNLI's and XNLI's sentences are short; longer ones are cut
    c.length_buckets = "32,48,64,96"  # SNLI rows are ~30 tokens: a batch pads to its bucket
    c.epoch_size = -1  # one pass over the training pairs per epoch
    c.n_epochs = 8
    c.patience = 3  # epochs without a better English validation accuracy
    c.eval_batch_size = 50  # 500 validation pairs per language: 10 batches, no padding rows
    c.eval_at_start = False
    c.log_every = 100
    c.sweep.lrs = "2.5e-5,5e-5,1e-4"
    c.sweep.batch_sizes = "32"
    return c
