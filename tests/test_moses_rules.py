"""XLM's Moses preprocessing rule for rule where sacremoses departs from the perl scripts.

XLM's `tools/tokenize.sh` runs `replace-unicode-punctuation.perl | normalize-punctuation.perl -l
LANG | remove-non-printing-char.perl | tokenizer.perl -no-escape -l LANG`; the expected tokens
below are that pipeline's output (perl 5.36, Unicode 14). Line numbers: moses-smt/mosesdecoder,
scripts/tokenizer/, at commits 0036c6c (tokenizer.perl), 0d72cdd (remove-non-printing-char.perl)
and 30e31d4 (normalize-punctuation.perl); `python -m xlm_jax.tools.bench_tokenize` compares the
whole pipeline with them on real text.
Also: the files the tokenizer exports get the usual mode, not `mkstemp`'s 0o600.
"""

import contextlib
import os
import stat
from collections.abc import Iterator

import pytest

from xlm_jax.core.files import write_atomic
from xlm_jax.text.xlm_bpe import MosesPipeline, XLMBPETokenizer, read_codes, read_vocab


def moses(text: str, lang: str) -> list[str]:
    """Moses words (steps 1-3 of xlm_bpe's pipeline), cased, before BPE."""
    return MosesPipeline(lang, lowercase=False, romanian=False)(text)


# --- tokenizer.perl: the line's last word always loses its final period -------------------------
# `sub tokenize`, word loop (l. ~362): `if ($i == scalar(@words)-1) { $word = $pre." ."; }`
# ("split last words independently as they are unlikely to be non-breaking prefixes"), tested
# before the non-breaking prefixes that sacremoses also applies to the last word.


def test_final_period_is_split_after_an_abbreviation_or_a_number():
    # perl -l en: "-5°C." → "-5 ° C ." (sacremoses kept "C.": "C" is an en non-breaking prefix)
    assert moses("-5°C.", "en") == ["-5", "°", "C", "."]
    # perl -l de: "2:2." → "2 : 2 ." (sacremoses kept "2.": de lists numbers as prefixes)
    assert moses("2:2.", "de") == ["2", ":", "2", "."]
    # Not at the end of the line the prefixes still hold: perl "Temp -5 ° C. Then".
    assert moses("Temp -5°C. Then", "en") == ["Temp", "-5", "°", "C.", "Then"]
    # A final "..." is a multi-dot token (perl's DOTMULTI), not a word ending in a period.
    assert moses("Wait...", "en") == ["Wait", "..."]


# --- remove-non-printing-char.perl: \p{C} becomes a space -----------------------------------------
# l. 15: `$line =~ s/\p{C}/ /g;` (sacremoses' remove_control_chars deletes them: "Tabsand").


def test_non_printing_characters_become_spaces():
    # perl: "Tabs\tand" → "Tabs and"; "zero\u200bwidth" (U+200B, a format char Cf) → "zero width"
    assert moses("Tabs\tand", "en") == ["Tabs", "and"]
    assert moses("zero\u200bwidth", "fr") == ["zero", "width"]
    assert moses("soft\u00adhyphen", "de") == ["soft", "hyphen"]  # U+00AD is Cf too


# --- normalize-punctuation.perl: `."` → `".` also at the end of the line --------------------------
# l. 73-75 (the `else` branch: every language but en and cs/cz):
# `s/(\.+)\"(\s*[^<])/\"$1$2/g;` — perl reads the line with its "\n", which `[^<]` matches.


def test_period_quote_moves_at_the_end_of_a_line_except_in_english():
    # perl -l de / -l fr: 'Er sagte "Ja."' → 'Er sagte "Ja".' → tokens 'Er sagte " Ja " .'
    for lang in ("de", "fr", "ro"):
        assert moses('Er sagte "Ja."', lang) == ["Er", "sagte", '"', "Ja", '"', "."], lang
    # perl -l en (l. 66-67 move `"` after `,.` only) and -l cs (no rule): 'Er sagte " Ja . "'
    for lang in ("en", "cs"):
        assert moses('Er sagte "Ja."', lang) == ["Er", "sagte", '"', "Ja", ".", '"'], lang
    # l. 74 `s/,\"/\",/g`, and the rule inside the line (both as before).
    assert moses('A, "b," c."d', "fr") == ["A", ",", '"', "b", '"', ",", "c", '"', ".d"]


# --- normalize-punctuation.perl: a lone ‘ or ‚ becomes `"` ---------------------------------------
# l. 39-42: `s/([a-z])‘([a-z])/$1\'$2/gi;` ... `s/‘/\"/g; s/‚/\"/g;` (sacremoses: `'`, which
# tokenizer.perl would then split as an apostrophe: de `' Twp '`).


def test_lone_low_and_left_single_quotes_become_double_quotes():
    # perl -l de: 'der Name „mit ‚Twp‘ und ‚Pwp‘ reimt“.' (NTREX de, line 5)
    assert moses("der Name „mit ‚Twp‘ und ‚Pwp‘ reimt“.", "de") == [
        *("der", "Name", '"', "mit", '"', "Twp", '"', "und", '"', "Pwp", '"', "reimt", '"', "."),
    ]
    # perl -l en: "It 's a \" test \" of \" quotes \" here" (‘ between letters is an apostrophe)
    assert moses("It‘s a ‚test‘ of ‘quotes‘ here", "en") == [
        *("It", "'s", "a", '"', "test", '"', "of", '"', "quotes", '"', "here"),
    ]


# --- normalize-punctuation.perl: French quotes with no-break spaces -------------------------------
# l. 48, 51: `s/NBSP«NBSP/ \"/g; s/NBSP»NBSP/\" /g;` keep a space (sacremoses without perl_parity
# drops it, and the continental `."` rule then glues the period to the next word: `.Puis`).


def test_french_quotes_with_no_break_spaces_keep_a_space():
    # perl -l fr: 'Il a dit " oui " . Puis il est parti .'
    text = "Il a dit\u00a0«\u00a0oui.\u00a0»\u00a0Puis il est parti."
    assert moses(text, "fr") == [
        *("Il", "a", "dit", '"', "oui", '"', ".", "Puis", "il", "est", "parti", "."),
    ]


# --- tokenizer.perl: what is not `\p{IsAlnum}` is split off, with perl's Unicode classes ----------
# l. 282 `s/([^\p{IsAlnum}\s\.\'\`\,\-])/ $1 /g`: sacremoses' table adds the Indic viramas and
# nuktas (not alphabetic for perl) and lacks Hangul, most CJK, ... (alphabetic for perl).


def test_alphanumerics_are_perls():
    # perl -l hi: 'वेल ् श के AM' (NTREX hi, line 1: the virama U+094D is split off)
    assert moses("वेल्श के AM", "hi") == ["वेल", "\u094d", "श", "के", "AM"]
    # perl -l en: 'Samsung 삼성 phones .' (sacremoses: '삼 성')
    assert moses("Samsung 삼성 phones.", "en") == ["Samsung", "삼성", "phones", "."]


# --- end to end: ids ------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = read_vocab(
    "".join(f"{w} 1\n" for w in [*(c + "@@" for c in LETTERS), *LETTERS, "and", "."])
)


def test_ids_follow_the_perl_rules():
    tok = XLMBPETokenizer(WORDS, read_codes("a n 9\nan d</w> 8\n"), lowercase=True)
    assert WORDS[-2:] == ["and", "."]
    # "Tabs\tand": two words, "tabs" and "and" (sacremoses: one, "t@@ a@@ b@@ s@@ and").
    assert tok.words_of("Tabs\tand") == ["t@@", "a@@", "b@@", "s", "and"]
    assert tok.encode("-5°C.", lang="en").tolist()[-2:] == [WORDS.index("c"), WORDS.index(".")]


# --- file modes ----------------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_exported_files_get_the_usual_mode(tmp_path, mask):
    """0o666 less the umask, as `open` gives: 0o644 with the common 022 (mkstemp gave 0o600)."""
    tok = XLMBPETokenizer(WORDS, read_codes("a n 9\n"), lowercase=True)
    with umask(mask):
        tok.save_hf(tmp_path)
        tok.save(tmp_path / "tokenizer.model")
        write_atomic(tmp_path / "sub" / "x.bin", b"x")
    for name in ("vocab.json", "merges.txt", "tokenizer.model", "sub/x.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt",
        "sub",
        "tokenizer.model",
        "vocab.json",
    ]  # no temporary file left
