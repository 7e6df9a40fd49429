"""How closely `xlm_bpe.MosesPipeline` reproduces XLM's `tools/tokenize.sh`, measured against the
real tools on the first N lines of a parallel set (docs/interop.md has the table):

  python -m xlm_jax.tools.bench_tokenize --ref_dir=/tmp/moses \\
      --data=../shared/data/parallel/ntrex --n=300 --out=/tmp/bench_tokenize.json

References, per language (XLM's `tokenize.sh` branches):
  * Moses languages: `replace-unicode-punctuation.perl | normalize-punctuation.perl -l L |
    remove-non-printing-char.perl | tokenizer.perl -no-escape -l L`, run with the system perl
    from ``--ref_dir`` (a mosesdecoder checkout: `scripts/tokenizer/*.perl` and
    `scripts/share/nonbreaking_prefixes/`, byte for byte: normalize-punctuation.perl's
    no-break spaces matter); nothing of it is shipped here.
  * th: `segment_th.py` (PyThaiNLP's `word_tokenize(line)`, joined by spaces) run by
    ``--th_python`` (another PyThaiNLP version, e.g. XLM's of 2019, in its own venv; default this
    interpreter), then `remove-non-printing-char.perl`.
  * zh: XLM's Stanford segmenter (Java + model) cannot run here; ``--zh_proxies`` names other
    segmenters (`thulac`, `snownlp`: importable packages) compared with jieba instead, and with
    each other, as a scale of how much segmenters of different standards agree: a proxy only.

Metrics: the share of sentences whose words are identical, and word precision / recall / F1 of
ours against the reference, from their longest common subsequence (summed over sentences). The
`sacremoses` column is the identical share of plain sacremoses (HF `XLMTokenizer`'s steps), to show
what the perl rules of `xlm_bpe` change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags

from xlm_jax.core.files import write_atomic
from xlm_jax.text.xlm_bpe import MosesPipeline

Words = list[str]

# XLM's tools/segment_th.py, as a -c program for --th_python.
_SEGMENT_TH = (
    "import sys\n"
    "from pythainlp.tokenize import word_tokenize\n"
    "for line in sys.stdin.readlines():\n"
    "    line = line.rstrip('\\n')\n"
    "    print(' '.join(word_tokenize(line)))\n"
)
_PERL = "scripts/tokenizer"


def read_lines(path: Path, n: int) -> list[str]:
    """The first ``n`` non-empty lines of ``path`` (without their newline)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                out.append(line)
            if len(out) == n:
                break
    return out


def run(
    cmd: str, lines: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> list[Words]:
    """Words of each output line of a shell pipeline fed ``lines``."""
    text = "".join(line + "\n" for line in lines)
    res = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        input=text.encode("utf-8"),
        capture_output=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=True,
    )
    out = res.stdout.decode("utf-8").split("\n")[: len(lines)]
    if len(out) != len(lines):
        raise RuntimeError(f"{cmd!r}: {len(out)} lines out for {len(lines)} in")
    return [line.split() for line in out]


def moses_reference(ref_dir: Path, lang: str, lines: Sequence[str]) -> list[Words]:
    """XLM's `tokenize.sh` branch for Moses languages, run with perl."""
    cmd = (
        f"perl replace-unicode-punctuation.perl | perl normalize-punctuation.perl -l {lang} "
        f"| perl remove-non-printing-char.perl | perl tokenizer.perl -no-escape -q -l {lang}"
    )
    return run(cmd, lines, cwd=ref_dir / _PERL)


def th_reference(ref_dir: Path, python: str, lines: Sequence[str]) -> list[Words]:
    """XLM's `tokenize.sh` branch for th: segment_th.py | remove-non-printing-char.perl."""
    cmd = f'{python} -c "$SEG" | perl {ref_dir / _PERL}/remove-non-printing-char.perl'
    return run(cmd, lines, env={"SEG": _SEGMENT_TH})


def package_version(python: str, package: str) -> str:
    """The version of ``package`` that ``python`` imports."""
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def sacremoses_alone(lang: str) -> Callable[[str], Words]:
    """Plain sacremoses with HF `XLMTokenizer`'s steps (no perl-rule fixes)."""
    import sacremoses

    norm = sacremoses.MosesPunctNormalizer(
        lang=lang, pre_replace_unicode_punct=True, post_remove_control_chars=True
    )
    tok = sacremoses.MosesTokenizer(lang=lang)
    return lambda text: tok.tokenize(norm.normalize(text), escape=False)


def zh_proxy(name: str) -> Callable[[str], Words]:
    """Another Chinese segmenter (imported on demand; not a requirement of xlm_jax)."""
    if name == "thulac":
        import thulac

        seg = thulac.thulac(seg_only=True)
        return lambda text: seg.cut(text, text=True).split()
    if name == "snownlp":
        from snownlp import SnowNLP

        return lambda text: " ".join(SnowNLP(text).words).split()
    raise ValueError(f"unknown zh proxy {name!r} (thulac, snownlp)")


def lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def agreement(ours: Sequence[Words], ref: Sequence[Words]) -> dict[str, float]:
    """Identical share and LCS word precision / recall / F1 of ``ours`` against ``ref``."""
    common = sum(lcs(a, b) for a, b in zip(ours, ref, strict=True))
    n_ours, n_ref = sum(map(len, ours)), sum(map(len, ref))
    p, r = common / max(n_ours, 1), common / max(n_ref, 1)
    return {
        "sentences": len(ref),
        "identical": sum(a == b for a, b in zip(ours, ref, strict=True)) / max(len(ref), 1),
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / max(p + r, 1e-12),
        "words_ours": n_ours,
        "words_ref": n_ref,
    }


def differences(
    lines: Sequence[str], ours: Sequence[Words], ref: Sequence[Words], k: int
) -> list[dict[str, object]]:
    """The first ``k`` sentences where ours and the reference differ, for the report."""
    out = []
    for line, a, b in zip(lines, ours, ref, strict=True):
        if a != b and len(out) < k:
            only_a = [w for w in a if w not in b]
            only_b = [w for w in b if w not in a]
            out.append({"line": line, "ours_only": only_a[:8], "ref_only": only_b[:8]})
    return out


def bench_lang(lang: str, lines: list[str], flags_: dict) -> list[dict]:
    """The rows of one language: ours vs its reference (or the zh proxies)."""
    pipeline = MosesPipeline(lang, lowercase=False, romanian=False)
    ours = [pipeline(t) for t in lines]
    ref_dir, show = Path(flags_["ref_dir"]), flags_["show"]
    if lang == "zh":
        return zh_rows(lines, ours, flags_["zh_proxies"], show)
    if lang == "th":
        ref = th_reference(ref_dir, flags_["th_python"], lines)
        version = package_version(flags_["th_python"], "pythainlp")
        row = {"lang": lang, "reference": f"segment_th.py, pythainlp {version}"}
    else:
        ref = moses_reference(ref_dir, lang, lines)
        alone = sacremoses_alone(lang)
        row = {"lang": lang, "reference": "Moses perl"}
        row["sacremoses_identical"] = agreement([alone(t) for t in lines], ref)["identical"]
    row.update(agreement(ours, ref), differences=differences(lines, ours, ref, show))
    return [row]


def zh_rows(
    lines: Sequence[str], ours: Sequence[Words], proxies: Sequence[str], show: int
) -> list[dict]:
    """jieba against each proxy segmenter, then the proxies against each other."""
    segs = {}
    for name in proxies:
        try:
            segment = zh_proxy(name)
        except ImportError as e:  # optional: pip install thulac snownlp (not xlm_jax requirements)
            print(f"zh proxy {name} skipped: {e}", file=sys.stderr)
            continue
        segs[name] = [segment(t) for t in lines]
    rows = []
    for name, ref in segs.items():
        row = {"lang": "zh", "reference": f"{name} (proxy)", **agreement(ours, ref)}
        rows.append(row | {"differences": differences(lines, ours, ref, show)})
    names = list(segs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            row = {"lang": "zh", "reference": f"{a} vs {b} (no jieba)"}
            rows.append(row | agreement(segs[a], segs[b]))
    return rows


def markdown(rows: Sequence[dict]) -> str:
    head = "| lang | reference | sentences | identical | word F1 | sacremoses alone: identical |"
    out = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        alone = r.get("sacremoses_identical")
        alone_s = "" if alone is None else f"{alone:.1%}"
        out.append(
            f"| {r['lang']} | {r['reference']} | {r['sentences']} | {r['identical']:.1%} "
            f"| {r['f1']:.4f} | {alone_s} |"
        )
    return "\n".join(out)


_REF_DIR = flags.DEFINE_string("ref_dir", None, "A mosesdecoder tree (scripts/tokenizer/*.perl).")
_DATA = flags.DEFINE_string("data", "../shared/data/parallel/ntrex", "Folder of the text files.")
_PATTERN = flags.DEFINE_string("pattern", "ntrex.{lang}", "File name in --data, per language.")
_N = flags.DEFINE_integer("n", 300, "Sentences per language (the first non-empty lines).")
_LANGS = flags.DEFINE_list("langs", "en,fr,de,ru,zh,th,ar", "Languages to measure.")
_TH_PYTHON = flags.DEFINE_string("th_python", sys.executable, "Python that runs segment_th.py.")
_ZH_PROXIES = flags.DEFINE_list("zh_proxies", "thulac,snownlp", "Segmenters compared with jieba.")
_SHOW = flags.DEFINE_integer("show", 3, "Differing sentences kept per language in --out.")
_OUT = flags.DEFINE_string("out", "", "Write the rows (with differing sentences) as JSON here.")


def main(argv: list[str]) -> None:
    del argv
    opts = {
        "ref_dir": _REF_DIR.value,
        "th_python": _TH_PYTHON.value,
        "zh_proxies": _ZH_PROXIES.value,
        "show": _SHOW.value,
    }
    rows = []
    for lang in _LANGS.value:
        lines = read_lines(Path(_DATA.value) / _PATTERN.value.format(lang=lang), _N.value)
        rows.extend(bench_lang(lang, lines, opts))
    print(markdown(rows))
    if _OUT.value:
        write_atomic(
            Path(_OUT.value), (json.dumps(rows, indent=1, ensure_ascii=False) + "\n").encode()
        )


if __name__ == "__main__":
    flags.mark_flag_as_required("ref_dir")
    app.run(main)
