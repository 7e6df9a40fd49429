"""BLEU: sacreBLEU wrapper, the multi-bleu.perl re-implementation and the tokenized variant."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from xlm_jax.text.bleu import BleuScore, multi_bleu, sacre_bleu, tokenized_bleu

# Detokenized pairs of mixed quality: exact, near, reordered, short, unrelated, empty.
HYPS = [
    "The cat sat on the mat.",
    "There is a book on the table.",
    "He said: \"I'll be there at 5 o'clock.\"",
    "The weather is nice today, isn't it?",
    "We went to Paris last summer with our friends.",
    "Completely unrelated output here.",
    "The committee approved the new budget on Monday.",
    "I don't know.",
    "",
    "She reads books, newspapers and magazines every day.",
]
REFS = [
    "The cat sat on the mat.",
    "A book is on the table.",
    'He said: "I will be there at 5 o\'clock."',
    "The weather is lovely today, isn't it?",
    "Last summer we went to Paris with friends.",
    "The train leaves from platform nine.",
    "On Monday, the committee approved the new budget.",
    "I do not know the answer.",
    "Nothing.",
    "She reads books, newspapers and magazines every single day.",
]


def test_sacre_bleu_matches_sacrebleu():
    got = sacre_bleu(HYPS, REFS)
    want = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert got.score == pytest.approx(want.score, abs=1e-9)
    assert 0 < got.score < 100
    assert got.precisions == pytest.approx(want.precisions, abs=1e-9)
    assert (got.hyp_len, got.ref_len, got.brevity_penalty) == (want.sys_len, want.ref_len, want.bp)
    assert "tok:13a" in got.signature and "nrefs:1" in got.signature
    assert str(got) == f"BLEU {want.score:.2f} ({got.signature})"
    assert "tok:intl" in sacre_bleu(HYPS, REFS, tokenize="intl").signature


def test_multi_bleu_hand_computed():
    hyps = ["the cat sat on the mat", "it is a big dog", "the the the"]
    refs = ["the cat is on the mat", "it is a big big dog", "the cat sat"]
    # Matched / total n-grams (hypothesis counts clipped by the reference counts):
    #   sent 1 (hyp 6, ref 6): 1g the x2, cat, on, mat = 5/6; 2g the cat, on the, the mat = 3/5;
    #                          3g on the mat = 1/4; 4g none = 0/3
    #   sent 2 (hyp 5, ref 6): 1g 5/5; 2g 4/4 (it is, is a, a big, big dog);
    #                          3g it is a, is a big = 2/3; 4g it is a big = 1/2
    #   sent 3 (hyp 3, ref 3): 1g "the" x3 clipped to 1 = 1/3; 2g the the x2 = 0/2; 3g 0/1; no 4g
    # Corpus: 11/14, 7/11, 3/8, 1/5; hyp_len 14 < ref_len 15 -> BP = exp(1 - 15/14).
    p = [11 / 14, 7 / 11, 3 / 8, 1 / 5]
    bp = math.exp(1 - 15 / 14)
    want = 100 * bp * math.exp(sum(math.log(x) for x in p) / 4)
    got = multi_bleu(hyps, refs)
    assert got.score == pytest.approx(want, abs=1e-6)
    assert got.precisions == pytest.approx([100 * x for x in p], abs=1e-9)
    assert (got.hyp_len, got.ref_len) == (14, 15)
    assert got.brevity_penalty == pytest.approx(bp, abs=1e-12)
    assert got.signature == "multi-bleu.perl"


def _unsmoothed_sacrebleu(hyps: list[str], refs: list[str]) -> float:
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score(hyps, [refs]).score


def test_multi_bleu_matches_unsmoothed_sacrebleu_on_tokenized_text():
    tok = Tokenizer13a()
    hyps, refs = [tok(h) for h in HYPS], [tok(r) for r in REFS]
    got = multi_bleu(hyps, refs)
    assert min(got.precisions) > 0
    assert got.score == pytest.approx(_unsmoothed_sacrebleu(hyps, refs), abs=1e-6)


def test_no_four_gram_match_gives_zero():
    hyps = ["a b c x d e f", "g h"]
    refs = ["a b c y d e f", "g h i"]  # 1-3 gram matches, but no 4-gram in common
    got = multi_bleu(hyps, refs)
    assert min(got.precisions[:3]) > 0 and got.precisions[3] == 0
    assert got.score == 0.0
    assert _unsmoothed_sacrebleu(hyps, refs) == 0.0
    assert sacrebleu.corpus_bleu(hyps, [refs]).score > 0  # sacreBLEU's default smoothing


def test_case_sensitive_and_whitespace_only_tokenization():
    # Case matters; "mat." is one token (no tokenization); runs of spaces/tabs are one separator.
    got = multi_bleu(["The  cat sat on\tthe mat."], ["the cat sat on the mat ."])
    assert (got.hyp_len, got.ref_len) == (6, 7)
    assert got.precisions[0] == pytest.approx(100 * 4 / 6)
    # multi-bleu.perl splits bytes on ASCII whitespace: a no-break space is inside a token.
    assert multi_bleu(["12\u00a0000 euros"], ["12\u00a0000 euros"]).hyp_len == 2


def test_tokenized_bleu_is_13a_then_multi_bleu():
    got = tokenized_bleu(HYPS, REFS, lang="en")
    tok = Tokenizer13a()
    want = multi_bleu([tok(h) for h in HYPS], [tok(r) for r in REFS])
    assert got.score == want.score and got.precisions == want.precisions
    assert got.signature == "multi-bleu.perl|tok:13a|lang:en"
    # With every precision > 0 sacreBLEU's smoothing is inactive: the two BLEUs coincide.
    assert got.score == pytest.approx(sacre_bleu(HYPS, REFS).score, abs=1e-6)
    # Detokenized text differs only by tokenization: "mat." vs "mat ." still match in full.
    got = tokenized_bleu(["The cat sat on the mat."], ["The cat sat on the mat ."], "en")
    assert got.score == pytest.approx(100.0)


@pytest.mark.parametrize("fn", [sacre_bleu, multi_bleu, lambda h, r: tokenized_bleu(h, r, "en")])
def test_perfect_translation_is_100(fn):
    got: BleuScore = fn(HYPS[:8], HYPS[:8])
    assert got.score == pytest.approx(100.0, abs=1e-9)
    assert got.brevity_penalty == 1.0


def test_brevity_penalty():
    # Hypothesis is an exact prefix: every precision is 1, only the length is penalised.
    refs = ["one two three four five six seven eight"]
    got = multi_bleu(["one two three four five six"], refs)
    assert got.precisions == pytest.approx([100.0] * 4)
    assert got.brevity_penalty == pytest.approx(math.exp(1 - 8 / 6), abs=1e-12)
    assert got.score == pytest.approx(100 * math.exp(1 - 8 / 6), abs=1e-9)
    # Longer hypotheses are not penalised (precision handles them); empty ones score 0.
    assert multi_bleu([refs[0] + " nine"], refs).brevity_penalty == 1.0
    assert multi_bleu([""], refs).score == 0.0


@pytest.mark.parametrize("fn", [sacre_bleu, multi_bleu, lambda h, r: tokenized_bleu(h, r, "en")])
def test_input_errors(fn):
    with pytest.raises(ValueError, match=r"3 hypotheses but 2 references"):
        fn(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="no sentences"):
        fn([], [])
    with pytest.raises(ValueError, match=r"reference 1 contains a line break"):
        fn(["a", "b"], ["a", "b\nc"])
    with pytest.raises(ValueError, match=r"hypothesis 0 contains a line break"):
        fn(["a\r"], ["a"])
