"""Source strings (see data/corpus.py) for the corpora laid out as in ../shared/data.

The 15 XNLI languages: Tatoeba pairs with English for the 14 others, the first ``train_share``
percent of each file for training and the rest for validation (and for the retrieval probe,
which must not see training lines; the files hold 390 to 1,000 lines), plus Multi30k for
en/de/fr. XNLI text itself never enters pretraining.
"""

from __future__ import annotations

from xlm_jax.data.tfds_local import ISO3

XNLI15 = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
MULTI30K = ("en", "de", "fr")


def tatoeba(lang: str, side: str, rows: str) -> str:
    """The ``side`` half (``lang`` or ``'en'``) of Tatoeba's lang-English pair, lines ``rows``."""
    ext = "eng" if side == "en" else ISO3[side]
    return f"tatoeba/tatoeba.{ISO3[lang]}-eng.{ext}@{rows}"


TRAIN_SHARE = 80  # percent of each Tatoeba file used for training


def xnli15_sources(
    train_share: int = TRAIN_SHARE, langs: tuple[str, ...] = XNLI15
) -> tuple[str, str]:
    """(train, valid) source strings: monolingual text per language and pairs ``en-xx``."""
    others = [lang for lang in langs if lang != "en"]
    split = f"{train_share}%"
    train, valid = [], []
    for lang in langs:
        if lang == "en":
            mono = [tatoeba(o, "en", f"0:{split}") for o in others]
        else:
            mono = [tatoeba(lang, lang, f"0:{split}")]
        if lang in MULTI30K:
            mono.append(f"multi30k/train.{lang}")
        train.append(f"{lang}: {', '.join(mono)}")
        held_out = f"multi30k/val.{lang}" if lang in MULTI30K else tatoeba(lang, lang, f"{split}:")
        valid.append(f"{lang}: {held_out}")
    for lang in others:
        for rows, out in ((f"0:{split}", train), (f"{split}:", valid)):
            out.append(f"en-{lang}: {tatoeba(lang, 'en', rows)}|{tatoeba(lang, lang, rows)}")
    return "; ".join(train), "; ".join(valid)


def xnli15_steps(langs: tuple[str, ...] = XNLI15, tlm: bool = True) -> str:
    """``mlm_steps``: MLM on every language, and TLM on every en-xx pair when ``tlm``."""
    pairs = [f"en-{lang}" for lang in langs if lang != "en"] if tlm else []
    return ",".join(list(langs) + pairs)
