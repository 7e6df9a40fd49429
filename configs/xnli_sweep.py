"""XNLI zero-shot over XLM's grid: learning rate x batch size, one fine-tuning per cell.

Same data and protocol as configs/xnli.py. Each run goes to WORKDIR/lr{lr}_bs{bs}/ (runs already
complete are skipped, an interrupted one resumes); WORKDIR/sweep.{csv,md} tabulates every run at
its epoch selected by the English validation accuracy.

  python -m xlm_jax.main --mode=xnli_sweep --config=configs/xnli_sweep.py \
      --config.init_checkpoint=/tmp/xlm15_mlm_tlm --workdir=/tmp/xnli_sweep
  python -m xlm_jax.main --mode=xnli_sweep --config=configs/xnli_sweep.py:en,de,fr \
      --config.init_checkpoint=/tmp/xlm_m30k --workdir=/tmp/xnli_sweep_m30k
"""

from xlm_jax.data import nli
from xlm_jax.tasks import xnli


def get_config(langs: str = "all"):
    c = xnli.default_config()
    eval_langs = nli.PAPER_LANGS if langs == "all" else tuple(langs.split(","))
    c.init_checkpoint = ""  # the pretraining workdir: --config.init_checkpoint=WORKDIR
    c.data.root = "../shared/data"
    c.data.train, c.data.valid = nli.xnli_dev_sources(eval_langs)
    c.select_lang = "en"

    # The README's grid: lr in {5e-6, 2.5e-5, 1.25e-4} (encoder and head alike), batch in {4, 8}.
    c.sweep.lrs = "5e-6,2.5e-5,1.25e-4"
    c.sweep.batch_sizes = "4,8"
    c.max_len = 256
    c.epoch_size = -1  # one pass over the 1,990 English pairs per epoch
    c.n_epochs = 10
    c.eval_batch_size = 50
    c.eval_at_start = True
    c.log_every = 50
    return c
