"""The language codes a config may use without declaring them: a typo must fail early.

Without this list ``langs = "en,fx"`` (or ``"en,EN"``) is a valid config: a language-embedding row
for a language that does not exist, found out (if ever) hours later. So every configured code is
checked against it before anything is read (``data/corpus.py``, ``check_langs``); a language it
does not have is accepted explicitly, with ``--config.new_langs=xx,yy``.

The list is the union of:

* ISO 639-1, every two-letter code (184, ``bh`` included), as in Debian's ``iso-codes``;
* the 100 languages of XLM-100 (facebookresearch/XLM README, "The 17 and 100 Languages"), whose
  Wikipedia codes add ``als ang arz ast bar ceb ckb gan nds scn sco sh simple war wuu
  zh_classical zh_min_nan zh_yue`` (hence ``_`` in a code);
* the XNLI-15 languages (all in ISO 639-1, listed by ``data/presets.py``).

Case matters: ``EN`` is not ``en`` (the code names data files and checkpoint languages).
"""

from __future__ import annotations

# fmt: off
KNOWN: frozenset[str] = frozenset({
    "aa", "ab", "ae", "af", "ak", "als", "am", "an", "ang", "ar", "arz", "as", "ast", "av", "ay",
    "az", "ba", "bar", "be", "bg", "bh", "bi", "bm", "bn", "bo", "br", "bs", "ca", "ce", "ceb",
    "ch", "ckb", "co", "cr", "cs", "cu", "cv", "cy", "da", "de", "dv", "dz", "ee", "el", "en",
    "eo", "es", "et", "eu", "fa", "ff", "fi", "fj", "fo", "fr", "fy", "ga", "gan", "gd", "gl",
    "gn", "gu", "gv", "ha", "he", "hi", "ho", "hr", "ht", "hu", "hy", "hz", "ia", "id", "ie", "ig",
    "ii", "ik", "io", "is", "it", "iu", "ja", "jv", "ka", "kg", "ki", "kj", "kk", "kl", "km", "kn",
    "ko", "kr", "ks", "ku", "kv", "kw", "ky", "la", "lb", "lg", "li", "ln", "lo", "lt", "lu", "lv",
    "mg", "mh", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "na", "nb", "nd", "nds", "ne",
    "ng", "nl", "nn", "no", "nr", "nv", "ny", "oc", "oj", "om", "or", "os", "pa", "pi", "pl", "ps",
    "pt", "qu", "rm", "rn", "ro", "ru", "rw", "sa", "sc", "scn", "sco", "sd", "se", "sg", "sh",
    "si", "simple", "sk", "sl", "sm", "sn", "so", "sq", "sr", "ss", "st", "su", "sv", "sw", "ta",
    "te", "tg", "th", "ti", "tk", "tl", "tn", "to", "tr", "ts", "tt", "tw", "ty", "ug", "uk", "ur",
    "uz", "ve", "vi", "vo", "wa", "war", "wo", "wuu", "xh", "yi", "yo", "za", "zh", "zh_classical",
    "zh_min_nan", "zh_yue", "zu",
})
# fmt: on
