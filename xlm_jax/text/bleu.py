"""BLEU for the translation mode: sacreBLEU, and multi-bleu.perl as the XLM paper reports it.

Three numbers, because they are not interchangeable:
- `sacre_bleu`: sacreBLEU on detokenized text, the reproducible number (with its signature).
- `multi_bleu`: Moses' multi-bleu.perl on text that is already tokenized (no smoothing).
- `tokenized_bleu`: 13a-tokenize both sides, then `multi_bleu` -- comparable to the papers.

All take one reference per hypothesis and check the inputs up front: a silently misaligned or
truncated corpus still yields a plausible-looking BLEU.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

MAX_ORDER = 4
# multi-bleu.perl reads bytes, so its `split` breaks on ASCII whitespace only; str.split() would
# also break on e.g. U+00A0 (no-break space), which French text produced by Moses contains.
_PERL_TOKEN = re.compile(r"[^ \t\n\r\f\v]+")


@dataclass(frozen=True)
class BleuScore:
    """Corpus BLEU; `score` and `precisions` are percentages (x100), as both tools print them."""

    score: float
    signature: str
    precisions: tuple[float, ...]
    brevity_penalty: float
    hyp_len: int
    ref_len: int

    def __str__(self) -> str:
        return f"BLEU {self.score:.2f} ({self.signature})"


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but {len(references)} references "
            "(one reference per hypothesis)"
        )
    if not hypotheses:
        raise ValueError("no sentences to score")
    # Hypotheses and references are written/read one sentence per line: an embedded line break
    # shifts every following sentence against its reference.
    for side, texts in (("hypothesis", hypotheses), ("reference", references)):
        for i, text in enumerate(texts):
            if "\n" in text or "\r" in text:
                raise ValueError(f"{side} {i} contains a line break: {text!r}")


def sacre_bleu(
    hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a"
) -> BleuScore:
    """sacreBLEU corpus BLEU on detokenized text (default 13a tokenization, exp smoothing)."""
    _check(hypotheses, references)
    bleu = BLEU(tokenize=tokenize)
    s = bleu.corpus_score(list(hypotheses), [list(references)])
    return BleuScore(
        score=s.score,
        signature=str(bleu.get_signature()),
        precisions=tuple(s.precisions),
        brevity_penalty=s.bp,
        hyp_len=s.sys_len,
        ref_len=s.ref_len,
    )


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def multi_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BleuScore:
    """Moses' multi-bleu.perl (case-sensitive, one reference) on already-tokenized text.

    As the script: tokens are whitespace-separated; n-gram matches (1..4) are clipped by the
    reference counts per sentence and summed over the corpus; no smoothing, so BLEU is 0 as soon
    as one order has no match; brevity penalty exp(1 - ref_len/hyp_len) if hyp_len < ref_len.
    """
    _check(hypotheses, references)
    correct = [0] * MAX_ORDER
    total = [0] * MAX_ORDER
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = _PERL_TOKEN.findall(hyp), _PERL_TOKEN.findall(ref)
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, MAX_ORDER + 1):
            h_counts, r_counts = _ngrams(h, n), _ngrams(r, n)
            total[n - 1] += sum(h_counts.values())
            correct[n - 1] += sum(min(c, r_counts[g]) for g, c in h_counts.items())
    precisions = tuple(c / t if t else 0.0 for c, t in zip(correct, total, strict=True))
    # The script prints BLEU = 0 for an empty reference side, and divides by zero (dies) for an
    # empty hypothesis side; both are 0 here.
    if ref_len == 0 or hyp_len == 0:
        bp = 0.0
    else:
        bp = math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    # my_log(0) = -9999999999 in the script, which makes exp(...) exactly 0.0.
    if bp == 0.0 or min(precisions) == 0.0:
        bleu = 0.0
    else:
        bleu = bp * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    return BleuScore(
        score=100 * bleu,
        signature="multi-bleu.perl",
        precisions=tuple(100 * p for p in precisions),
        brevity_penalty=bp,
        hyp_len=hyp_len,
        ref_len=ref_len,
    )


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> BleuScore:
    """BLEU "as in the papers": 13a-tokenize detokenized text on both sides, then multi-bleu.perl.

    XLM reports multi-bleu.perl on Moses-tokenized text. 13a is sacreBLEU's Moses-compatible
    mteval tokenizer (close to, not identical to, Moses' tokenizer.perl: e.g. it neither splits
    "it's" nor escapes quotes), so this is the comparable number without a Perl dependency.
    13a is language independent; `lang` is only recorded in the signature. For unsegmented
    scripts (zh, ja, th) whitespace n-grams are not meaningful: use `sacre_bleu` with a suitable
    `tokenize` instead.
    """
    _check(hypotheses, references)
    tok = Tokenizer13a()
    score = multi_bleu([tok(h) for h in hypotheses], [tok(r) for r in references])
    return replace(score, signature=f"multi-bleu.perl|tok:13a|lang:{lang}")
