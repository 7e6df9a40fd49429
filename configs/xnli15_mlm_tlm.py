"""The paper's XNLI-15 model: 12 layers x 1024, 8 heads, 15 languages, MLM + TLM, ~95k BPE.

Sized for a pod, not for this machine; tests build it and jax.eval_shape its parameters. Text:
Tatoeba pairs with English for the 14 other languages (lines 0..799 train, 800.. valid) and
Multi30k for en/de/fr (see ../shared/data/README.md).

  launch/tpu_pod.sh -- --config=configs/xnli15_mlm_tlm.py --workdir=/mnt/shared/xnli15 \
      --config.data.root=/mnt/shared/data
  # (the workdir must be a filesystem path every host sees: NFS, or a bucket mounted with gcsfuse)
"""

from xlm_jax.config import default_config
from xlm_jax.data.tfds_local import ISO3

LANGS = ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur"]
SPLIT = 800  # Tatoeba lines below this train, the rest validate


def _tatoeba(lang: str, side: str, rows: str) -> str:
    iso = ISO3[lang]
    return f"tatoeba/tatoeba.{iso}-eng.{ISO3[side] if side != 'en' else 'eng'}@{rows}"


def get_config():
    c = default_config()
    c.langs = ",".join(LANGS)
    others = LANGS[1:]
    train, valid = [], []
    for lang in LANGS:
        mono = (
            [_tatoeba(o, "en", f"0:{SPLIT}") for o in others]
            if lang == "en"
            else [_tatoeba(lang, lang, f"0:{SPLIT}")]
        )
        if lang in ("en", "de", "fr"):
            mono.append(f"multi30k/train.{lang}")
        train.append(f"{lang}: {', '.join(mono)}")
        valid_src = (
            f"multi30k/val.{lang}"
            if lang in ("en", "de", "fr")
            else _tatoeba(lang, lang, f"{SPLIT}:")
        )
        valid.append(f"{lang}: {valid_src}")
    for lang in others:
        train.append(
            f"en-{lang}: {_tatoeba(lang, 'en', f'0:{SPLIT}')}|{_tatoeba(lang, lang, f'0:{SPLIT}')}"
        )
        valid.append(
            f"en-{lang}: {_tatoeba(lang, 'en', f'{SPLIT}:')}|{_tatoeba(lang, lang, f'{SPLIT}:')}"
        )
    c.data.root = "../shared/data"
    c.data.train = "; ".join(train)
    c.data.valid = "; ".join(valid)

    c.tokenizer.vocab_size = 95_000
    c.model.emb_dim = 1024
    c.model.n_layers = 12
    c.model.n_heads = 8
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.dtype = "bfloat16"

    c.mlm_steps = ",".join(LANGS + [f"en-{lang}" for lang in others])
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
