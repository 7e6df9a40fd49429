"""The paper's XNLI-15 model: 12 layers x 1024, 8 heads, 15 languages, MLM + TLM, ~95k BPE.

Sized for a pod, not for this machine; tests build it and jax.eval_shape its parameters. Text:
Tatoeba pairs with English for the 14 other languages (first 80% of lines train, rest valid) and
Multi30k for en/de/fr (see ../shared/data/README.md and xlm_jax/data/presets.py).

  launch/tpu_pod.sh -- --config=configs/xnli15_mlm_tlm.py --workdir=/mnt/shared/xnli15 \
      --config.data.root=/mnt/shared/data
  # (the workdir must be a filesystem path every host sees: NFS, or a bucket mounted with gcsfuse)
"""

from xlm_jax.data import presets
from xlm_jax.tasks.pretrain_config import default_config


def get_config():
    c = default_config()
    c.langs = ",".join(presets.XNLI15)
    c.data.root = "../shared/data"
    c.data.train, c.data.valid = presets.xnli15_sources()

    c.tokenizer.vocab_size = 95_000
    c.model.emb_dim = 1024
    c.model.n_layers = 12
    c.model.n_heads = 8
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.dtype = "bfloat16"

    c.mlm_steps = presets.xnli15_steps()
    c.batch_size = 64
    c.bptt = 256
    c.tlm_batch_size = 128
    c.tlm_length = 128
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 30_000
    c.optimizer.beta2 = 0.999
    c.optimizer.weight_decay = 0.01
    c.max_steps = 1_000_000
    c.mesh.shape = (1, -1, 1)  # FSDP over every device
    return c
