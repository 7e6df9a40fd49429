"""Tatoeba retrieval probe: does the encoder map translations close together (no fine-tuning)?

Each XX sentence retrieves among all English sentences of its Tatoeba file (and the reverse) by
the cosine similarity of mean-pooled last-layer states (``--config.layer=K``: the states after
layer K, 0 = the embeddings); accuracy per language and the average.
Only held-out lines: the pretraining presets train on the first 80% of each file (lines 0..799
of the 1,000-line ones), so the probe reads the rest. The argument lists the XX languages.

  python -m xlm_jax.main --mode=retrieval --config=configs/retrieval.py \
      --config.init_checkpoint=/tmp/xlm15_mlm_tlm --workdir=/tmp/retrieval_mlm_tlm
  python -m xlm_jax.main --mode=retrieval --config=configs/retrieval.py:de,fr \
      --config.init_checkpoint=/tmp/xlm_m30k --workdir=/tmp/retrieval_m30k
  python -m xlm_jax.main --mode=retrieval --config=configs/retrieval.py \
      --config.init_checkpoint=/tmp/xlm15_mlm_tlm --workdir=/tmp/retrieval_layer2 --config.layer=2
"""

from xlm_jax.data import nli
from xlm_jax.tasks import retrieval


def get_config(langs: str = "all"):
    c = retrieval.retrieval_default_config()
    chosen = nli.PAPER_LANGS if langs == "all" else tuple(langs.split(","))
    pairs = tuple(lang for lang in chosen if lang != "en")  # each XX is probed against English
    c.init_checkpoint = ""  # the pretraining workdir: --config.init_checkpoint=WORKDIR
    c.data.root = "../shared/data"
    c.data.pairs = retrieval.tatoeba_pair_sources(pairs, start=retrieval.TATOEBA_HELD_OUT)
    c.max_len = 256
    c.batch_size = 64
    return c
