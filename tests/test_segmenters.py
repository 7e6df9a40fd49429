"""zh and th go through their own segmenter, as in XLM's `tools/tokenize.sh`, not through Moses.

th: XLM's `segment_th.py` (`' '.join(word_tokenize(line))`, PyThaiNLP) then
`remove-non-printing-char.perl`; zh: jieba in place of XLM's Stanford segmenter. A missing
segmenter is an error naming its package (no silent fallback to Moses).
"""

import logging
import sys

import pytest

from xlm_jax.text.xlm_bpe import MosesPipeline, XLMBPETokenizer, read_codes, read_vocab


def words(text: str, lang: str, lowercase: bool = False) -> list[str]:
    return MosesPipeline(lang, lowercase=lowercase, romanian=False)(text)


def xlm_th(line: str) -> list[str]:
    """XLM's th branch, written out: segment_th.py, then perl's `s/\\p{C}/ /g`, then the words."""
    import regex
    from pythainlp.tokenize import word_tokenize

    return regex.sub(r"\p{C}", " ", " ".join(word_tokenize(line))).split()


def test_thai_is_segmented_as_xlm_did():
    # A sentence without spaces becomes words (Moses would keep it as one token).
    assert words("ผมรักภาษาไทยมาก", "th") == ["ผม", "รัก", "ภาษาไทย", "มาก"]
    # PyThaiNLP keeps the zero-width space as a token; perl's \p{C} rule turns it into a space.
    for line in ("ผมรัก\u200bภาษาไทย", "วันนี้อากาศดี มาก 19:32น (ok)."):
        assert words(line, "th") == xlm_th(line), line
    assert words("ผมรัก\u200bภาษาไทย", "th") == ["ผม", "รัก", "ภาษาไทย"]
    # XNLI-15's lowercase_and_remove_accent drops Thai vowel and tone marks (Mn), as XLM's did.
    assert words("ผมรักภาษาไทยมาก", "th", lowercase=True) == ["ผม", "รก", "ภาษาไทย", "มาก"]


def test_chinese_is_segmented_by_jieba_without_moses():
    # The full-width 。 stays: XLM ran no Moses normalisation on zh (Moses would make it ".").
    assert words("我来到北京清华大学。", "zh") == ["我", "来到", "北京", "清华大学", "。"]
    assert words("AM 的头衔 Hello", "zh", lowercase=True) == ["am", "的", "头衔", "hello"]
    # Through the tokenizer, by the input's language.
    tok = XLMBPETokenizer(
        read_vocab("来@@ 1\n到 1\n我 1\n"), read_codes("a b 1\n"), lowercase=False
    )
    assert tok.words_of("我来到", "zh") == ["我", "来@@", "到"]
    assert tok.words_of("我来到", "en") == ["我@@", "来@@", "到"]  # Moses: one word


@pytest.mark.parametrize(
    ("lang", "module", "package"),
    [("zh", "jieba", "jieba"), ("th", "pythainlp.tokenize", "pythainlp")],
)
def test_a_missing_segmenter_is_an_error_naming_it(monkeypatch, lang, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(
        ImportError, match=f"needs the '{package}' package.*pip install {package}=="
    ):
        MosesPipeline(lang, lowercase=False, romanian=False)


def test_japanese_still_goes_through_moses_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="xlm_jax.text.xlm_bpe"):
        assert words("東京に行く", "ja") == ["東京に行く"]
    assert "KyTea" in caplog.text
