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


def tatoeba_pair(lang: str, rows: str) -> str:
    """Tatoeba's English|lang pair source, lines ``rows``."""
    return f"{tatoeba(lang, 'en', rows)}|{tatoeba(lang, lang, rows)}"


TRAIN_SHARE = 80  # percent of each Tatoeba file used for training


def xnli15_sources(
    train_share: int = TRAIN_SHARE, langs: tuple[str, ...] = XNLI15, parallel: bool = False
) -> tuple[str, str]:
    """(train, valid) source strings: monolingual text per language and pairs ``en-xx``.

    ``parallel`` adds ``parallel/`` (news, UN, NTREX) to the training text: each pair for TLM and
    its sides for MLM. Validation stays Tatoeba's held-out lines and Multi30k val."""
    others = [lang for lang in langs if lang != "en"]
    split = f"{train_share}%"
    mono: dict[str, list[str]] = {lang: [] for lang in langs}
    pairs: dict[str, list[str]] = {f"en-{lang}": [] for lang in others}
    valid = []
    for lang in langs:
        if lang == "en":
            mono[lang] += [tatoeba(o, "en", f"0:{split}") for o in others]
        else:
            mono[lang].append(tatoeba(lang, lang, f"0:{split}"))
        if lang in MULTI30K:
            mono[lang].append(f"multi30k/train.{lang}")
        held_out = f"multi30k/val.{lang}" if lang in MULTI30K else tatoeba(lang, lang, f"{split}:")
        valid.append(f"{lang}: {held_out}")
    for lang in others:
        pairs[f"en-{lang}"].append(tatoeba_pair(lang, f"0:{split}"))
        valid.append(f"en-{lang}: {tatoeba_pair(lang, f'{split}:')}")
    if parallel:
        _add_parallel(mono, pairs)
    train = [f"{k}: {', '.join(v)}" for k, v in (*mono.items(), *pairs.items()) if v]
    return "; ".join(train), "; ".join(valid)


# ../shared/data/parallel: other benchmarks' test sets, for pretraining only (its README).
NEWS = ("ar", "de", "es", "fr", "hi", "ru", "sw", "tr", "ur", "zh")  # news/en-xx.{en,xx}
UN = ("ar", "es", "fr", "ru", "zh")  # un/un.{en,xx}, six-way aligned
NEWS_EN = "de"  # English MLM text from one news pair: the pairs share most English sources


def _add_parallel(mono: dict[str, list[str]], pairs: dict[str, list[str]]) -> None:
    """Adds news, UN and NTREX (every XNLI language) to ``mono`` and ``pairs``, in place."""
    for lang in [lang for lang in mono if lang != "en"]:
        sides = [("parallel/ntrex/ntrex.en", f"parallel/ntrex/ntrex.{lang}")]
        if lang in NEWS:
            sides.append((f"parallel/news/en-{lang}.en", f"parallel/news/en-{lang}.{lang}"))
        if lang in UN:
            sides.append(("parallel/un/un.en", f"parallel/un/un.{lang}"))
        pairs[f"en-{lang}"] += [f"{en}|{xx}" for en, xx in sides]
        mono[lang] += [xx for _, xx in sides]
    if "en" in mono:
        mono["en"] += ["parallel/ntrex/ntrex.en", "parallel/un/un.en"]
        if NEWS_EN in mono:
            mono["en"].append(f"parallel/news/en-{NEWS_EN}.en")


def xnli15_steps(langs: tuple[str, ...] = XNLI15, tlm: bool = True) -> str:
    """``mlm_steps``: MLM on every language, and TLM on every en-xx pair when ``tlm``."""
    pairs = [f"en-{lang}" for lang in langs if lang != "en"] if tlm else []
    return ",".join(list(langs) + pairs)
