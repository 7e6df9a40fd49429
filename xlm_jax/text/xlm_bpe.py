"""XLM's own tokenization (Moses + fastBPE + dictionary), for models imported from XLM or HF.

The released XLM models were trained on text prepared by shell pipelines (XLM's `tools/tokenize.sh`,
`get-data-xnli.sh`, `get-data-nmt.sh`), which this module reproduces step by step:

  1. Moses `replace-unicode-punctuation` | `normalize-punctuation -l LANG` |
     `remove-non-printing-char` (sacremoses' `MosesPunctNormalizer`, with the perl scripts' own
     rules where it departs from them: see `continental_quotes` and `printing_only`);
  2. for the en-ro models only: Sennrich's `normalise-romanian` + `remove-diacritics`;
  3. Moses `tokenizer.perl -l LANG -no-escape` (sacremoses' `MosesTokenizer`, then perl's split
     of the line's final period: `split_final_period`);
  4. for the XNLI-15 / English models only: XLM's `lowercase_and_remove_accent.py`;
  5. `fastBPE applybpe` with the model's codes: a word's subwords joined by the `@@` convention
     (`lo@@ w@@ er`: every subword but the last carries `@@`);
  6. XLM's `Dictionary.index`: a word missing from the (`max_vocab`-truncated) dictionary is
     `<unk>`; a special word found in the text (`<s>`, `<special1>`, ...) is dropped.

Ids follow XLM's dictionary, whose first 14 entries are fixed (the constants of `specials.py`):
`<s>`0 `</s>`1 `<pad>`2 `<unk>`3 `<special0..9>`4-13 (mask = `<special1>` = 5).

`XLMBPETokenizer` has the interface of `tokenizer.Tokenizer` (without subclassing it: `tokenizer`
imports this module to dispatch to it); its `serialized` form is a JSON document behind a magic
header, so checkpoints embed it like a SentencePiece model and `Tokenizer.from_bytes` brings back
the right class.

XLM's `tools/tokenize.sh` gives three languages to their own segmenter instead of steps 1-3:
  * th: `tools/segment_th.py` (PyThaiNLP's `word_tokenize(line)`, its default engine `newmm`,
    words joined by spaces) then `remove-non-printing-char`: done here with the same call
    (`th_segmenter`);
  * zh: the Stanford segmenter (`segment.sh pku`, Java + a CRF model, not available here); jieba's
    default `cut` stands in for it (`zh_segmenter`): the words differ where the two segmenters'
    standards do (docs/interop.md measures it);
  * ja: KyTea, not reproduced: ja goes through Moses (a warning says so).
Both segmenters are requirements; without one, tokenizing its language fails naming the package.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xlm_jax.core.files import write_atomic
from xlm_jax.text.specials import N_SPECIAL, SPECIAL_PIECES, UNK_ID, XLM_BPE_MAGIC, Serialized

if TYPE_CHECKING:
    import sacremoses

_log = logging.getLogger(__name__)

END_OF_WORD = "</w>"  # fastBPE's marker on a word's last symbol (codes and HF vocab.json)
CONTINUATION = "@@"  # XLM's marker on every subword but a word's last
# Languages that XLM segmented with a tool not reproduced here (see the module docstring).
_NOT_REPRODUCED = {"ja": "KyTea"}
# lang -> (module, pip requirement, its role): the segmenters that replace Moses for a language.
_SEGMENTER_PACKAGES = {
    "th": ("pythainlp.tokenize", "pythainlp==2.0.7", "XLM's tools/segment_th.py"),
    "zh": ("jieba", "jieba==0.42.1", "in place of XLM's Stanford segmenter"),
}


# --- the dictionary ------------------------------------------------------------------------------


def check_dictionary(words: Sequence[str]) -> None:
    """XLM's `Dictionary.check_valid` on an id → word list: fixed specials, no duplicates."""
    if len(words) <= N_SPECIAL:
        raise ValueError(
            f"dictionary has {len(words)} words, not more than the {N_SPECIAL} specials"
        )
    bad = [(i, words[i]) for i in range(N_SPECIAL) if words[i] != SPECIAL_PIECES[i]]
    if bad:
        raise ValueError(f"dictionary special ids differ from XLM's: {bad[:4]}")
    if len(set(words)) != len(words):
        dup = [w for w, n in Counter(words).items() if n > 1]
        raise ValueError(f"dictionary lists words more than once: {dup[:5]}")


def words_from_id2word(id2word: Mapping[int, str]) -> list[str]:
    """A checkpoint's `dico_id2word` ({id: word}, ids 0..n-1) as a list."""
    n = len(id2word)
    if sorted(int(i) for i in id2word) != list(range(n)):
        raise ValueError("dico_id2word ids are not 0..n-1")
    words = [id2word[i] for i in range(n)]
    check_dictionary(words)
    return words


def read_vocab(text: str) -> list[str]:
    """XLM's `Dictionary.read_vocab` of a fastBPE vocabulary file ("word count" lines).

    The 14 specials come first; a line with U+2028, without exactly two fields, or repeating a
    word is skipped (and shifts nothing), as in XLM.
    """
    words = list(SPECIAL_PIECES)
    known = set(words)
    for i, line in enumerate(text.split("\n")):
        if "\u2028" in line:
            continue
        fields = line.rstrip().split()
        if len(fields) != 2:
            continue
        if not fields[1].isdigit():
            raise ValueError(f"vocabulary line {i + 1}: count {fields[1]!r} is not a number")
        if fields[0] in known:
            continue
        known.add(fields[0])
        words.append(fields[0])
    check_dictionary(words)
    return words


def words_from_hf_vocab(vocab: Mapping[str, int]) -> list[str]:
    """HF `vocab.json` → XLM words. HF's conversion wrote XLM's `w@@` as `w` and a word-final `w`
    as `w</w>` (ids >= 14 only); this undoes it."""
    n = len(vocab)
    by_id: dict[int, str] = {}
    for token, i in vocab.items():
        if i in by_id:
            raise ValueError(f"vocab.json maps {by_id[i]!r} and {token!r} to the same id {i}")
        by_id[int(i)] = token
    if sorted(by_id) != list(range(n)):
        raise ValueError("vocab.json ids are not 0..n-1")
    words = []
    for i in range(n):
        token = by_id[i]
        if i < N_SPECIAL:
            words.append(token)
        elif token.endswith(END_OF_WORD):
            words.append(token[: -len(END_OF_WORD)])
        else:
            words.append(token + CONTINUATION)
    check_dictionary(words)
    return words


def hf_vocab_from_words(words: Sequence[str]) -> dict[str, int]:
    """XLM words → HF `vocab.json` (the inverse of `words_from_hf_vocab`)."""
    out = {}
    for i, word in enumerate(words):
        if i < N_SPECIAL:
            out[word] = i
        elif word.endswith(CONTINUATION):
            out[word[: -len(CONTINUATION)]] = i
        else:
            out[word + END_OF_WORD] = i
    if len(out) != len(words):
        raise ValueError("the dictionary has words that collide in HF's vocab.json convention")
    return out


# --- fastBPE -------------------------------------------------------------------------------------


Code = tuple[str, str, int]  # (left, right, count): one merge, ranked by its line


def read_codes(text: str) -> list[Code]:
    """A fastBPE codes file ("left right count" lines; HF's merges.txt has the same first two
    fields). A merge's rank is its line; a `#version` header and blank lines are skipped."""
    codes: list[Code] = []
    for i, line in enumerate(text.split("\n")):
        fields = line.split()
        if not fields or (i == 0 and line.startswith("#version")):
            continue
        if len(fields) not in (2, 3) or (len(fields) == 3 and not fields[2].isdigit()):
            raise ValueError(f"BPE codes line {i + 1}: expected 'left right [count]', got {line!r}")
        codes.append((fields[0], fields[1], int(fields[2]) if len(fields) == 3 else 0))
    if not codes:
        raise ValueError("the BPE codes are empty")
    return codes


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """``symbols`` with every occurrence of ``pair`` (left to right) joined into one symbol."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class FastBPE:
    """fastBPE's `applybpe` on one word: split into characters (the last one marked `</w>`),
    then merge the best-ranked adjacent pair, all its non-overlapping occurrences left to right,
    until no pair is a code. Returns the subwords in XLM's `@@` convention."""

    def __init__(self, codes: Sequence[Code]) -> None:
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, (left, right, _) in enumerate(codes):
            self._ranks.setdefault((left, right), rank)  # fastBPE keeps the first
        self._cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best, best_rank = None, -1
            for pair in zip(symbols, symbols[1:], strict=False):
                rank = ranks.get(pair, -1)
                if rank >= 0 and (best is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            symbols = merge_pair(symbols, best)
        out = [s + CONTINUATION for s in symbols[:-1]] + [symbols[-1][: -len(END_OF_WORD)]]
        if len(self._cache) < 1_000_000:  # bounded: the cache of a long run's rare words
            self._cache[word] = out
        return out


# --- Moses preprocessing -------------------------------------------------------------------------

# Sennrich's WMT16 `normalise-romanian.py` (cedilla → comma below) then `remove-diacritics.py`.
_ROMANIAN = str.maketrans(
    {
        "\u015e": "S", "\u015f": "s", "\u0162": "T", "\u0163": "t",  # ş ţ (cedilla)
        "\u0218": "S", "\u0219": "s", "\u021a": "T", "\u021b": "t",  # ș ț (comma)
        "\u0102": "A", "\u0103": "a", "\u00c2": "A", "\u00e2": "a",  # ă â
        "\u00ce": "I", "\u00ee": "i",  # î
    }
)  # fmt: skip


def lowercase_and_remove_accent(tokens: Iterable[str]) -> list[str]:
    """XLM's `tools/lowercase_and_remove_accent.py`: lowercase, NFD, drop combining marks (Mn).

    Like XLM's tool the text stays NFD (e.g. Hangul as jamo); a token that was only combining
    marks disappears (fastBPE skips empty words).
    """
    text = unicodedata.normalize("NFD", " ".join(tokens).lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn").lower()
    return [t for t in text.split(" ") if t]


# normalize-punctuation.perl's quote rule has three branches: en's, none for cs/cz, and a
# continental one (commented "German/Spanish/French") for every other language.
_OWN_QUOTE_RULE = frozenset({"en", "cs", "cz"})
# The continental `s/(\.+)\"(\s*[^<])/\"$1$2/g`. perl runs it on bytes (no `use utf8`), where
# `\s` is ASCII whitespace; how much `\s*` consumes decides whether a later `."` still matches.
_PERIOD_QUOTE = re.compile(r'(\.+)"(\s*[^<])', re.ASCII)


def continental_quotes(text: str) -> str:
    """normalize-punctuation.perl's `,"` → `",` and `."` → `".` (every language but en, cs, cz).

    perl runs them on the line with its newline, which `[^<]` matches: a `."` ending the line
    moves too (`Ja."` → `Ja".`). sacremoses sees no newline there (and applies the rule to de, es
    and fr only), so this replaces its version.
    """
    text = text.replace(',"', '",')
    return _PERIOD_QUOTE.sub(r'"\1\2', text + "\n").removesuffix("\n")


def printing_only(text: str) -> str:
    r"""remove-non-printing-char.perl's `s/\p{C}/ /g`: a control or format character (a tab, a
    zero-width space, ...) becomes a space. sacremoses deletes it instead, gluing the words
    around it together (`Tabs\tand` → `Tabsand`)."""
    return _non_printing().sub(" ", text)


# normalize-punctuation.perl l. 41-42: `s/‘/\"/g; s/‚/\"/g;` (a ‘ between two ASCII letters
# became `'` just before, l. 39): sacremoses' port makes them `'`, which tokenizer.perl then splits
# off as an apostrophe (de `‚Twp‘` → `' Twp '` instead of `" Twp "`).
_PERL_DOUBLE_QUOTES = ("‘", "‚")


def perl_quote_rules(substitutions: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """sacremoses' normalizer substitutions with perl's `"` for a lone ‘ or ‚."""
    found = [pattern for pattern, _ in substitutions if pattern in _PERL_DOUBLE_QUOTES]
    if sorted(found) != sorted(_PERL_DOUBLE_QUOTES):  # a sacremoses upgrade changed its rules
        raise RuntimeError(f"sacremoses' normalizer has no single rule for each of ‘ ‚: {found}")
    return [(p, '"') if p in _PERL_DOUBLE_QUOTES else (p, r) for p, r in substitutions]


def split_final_period(tokens: list[str]) -> list[str]:
    """tokenizer.perl splits the period off the line's last word whatever the word ("split last
    words independently as they are unlikely to be non-breaking prefixes"); sacremoses applies
    the non-breaking prefixes there too and keeps `C.` in `-5°C.`, `2.` in de `2:2.`.

    A last token of dots only is a `...` run: perl hides those from the rule (`DOTMULTI`).
    """
    last = tokens[-1] if tokens else ""
    if len(last) > 1 and last.endswith(".") and last.strip("."):
        return [*tokens[:-1], last[:-1], "."]
    return tokens


# --- the segmenters XLM used instead of Moses (zh, th) --------------------------------------------


def th_segmenter() -> Callable[[str], list[str]]:
    r"""XLM's `segment_th.py | remove-non-printing-char.perl`: `' '.join(word_tokenize(line))`
    (PyThaiNLP, default arguments), then `\p{C}` → space; words are what spaces separate (the
    whitespace tokens PyThaiNLP keeps vanish there, as in fastBPE and XLM's dictionary)."""
    word_tokenize = import_segmenter("th").word_tokenize
    return lambda text: printing_only(" ".join(word_tokenize(text))).split()


def zh_segmenter() -> Callable[[str], list[str]]:
    """jieba's default `cut` (dictionary + HMM) where XLM ran the Stanford segmenter on the raw
    line (`segment.sh pku`, no Moses step before or after)."""
    jieba = import_segmenter("zh")
    jieba.setLogLevel(logging.WARNING)  # not its "Building prefix dict..." lines in every run
    return lambda text: " ".join(jieba.lcut(text)).split()


_SEGMENTERS: dict[str, Callable[[], Callable[[str], list[str]]]] = {
    "th": th_segmenter,
    "zh": zh_segmenter,
}


def import_segmenter(lang: str) -> Any:
    """The module of `lang`'s segmenter; a clear error naming the package when it is missing (no
    fallback to Moses: its words would silently differ from the model's)."""
    module, requirement, role = _SEGMENTER_PACKAGES[lang]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = requirement.partition("==")[0]
        raise ImportError(
            f"tokenizing {lang!r} as XLM did needs the {package!r} package ({role}): "
            f"pip install {requirement} (it is in requirements.txt)"
        ) from e


class MosesPipeline:
    """XLM's `tools/tokenize.sh` (+ lowercasing) for one language: raw text → XLM's words.

    Steps 1-4 of the module docstring; for zh and th their segmenter replaces steps 1-3.
    """

    def __init__(self, lang: str, *, lowercase: bool, romanian: bool) -> None:
        self.lang = lang
        self.lowercase = lowercase
        self.romanian = romanian and lang == "ro"
        self._segment = _SEGMENTERS[lang]() if lang in _SEGMENTERS else None
        if self._segment is not None:
            return  # no Moses step for this language
        sacremoses = _sacremoses()
        # Non-printing characters and the continental quote rule are done here, the perl way;
        # perl_parity: the perl script's spaces around French quotes.
        self._normalizer = sacremoses.MosesPunctNormalizer(
            lang=lang,
            pre_replace_unicode_punct=True,
            norm_quote_commas=lang == "en",
            post_remove_control_chars=False,
            perl_parity=True,
        )
        self._normalizer.substitutions = perl_quote_rules(self._normalizer.substitutions)
        self._tokenizer = sacremoses.MosesTokenizer(lang=lang)
        self._tokenizer.PAD_NOT_ISALNUM = (_not_alnum(), r" \1 ")
        if lang in _NOT_REPRODUCED:
            _log.warning(
                "XLM segmented %r text with %s, not Moses: ids may differ from the reference",
                lang,
                _NOT_REPRODUCED[lang],
            )

    def __call__(self, text: str) -> list[str]:
        tokens = self._segment(text) if self._segment is not None else self._moses(text)
        if self.lowercase:
            tokens = lowercase_and_remove_accent(tokens)
        return tokens

    def _moses(self, text: str) -> list[str]:
        text = self._normalizer.normalize(text)
        if self.lang not in _OWN_QUOTE_RULE:
            text = continental_quotes(text)
        text = printing_only(text)  # after the quote rule, whose `\s*` must see them as perl does
        if self.romanian:
            text = text.translate(_ROMANIAN)
        return split_final_period(self._tokenizer.tokenize(text, escape=False))


# --- the tokenizer -------------------------------------------------------------------------------


class XLMBPETokenizer(Serialized):
    """XLM's tokenization (Moses + fastBPE + dictionary) with the `tokenizer.Tokenizer` interface.

    `encode`/`encode_many`/`decode` take an optional `lang` (Moses rules are per language);
    without it, `default_lang`. Build one with `from_files` (XLM's codes + vocabulary), `from_hf`
    (HF's vocab.json + merges.txt) or the constructor.
    """

    FORMAT = "xlm-fastbpe"
    VERSION = 1

    def __init__(
        self,
        words: Sequence[str],
        codes: Sequence[Code],
        *,
        lowercase: bool,
        romanian: bool = False,
        default_lang: str = "en",
    ) -> None:
        words = list(words)
        check_dictionary(words)
        self._words = words
        self._word2id = {w: i for i, w in enumerate(words)}
        self._codes = [(str(a), str(b), int(c)) for a, b, c in codes]
        self.lowercase = bool(lowercase)
        self.romanian = bool(romanian)
        self.default_lang = default_lang
        self._bpe = FastBPE(self._codes)
        self._pipelines: dict[str, MosesPipeline] = {}
        doc = {
            "format": self.FORMAT,
            "version": self.VERSION,
            "lowercase": self.lowercase,
            "romanian": self.romanian,
            "default_lang": self.default_lang,
            "words": self._words,
            "codes": [list(c) for c in self._codes],
        }
        self._serialized = XLM_BPE_MAGIC + json.dumps(
            doc, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")

    # -- construction and serialization

    @classmethod
    def from_bytes(cls, serialized: bytes) -> XLMBPETokenizer:
        if not serialized.startswith(XLM_BPE_MAGIC):
            raise ValueError("not a serialized XLM BPE tokenizer (missing magic header)")
        doc = json.loads(serialized[len(XLM_BPE_MAGIC) :].decode("utf-8"))
        if doc.get("format") != cls.FORMAT or doc.get("version") != cls.VERSION:
            raise ValueError(
                f"unsupported XLM BPE tokenizer {doc.get('format')!r} v{doc.get('version')}"
            )
        tok = cls(
            doc["words"],
            [tuple(c) for c in doc["codes"]],
            lowercase=doc["lowercase"],
            romanian=doc["romanian"],
            default_lang=doc["default_lang"],
        )
        if tok.serialized != serialized:  # checkpoints identify tokenizers by sha256
            tok._serialized = serialized
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> XLMBPETokenizer:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_files(
        cls,
        codes_path: str | os.PathLike,
        vocab_path: str | os.PathLike,
        *,
        max_vocab: int = -1,
        **options,
    ) -> XLMBPETokenizer:
        """XLM's released `codes_*` and `vocab_*` files; `max_vocab` > 0 truncates as XLM's flag."""
        words = read_vocab(Path(vocab_path).read_text(encoding="utf-8"))
        if max_vocab > 0:
            words = truncate(words, max_vocab)
        return cls(words, read_codes(Path(codes_path).read_text(encoding="utf-8")), **options)

    @classmethod
    def from_hf(
        cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, **options
    ) -> XLMBPETokenizer:
        """A HuggingFace XLM tokenizer's `vocab.json` + `merges.txt`."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        codes = read_codes(Path(merges_txt).read_text(encoding="utf-8"))
        return cls(words_from_hf_vocab(vocab), codes, **options)

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Writes `vocab.json` and `merges.txt` as HF's `XLMTokenizer` reads them."""
        d = Path(directory)
        vocab = json.dumps(hf_vocab_from_words(self._words), ensure_ascii=False, indent=1)
        write_atomic(d / "vocab.json", (vocab + "\n").encode("utf-8"))
        merges = "".join(f"{a} {b} {c}\n" for a, b, c in self._codes)
        write_atomic(d / "merges.txt", merges.encode("utf-8"))

    @property
    def vocab_size(self) -> int:
        return len(self._words)

    @property
    def words(self) -> list[str]:
        return list(self._words)

    @property
    def codes(self) -> list[Code]:
        return list(self._codes)

    # -- text <-> ids

    def _pipeline(self, lang: str) -> MosesPipeline:
        if lang not in self._pipelines:  # sacremoses loads per-language tables: build once
            self._pipelines[lang] = MosesPipeline(
                lang, lowercase=self.lowercase, romanian=self.romanian
            )
        return self._pipelines[lang]

    def words_of(self, text: str, lang: str | None = None) -> list[str]:
        """The BPE words of `text` (steps 1-5), e.g. `['lo@@', 'w@@', 'er']`."""
        out: list[str] = []
        for token in self._pipeline(lang or self.default_lang)(text):
            out.extend(self._bpe(token))
        return out

    def encode(self, text: str, lang: str | None = None) -> np.ndarray:
        """int32 ids of `text`; no <s>/</s> added (the data pipeline frames)."""
        ids = []
        for word in self.words_of(text, lang):
            i = self._word2id.get(word, UNK_ID)
            if i < N_SPECIAL and i != UNK_ID:
                continue  # XLM's index_data drops special words found in the text
            ids.append(i)
        return np.asarray(ids, dtype=np.int32)

    def encode_many(
        self, texts: Sequence[str], lang: str | None = None, *, threads: int = -1
    ) -> list[np.ndarray]:
        """`encode` of each text (in this thread: `threads` is for SentencePiece's signature)."""
        if isinstance(texts, str):
            raise TypeError("encode_many takes a sequence of strings; use encode for one string")
        return [self.encode(t, lang) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray, lang: str | None = None) -> str:
        """Text of `ids`: special ids dropped, `@@` subwords joined, Moses-detokenized."""
        arr = self.checked_ids(ids)
        text = " ".join(self._words[i] for i in arr[arr >= N_SPECIAL].tolist())
        text = (text + " ").replace(CONTINUATION + " ", "").strip()
        return moses_detokenize(text, lang or self.default_lang)

    def id_to_piece(self, i: int) -> str:
        return self._words[int(i)]

    def piece_to_id(self, piece: str) -> int:
        return self._word2id.get(piece, UNK_ID)

    def __repr__(self) -> str:
        return (
            f"XLMBPETokenizer(vocab_size={self.vocab_size}, codes={len(self._codes)}, "
            f"lowercase={self.lowercase}, sha256={self.sha256[:12]})"
        )


def moses_detokenize(text: str, lang: str) -> str:
    """Moses-tokenized text (``"a cat , sleeping ."``) back to running text (``"a cat,
    sleeping."``) by ``lang``'s rules; entities such as ``&amp;`` stay as written."""
    return _detokenizer(lang).detokenize(text.split(), unescape=False)


@functools.cache
def _detokenizer(lang: str) -> sacremoses.MosesDetokenizer:
    return _sacremoses().MosesDetokenizer(lang=lang)


@functools.cache
def _non_printing() -> Any:
    r"""Unicode's "Other" category (`\p{C}`: Cc Cf Cs Co Cn), which `re` cannot name; `regex` (a
    sacremoses dependency) is imported on first use, like sacremoses."""
    import regex

    return regex.compile(r"\p{C}")


@functools.cache
def _not_alnum() -> Any:
    r"""tokenizer.perl's first split, `s/([^\p{IsAlnum}\s\.\'\`\,\-])/ $1 /g`, with perl's class
    (Alphabetic or Nd). sacremoses' table adds the Indic viramas and nuktas, which perl splits
    off (hi `वेल्श` → `वेल ् श`), and misses ~120k alphanumerics (CJK and Hangul outside zh/ja/ko,
    letters added in newer Unicode versions), which it splits off one by one."""
    import regex

    return regex.compile(r"([^\p{Alnum}\s\.'\`\,\-])")


def _sacremoses() -> Any:
    """sacremoses, imported on first use: it takes ~0.2 s to import, and `tokenizer` imports this
    module in every run, most of which never tokenize with Moses."""
    import sacremoses

    return sacremoses


def truncate(words: Sequence[str], max_vocab: int) -> list[str]:
    """XLM's `Dictionary.max_vocab`: keep ids < max_vocab (the others become <unk>)."""
    if max_vocab <= N_SPECIAL:
        raise ValueError(f"max_vocab must be > {N_SPECIAL}, got {max_vocab}")
    return list(words[:max_vocab])


def looks_lowercased(words: Sequence[str]) -> bool:
    """Whether a dictionary was built from lowercased text (XLM's XNLI-15 / English models):
    hardly any word has an uppercase letter, where a cased one has thousands."""
    ordinary = words[N_SPECIAL:]
    upper = sum(any(c.isupper() for c in w) for w in ordinary)
    return upper <= 0.005 * len(ordinary)
