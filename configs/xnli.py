"""XNLI zero-shot (the paper's Table 1): fine-tune a pretrained XLM on English, test 15 languages.

Data: the XNLI dev set in ../shared/data/xnli, split as its README says: English rows 0..1,989
fine-tune, rows 1,990..2,489 of every language validate. Accuracy per language and the average;
the model is selected by the English validation accuracy (no target-language labels). The
argument lists the languages to evaluate (a model pretrained on fewer languages knows only those).

  python -m xlm_jax.main --mode=xnli --config=configs/xnli.py \
      --config.init_checkpoint=/tmp/xlm15_mlm_tlm --workdir=/tmp/xnli_mlm_tlm
  python -m xlm_jax.main --mode=xnli --config=configs/xnli.py:en,de,fr \
      --config.init_checkpoint=/tmp/xlm_m30k --workdir=/tmp/xnli_m30k
  # baseline: a random encoder (sizes from config.model, tokenizer trained on the English pairs)
  python -m xlm_jax.main --mode=xnli --config=configs/xnli.py --workdir=/tmp/xnli_random
"""

from xlm_jax.data import nli
from xlm_jax.tasks import xnli


def get_config(langs: str = "all"):
    c = xnli.default_config()
    eval_langs = nli.PAPER_LANGS if langs == "all" else tuple(langs.split(","))
    c.init_checkpoint = ""  # the pretraining workdir: --config.init_checkpoint=WORKDIR
    c.data.root = "../shared/data"  # relative to where you run; override for a copy
    c.data.train, c.data.valid = nli.xnli_dev_sources(eval_langs)
    c.select_lang = "en"

    # XLM's recipe (README: adam lr 2.5e-5 for both, batch 8, max_len 256), with epochs sized for
    # 1,990 training pairs instead of MultiNLI's 393k: one epoch = one pass (249 updates).
    c.optimizer_e.lr = 2.5e-5
    c.optimizer_p.lr = 2.5e-5
    c.batch_size = 8
    c.max_len = 256
    c.epoch_size = -1
    c.n_epochs = 10
    c.eval_batch_size = 50  # 500 validation pairs per language: 10 batches, no padding rows
    c.eval_at_start = True  # epoch 0 = the untrained head, for reference
    c.log_every = 50
    return c
