"""The configured corpora: which sources make each language's and each pair's train/valid text.

A config names the sources of a split in one string, by language (``en``) or pair (``en-fr``)::

    data.train = "en: train.en; fr: train.fr; en-fr: train.en|train.fr"
    data.valid = "en: val.en, other/val.en"         # several sources are concatenated

(one string, not a dict, so a whole split can be replaced from the command line.)

Each source is a spec of ``data.sources`` (a file relative to ``data.root``, optionally with an
``@start:end`` line range, or a ``tfds:`` source). Everything is read and checked before anything is
compiled, so a bad file fails the run in seconds, not hours.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from difflib import get_close_matches
from pathlib import Path

import ml_collections
import numpy as np

from xlm_jax.data.sources import DataError, read_lines, read_parallel, source_path
from xlm_jax.text.languages import KNOWN
from xlm_jax.text.tokenizer import Tokenizer

Pair = tuple[str, str]


def read_options(data) -> dict:
    """The reading options of a config's ``data`` section, for the ``sources`` readers."""
    return dict(
        max_chars=data.max_chars,
        on_invalid_utf8=data.on_invalid_utf8,
        data_dir=data.tfds_data_dir or None,
    )


def parse_key(key: str, langs: Sequence[str], where: str) -> str | Pair:
    """``'en'`` → ``'en'``; ``'en-fr'`` → ``('en', 'fr')``; unknown languages are an error."""
    parts = key.split("-")
    if len(parts) > 2 or not all(parts):
        raise DataError(f"{where}: cannot parse the key {key!r} (expected 'xx' or 'xx-yy')")
    for lang in parts:
        if lang not in langs:
            raise DataError(
                f"{where}: {key!r} names the language {lang!r}, not in langs {list(langs)}"
            )
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def codes(text: str) -> list[str]:
    """A comma-separated setting (``"en, fr"``) as a list of codes."""
    return [code.strip() for code in text.split(",") if code.strip()]


def lang_list(config: ml_collections.ConfigDict) -> list[str]:
    """``config.langs`` ("en,fr") as a list."""
    return codes(config.langs)


def checked_langs(config: ml_collections.ConfigDict) -> list[str]:
    """``config.langs`` as a list, checked, with the codes of ``config.new_langs`` accepted."""
    langs = lang_list(config)
    check_langs(langs, codes(config.new_langs))
    return langs


def check_langs(langs: Sequence[str], new_langs: Collection[str] = ()) -> None:
    """Distinct codes, each known (``text/languages.py``) or one of ``new_langs``."""
    if not langs:
        raise DataError("langs is empty: list the languages, e.g. 'en,fr'")
    dup = sorted({lang for lang in langs if list(langs).count(lang) > 1})
    if dup:
        raise DataError(f"langs lists {dup} more than once")
    # "_" is in XLM-100's codes (zh_yue); "-" is not: it separates a pair's codes ("en-fr").
    bad = [lang for lang in langs if not lang.replace("_", "").isalnum()]
    if bad:
        raise DataError(f"langs {bad}: a language code is letters, digits and '_', e.g. 'en'")
    check_known(langs, new_langs, "langs")


def check_known(langs: Iterable[str], new_langs: Collection[str], where: str) -> None:
    """Every code is in ``languages.KNOWN`` or ``new_langs``, or a ``DataError`` says what is
    near and how to accept a code the list does not know."""
    unknown = [lang for lang in langs if lang not in KNOWN and lang not in new_langs]
    if not unknown:
        return
    near = {u: nearest_known(u) for u in unknown}
    hints = "; ".join(f"{u!r}: did you mean {', '.join(m)}?" for u, m in near.items() if m)
    raise DataError(
        f"{where}: {unknown} not in the known language codes (ISO 639-1, XLM-100; "
        f"xlm_jax/text/languages.py){f' ({hints})' if hints else ''}. A language that list does "
        f"not have is accepted with --config.new_langs={','.join(unknown)}"
    )


def nearest_known(code: str, n: int = 3) -> list[str]:
    """The known codes closest to ``code``, those sharing its first letter first."""
    # cutoff 0.5: two-letter codes one letter apart (fx, fr) score exactly 0.5.
    close = get_close_matches(code.lower(), KNOWN, n=len(KNOWN), cutoff=0.5)
    return sorted(close, key=lambda k: k[:1] != code[:1].lower())[:n]  # stable: by score


@dataclasses.dataclass
class Split:
    """The text of one split: sentences per language and sentence pairs per language pair."""

    mono: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    para: dict[Pair, tuple[list[str], list[str]]] = dataclasses.field(default_factory=dict)


def parse_sources(text: str, where: str) -> dict[str, str]:
    """``"en: a.en; en-fr: a.en|a.fr"`` → ``{'en': 'a.en', 'en-fr': 'a.en|a.fr'}``."""
    out: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        key, sep, spec = entry.partition(":")
        if not sep or not key.strip() or not spec.strip():
            raise DataError(f"{where}: {entry!r} must be 'KEY: SOURCE[, SOURCE...]'")
        if key.strip() in out:
            raise DataError(f"{where}: {key.strip()!r} is given twice")
        out[key.strip()] = spec.strip()
    return out


def source_items(text: str, where: str) -> dict[str, list[str]]:
    """``"en: a.en, b.en; en-fr: a.en|a.fr"`` → ``{'en': ['a.en', 'b.en'], 'en-fr':
    ['a.en|a.fr']}``: each key's sources, at least one."""
    out = {}
    for key, spec in parse_sources(text, where).items():
        out[key] = [s.strip() for s in spec.split(",") if s.strip()]
        if not out[key]:
            raise DataError(f"{where}.{key}: no source given")
    return out


def read_split(
    sources: str,
    langs: Sequence[str],
    *,
    root: str,
    where: str,
    **read_kw,
) -> Split:
    """Reads every source of one split (``where`` names it in errors, e.g. ``data.train``)."""
    split = Split()
    for key, items in source_items(sources, where).items():
        parsed = parse_key(key, langs, where)
        if isinstance(parsed, str):
            lines: list[str] = []
            for item in items:
                lines += read_lines(item, root, **read_kw)
            split.mono[parsed] = lines
        else:
            src: list[str] = []
            tgt: list[str] = []
            for item in items:
                sides = item.split("|")
                if len(sides) != 2:
                    raise DataError(
                        f"{where}.{key}: {item!r} must be 'SRC_SPEC|TGT_SPEC' "
                        "(two line-aligned sources)"
                    )
                s, t = read_parallel(sides[0], sides[1], root, **read_kw)
                src += s
                tgt += t
            split.para[parsed] = (src, tgt)
    return split


def split_paths(
    splits: Mapping[str, str], *, root: str | os.PathLike, data_dir: str | None
) -> list[Path]:
    """The files (for a tfds: source, its dataset's directory) that ``splits`` (where -> sources
    text, e.g. ``{"data.train": config.data.train}``) read, each once: a task's ``Plan.sources``."""
    paths = [
        source_path(side.strip(), root, data_dir=data_dir)
        for where, text in splits.items()
        for items in source_items(text, where).values()
        for item in items
        for side in item.split("|")
    ]
    return list(dict.fromkeys(paths))


def tokenizer_texts(split: Split) -> dict[str, list[str]]:
    """Training text per language for the BPE model: its monolingual text, else its pair sides.
    (Runs sample it while streaming, ``prepare.tokenizer_segments``; this in-memory version is
    the reference they are tested against.)"""
    texts = {lang: list(lines) for lang, lines in split.mono.items()}
    for (l1, l2), (src, tgt) in split.para.items():
        for lang, side in ((l1, src), (l2, tgt)):
            if lang not in split.mono:
                texts.setdefault(lang, []).extend(side)
    return texts


@dataclasses.dataclass
class TokenizedSplit:
    mono: dict[str, list[np.ndarray]]
    para: dict[Pair, tuple[list[np.ndarray], list[np.ndarray]]]


def tokenize_split(split: Split, tokenizer: Tokenizer) -> TokenizedSplit:
    """Every sentence of ``split`` encoded, in memory: what prepared shards hold (tested)."""
    return TokenizedSplit(
        # The language matters to tokenizers with per-language rules (XLM's Moses).
        mono={lang: tokenizer.encode_many(lines, lang) for lang, lines in split.mono.items()},
        para={
            pair: (tokenizer.encode_many(src, pair[0]), tokenizer.encode_many(tgt, pair[1]))
            for pair, (src, tgt) in split.para.items()
        },
    )
