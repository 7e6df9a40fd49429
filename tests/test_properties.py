"""Property-based tests of the host data pipeline (hypothesis): any input either reads back as
valid data or fails with a clean ``DataError`` / ``ValueError`` that says where; never another
exception, a hang or a silent drop.

Each property compares the reader with a small independent oracle written here from the
documented contract (``xlm_jax/data/sources.py``: lines split on ``\\n`` only, one trailing
``\\r`` stripped, a leading BOM dropped, the whole file validated before a range selects).
Settings are deterministic (``derandomize=True``, no example database) so CI sees the same cases.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xlm_jax.data import batches, corpus, nli, sentences, sources
from xlm_jax.data.sources import DataError
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_CHARS = 40  # small, so "too long" lines are cheap to generate
BOM = b"\xef\xbb\xbf"


@contextmanager
def workdir() -> Iterator[Path]:
    """A fresh directory per example (pytest's tmp_path is per test, not per example)."""
    with tempfile.TemporaryDirectory(prefix="xlm_props_") as d:
        yield Path(d)


# --- strategies: raw file contents ----------------------------------------------------------------

INVALID_UTF8 = [
    b"\xff",  # never valid
    b"\x80",  # stray continuation byte
    b"\xc3",  # truncated 2-byte sequence
    b"\xc3(",  # bad continuation
    b"\xe2\x82",  # truncated 3-byte sequence
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xc0\xaf",  # overlong
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
]
ODD_BYTES = [b"\r", b"\r\r", b"\x00", b"\t", b"\x0c", BOM, "\u2028".encode(), "\x85".encode(), b" "]
# Any character but '\n' (surrogates cannot be encoded).
TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=12
)
PIECE = st.one_of(
    TEXT.map(str.encode),
    st.sampled_from(INVALID_UTF8),
    st.sampled_from(ODD_BYTES),
    st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"")),  # random bytes
    st.integers(MAX_CHARS - 2, MAX_CHARS + 2).map(lambda n: b"x" * n),  # around the limit
    st.just(b"y" * 5000),  # very long
)
LINE = st.lists(PIECE, max_size=4).map(b"".join)


@st.composite
def file_bytes(draw, line=LINE, max_lines: int = 6) -> bytes:
    lines = draw(st.lists(line, max_size=max_lines))
    data = b"\n".join(lines) + (b"\n" if lines and draw(st.booleans()) else b"")
    return (BOM if draw(st.booleans()) else b"") + data


# --- the oracle ----------------------------------------------------------------------------------


def oracle(data: bytes, *, max_chars: int, mode: str) -> tuple[str, int | None, list[str] | None]:
    """('ok', None, lines) | ('utf8' | 'long', 1-based line, None) | ('empty', None, None)."""
    raw = data.split(b"\n")
    # '\n' is ASCII, so no invalid sequence spans lines: decoding per line finds the same errors
    for i, line in enumerate(raw):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            if mode == "error":
                return "utf8", i + 1, None
    if data.startswith(BOM):
        data = data[len(BOM) :]
        raw = data.split(b"\n")
    if not data:
        return "empty", None, None
    if raw[-1] == b"":
        raw.pop()
    lines = []
    for i, line in enumerate(raw):
        text = line.decode("utf-8", errors="replace")
        text = text[:-1] if text.endswith("\r") else text
        if len(text) > max_chars:
            return "long", i + 1, None
        lines.append(text)
    return "ok", None, lines


def check_outcome(path: Path, expected: tuple, call) -> list[str] | None:
    """Runs ``call``; asserts it matches the oracle's verdict for ``path``; returns the lines."""
    kind, line, lines = expected
    if kind == "ok":
        return call()
    with pytest.raises(DataError) as e:
        call()
    msg = str(e.value)
    if line is not None:
        assert f"{path}:{line}:" in msg, msg
        assert ("invalid UTF-8" if kind == "utf8" else "characters long") in msg, msg
    else:
        assert f"{path}: empty file" in msg, msg
    return None


# --- sources.read_lines / read_parallel ----------------------------------------------------------


@SETTINGS
@given(data=file_bytes(), mode=st.sampled_from(["error", "replace"]))
def test_read_lines_is_valid_or_names_file_and_line(data, mode):
    with workdir() as d:
        path = d / "f.txt"
        path.write_bytes(data)
        expected = oracle(data, max_chars=MAX_CHARS, mode=mode)
        got = check_outcome(
            path,
            expected,
            lambda: sources.read_lines(str(path), max_chars=MAX_CHARS, on_invalid_utf8=mode),
        )
        if got is not None:
            assert got == expected[2]
            assert all(isinstance(x, str) and "\n" not in x for x in got)


@SETTINGS
@given(lines=st.lists(LINE, min_size=1, max_size=6))
def test_replace_keeps_every_line_and_marks_invalid_bytes(lines):
    with workdir() as d:
        path = d / "f.txt"
        path.write_bytes(b"\n".join(lines) + b"\n")
        got = sources.read_lines(str(path), max_chars=10**6, on_invalid_utf8="replace")
        assert len(got) == len(lines)  # never a silent drop or split
        for raw, text in zip(lines, got, strict=True):
            if _bad_utf8(raw):
                assert "\ufffd" in text


def _bad_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


BOUND = st.one_of(st.none(), st.integers(0, 9), st.sampled_from(["0%", "20%", "50%", "100%"]))


@SETTINGS
@given(data=file_bytes(line=TEXT.map(str.encode), max_lines=8), start=BOUND, end=BOUND)
def test_line_ranges_select_or_refuse(data, start, end):
    fmt = lambda b: "" if b is None else str(b)
    spec = "f.txt" if start is None and end is None else f"f.txt@{fmt(start)}:{fmt(end)}"
    with workdir() as d:
        (d / "f.txt").write_bytes(data)
        kind, _, full = oracle(data, max_chars=10**6, mode="error")
        if kind != "ok":
            with pytest.raises(DataError, match=r"f\.txt"):
                sources.read_lines(spec, d, max_chars=10**6)
            return
        n = len(full)

        def bound(b, default):
            if b is None:
                return default
            return n * int(b[:-1]) // 100 if isinstance(b, str) else b

        lo, hi = bound(start, 0), bound(end, n)
        if lo < hi <= n:
            assert sources.read_lines(spec, d, max_chars=10**6) == full[lo:hi]
            assert sources.line_count(spec, d) == hi - lo
        else:
            with pytest.raises(DataError, match=r"f\.txt"):
                sources.read_lines(spec, d, max_chars=10**6)


@SETTINGS
@given(src=file_bytes(max_lines=5), tgt=file_bytes(max_lines=5))
def test_read_parallel_is_aligned_or_names_both_counts(src, tgt):
    with workdir() as d:
        (d / "s.txt").write_bytes(src)
        (d / "t.txt").write_bytes(tgt)
        exp_s = oracle(src, max_chars=MAX_CHARS, mode="error")
        exp_t = oracle(tgt, max_chars=MAX_CHARS, mode="error")

        def call():
            return sources.read_parallel("s.txt", "t.txt", d, max_chars=MAX_CHARS)

        if exp_s[0] != "ok":  # the source side is read (and refused) first
            check_outcome(d / "s.txt", exp_s, call)
        elif exp_t[0] != "ok":
            check_outcome(d / "t.txt", exp_t, call)
        elif len(exp_s[2]) != len(exp_t[2]):
            with pytest.raises(DataError, match="not line-aligned") as e:
                call()
            msg = str(e.value)
            assert f"{d / 's.txt'}: {len(exp_s[2])} lines" in msg, msg
            assert f"{d / 't.txt'}: {len(exp_t[2])} lines" in msg, msg
        else:
            s, t = call()
            assert (s, t) == (exp_s[2], exp_t[2]) and len(s) == len(t)


# --- corpus.read_split: the config's source strings ----------------------------------------------

FILES = {
    "a.txt": b"one\ntwo\nthree\n",
    "b.txt": b"un\ndeux\ntrois\n",
    "c.txt": b"eins\nzwei\n",
    "bad.txt": b"fine\nbad \xff\n",
    "empty.txt": b"",
}
KEYS = ["en", "fr", "de", "xx", "en-fr", "fr-de", "en-xx", "en-", "-fr", "en-fr-de", "", " en "]
SPECS = [
    "a.txt",
    "b.txt@0:2",
    "c.txt@1:",
    "a.txt, c.txt",
    "a.txt|b.txt",
    "a.txt@0:2|c.txt",
    "a.txt|c.txt",  # 3 vs 2 lines
    "a.txt|b.txt|c.txt",
    "missing.txt",
    "bad.txt",
    "empty.txt",
    "a.txt@5:",
    "a.txt@x:y",
    " , ",
    "",
    "tfds:",
    "a\x00.txt",
]


@st.composite
def split_text(draw) -> str:
    entries = draw(
        st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(SPECS)), min_size=0, max_size=4)
    )
    text = "; ".join(f"{k}: {s}" for k, s in entries)
    if draw(st.booleans()):  # and some noise: stray separators or arbitrary characters
        text += draw(st.sampled_from([";", ";;", " ; en", ":", "en:", ": a.txt"]) | TEXT)
    return text


@SETTINGS
@given(text=split_text())
@example(text="en: a\x00.txt")
@example(text="en-fr: a.txt|c.txt")
@example(text="en: a.txt; en: b.txt")
def test_read_split_is_valid_or_a_clean_data_error(text):
    with workdir() as d:
        for name, data in FILES.items():
            (d / name).write_bytes(data)
        try:
            split = corpus.read_split(
                text, ["en", "fr", "de"], root=str(d), where="data.train", max_chars=MAX_CHARS
            )
        except DataError as e:
            msg = str(e)
            assert "data.train" in msg or str(d) in msg or "source spec" in msg, msg
            return
        for lang, lines in split.mono.items():
            assert lang in ("en", "fr", "de") and all(isinstance(x, str) for x in lines)
            assert lines
        for (l1, l2), (s, t) in split.para.items():
            assert {l1, l2} <= {"en", "fr", "de"}
            assert len(s) == len(t) > 0


# --- nli: XNLI TSV rows --------------------------------------------------------------------------

CELL = st.text(
    alphabet=st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)),
    max_size=8,
)
LABEL = st.sampled_from([*nli.LABELS, "Entailment", "label", "", " neutral ", "2", "entail"])


@st.composite
def tsv_line(draw) -> bytes:
    kind = draw(st.sampled_from(["row", "row", "row", "cols", "invalid"]))
    if kind == "row":
        return "\t".join([draw(CELL), draw(CELL), draw(LABEL)]).encode()
    if kind == "cols":
        return "\t".join(draw(st.lists(CELL, max_size=5))).encode()
    return draw(CELL).encode() + draw(st.sampled_from(INVALID_UTF8))


def nli_oracle(lines: list[bytes]) -> tuple[int | None, list[nli.Example]]:
    """(1-based line of the first bad row or None, the examples before it)."""
    out = []
    for i, raw in enumerate(lines):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return i + 1, out
        cols = text.split("\t")
        if len(cols) != 3:
            return i + 1, out
        p, h, label = (c.strip() for c in cols)
        if label not in nli.LABEL_IDS or not p or not h:
            return i + 1, out
        out.append(nli.Example(p, h, nli.LABEL_IDS[label]))
    return None, out


@SETTINGS
@given(lines=st.lists(tsv_line(), min_size=1, max_size=6), start=st.none() | st.integers(0, 3))
def test_xnli_rows_are_valid_or_name_file_and_line(lines, start):
    with workdir() as d:
        path = d / "en.tsv"
        path.write_bytes(b"\n".join(lines) + b"\n")
        spec = "en.tsv" if start is None else f"en.tsv@{start}:"
        first = start or 0
        # the whole file is checked as UTF-8 first, the rows then only in the selected range
        bad_utf8 = next((i + 1 for i, raw in enumerate(lines) if _bad_utf8(raw)), None)
        if bad_utf8 is not None:
            with pytest.raises(DataError, match=f"{path}:{bad_utf8}: invalid UTF-8"):
                nli.read_nli(spec, d)
        elif first >= len(lines):
            with pytest.raises(DataError, match=r"en\.tsv: range @\d+: (is beyond|of no lines)"):
                nli.read_nli(spec, d)
        else:
            bad_row, expected = nli_oracle(lines[first:])
            if bad_row is None:
                assert nli.read_nli(spec, d) == expected
            else:
                with pytest.raises(DataError) as e:
                    nli.read_nli(spec, d)
                assert f"{path}:{first + bad_row}: " in str(e.value), str(e.value)


# --- batch iterators -----------------------------------------------------------------------------

TOKEN = st.integers(4, 40)  # content ids: never BOS/EOS/PAD/UNK
SENTENCE = st.lists(TOKEN, max_size=30).map(lambda x: np.array(x, np.int32))
SENTENCES = st.lists(SENTENCE, max_size=14)


@st.composite
def rows_of(draw, batch_size: int) -> tuple[int, int] | None:
    if draw(st.booleans()):
        return None
    start = draw(st.integers(0, batch_size - 1))
    return start, draw(st.integers(start + 1, batch_size))


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        np.testing.assert_array_equal(a[k], b[k])


def check_resume(make, n_before: int, n_after: int) -> None:
    """``state()`` after ``n_before`` batches, through JSON as in a checkpoint, then restored into a
    fresh iterator: the next ``n_after`` batches are identical."""
    it = make()
    for _ in range(n_before):
        next(it)
    state = json.loads(json.dumps(it.state()))
    later = [next(it) for _ in range(n_after)]
    fresh = make()
    fresh.restore(state)
    for b in later:
        assert_batches_equal(next(fresh), b)
    assert fresh.state() == it.state()


@SETTINGS
@given(
    sents=SENTENCES,
    batch_size=st.integers(1, 4),
    length=st.integers(0, 24),
    seed=st.integers(0, 3),
    data=st.data(),
)
def test_stream_batches_valid_or_refused_and_resume(sents, batch_size, length, seed, data):
    stream = batches.make_stream(sents)
    assert stream[0] == EOS_ID and stream[-1] == EOS_ID and PAD_ID not in stream
    assert len(stream) == 1 + sum(len(s) + 1 for s in sents if len(s))
    rows = data.draw(rows_of(batch_size))

    def make(rows=rows):
        return batches.StreamBatches(
            stream,
            lang_id=2,
            batch_size=batch_size,
            length=length,
            seed=seed,
            name="mlm_en",
            rows=rows,
        )

    try:
        it = make()
    except ValueError as e:
        assert "mlm_en" in str(e)
        assert length < 1 or len(stream) < length + 1
        return
    whole = make(rows=None)
    windows = np.lib.stride_tricks.sliding_window_view(stream, length)
    r0, r1 = rows or (0, batch_size)
    for _ in range(6):  # enough to cross epochs on short streams
        b, g = next(it), next(whole)
        assert set(b) == {"tokens", "positions", "langs"}
        for k in b:
            assert b[k].dtype == np.int32 and b[k].shape == (r1 - r0, length)
            np.testing.assert_array_equal(b[k], g[k][r0:r1])  # a slice of the global batch
        np.testing.assert_array_equal(
            b["positions"], np.broadcast_to(np.arange(length), (r1 - r0, length))
        )
        assert (b["langs"] == 2).all()
        for row in b["tokens"]:  # a contiguous cut of the stream
            assert (windows == row).all(axis=1).any()
    check_resume(make, data.draw(st.integers(0, 5)), 6)


def check_pair_row(tokens, positions, langs, src, tgt, src_lang, tgt_lang) -> None:
    n1, n2 = len(src) + 2, len(tgt) + 2
    np.testing.assert_array_equal(tokens[:n1], [EOS_ID, *src, EOS_ID])
    np.testing.assert_array_equal(tokens[n1 : n1 + n2], [EOS_ID, *tgt, EOS_ID])
    assert (tokens[n1 + n2 :] == PAD_ID).all()
    np.testing.assert_array_equal(positions[: n1 + n2], [*range(n1), *range(n2)])
    assert (langs[:n1] == src_lang).all() and (langs[n1:] == tgt_lang).all()


def _split_pair_row(row: np.ndarray) -> tuple[list[int], list[int]]:
    """``</s> src </s></s> tgt </s> pad...`` → (src, tgt)."""
    body = row[row != PAD_ID]
    eos = np.flatnonzero(body == EOS_ID)
    assert len(eos) == 4 and eos[0] == 0 and eos[2] == eos[1] + 1 and eos[3] == len(body) - 1
    return body[1 : eos[1]].tolist(), body[eos[2] + 1 : eos[3]].tolist()


@SETTINGS
@given(
    pairs=st.lists(st.tuples(SENTENCE, SENTENCE), max_size=12),
    batch_size=st.integers(1, 4),
    length=st.integers(0, 40),
    data=st.data(),
)
def test_pair_batches_valid_or_refused_and_resume(pairs, batch_size, length, data):
    src, tgt = [p[0] for p in pairs], [p[1] for p in pairs]
    rows = data.draw(rows_of(batch_size))
    keep = [(s, t) for s, t in pairs if len(s) and len(t) and len(s) + len(t) + 4 <= length]

    def make(rows=rows):
        return batches.PairBatches(
            src,
            tgt,
            src_lang=0,
            tgt_lang=1,
            batch_size=batch_size,
            length=length,
            seed=3,
            name="tlm_en-fr",
            rows=rows,
        )

    if not keep:
        with pytest.raises(ValueError, match="tlm_en-fr: no pair"):
            make()
        return
    it = make()
    assert it.n_dropped == len(pairs) - len(keep) and len(it) == len(keep)
    kept = {(tuple(s.tolist()), tuple(t.tolist())) for s, t in keep}
    r0, r1 = rows or (0, batch_size)
    for _ in range(5):
        b = next(it)
        for k in ("tokens", "positions", "langs"):
            assert b[k].dtype == np.int32 and b[k].shape == (r1 - r0, length)
        for tokens, positions, langs in zip(b["tokens"], b["positions"], b["langs"], strict=True):
            s, t = _split_pair_row(tokens)
            assert (tuple(s), tuple(t)) in kept
            check_pair_row(tokens, positions, langs, s, t, 0, 1)
    check_resume(make, data.draw(st.integers(0, 5)), 5)


BUCKETS = st.lists(st.integers(3, 34), min_size=1, max_size=3, unique=True)


def check_sentence_rows(b: dict, prefix: str, lang: int, buckets, pool) -> None:
    tokens, positions, langs = (b[f"{prefix}{k}"] for k in ("tokens", "positions", "langs"))
    assert tokens.dtype == positions.dtype == langs.dtype == np.int32
    assert tokens.shape == positions.shape == langs.shape and tokens.shape[1] in buckets
    assert (langs == lang).all()
    for row, pos in zip(tokens, positions, strict=True):
        n = int((row != PAD_ID).sum())
        assert n >= 3 and row[0] == EOS_ID and row[n - 1] == EOS_ID and (row[n:] == PAD_ID).all()
        assert EOS_ID not in row[1 : n - 1]
        np.testing.assert_array_equal(pos, [*range(n), *[0] * (len(row) - n)])
        assert tuple(row[1 : n - 1].tolist()) in pool


@SETTINGS
@given(sents=SENTENCES, batch_size=st.integers(1, 5), buckets=BUCKETS, data=st.data())
def test_sentence_batches_valid_or_refused_and_resume(sents, batch_size, buckets, data):
    max_len = max(buckets) - 2
    kept = [s for s in sents if 0 < len(s) <= max_len]
    rows = data.draw(rows_of(batch_size))

    def make(rows=rows):
        return sentences.SentenceBatches(
            sents,
            lang_id=4,
            batch_size=batch_size,
            buckets=buckets,
            seed=0,
            name="ae_en",
            rows=rows,
        )

    if not kept:
        with pytest.raises(ValueError, match="ae_en: no sentence"):
            make()
        return
    it, whole = make(), make(rows=None)
    assert it.n_dropped == len(sents) - len(kept)
    pool = {tuple(s.tolist()) for s in kept}
    r0, r1 = rows or (0, batch_size)
    seen = set()
    n_epoch = -(-len(kept) // batch_size)  # batches per epoch
    for _ in range(n_epoch):
        b, g = next(it), next(whole)
        assert b["tokens"].shape[0] == r1 - r0
        check_sentence_rows(g, "", 4, buckets, pool)
        for k in b:
            np.testing.assert_array_equal(b[k], g[k][r0:r1])
        seen |= {tuple(r[1 : (r != PAD_ID).sum() - 1].tolist()) for r in g["tokens"]}
    assert seen == pool and whole.epoch == 1  # every sentence at least once per epoch
    check_resume(make, data.draw(st.integers(0, 4)), 4)


@SETTINGS
@given(
    pairs=st.lists(st.tuples(SENTENCE, SENTENCE), max_size=12),
    batch_size=st.integers(1, 5),
    buckets=BUCKETS,
    data=st.data(),
)
def test_parallel_batches_valid_or_refused_and_resume(pairs, batch_size, buckets, data):
    src, tgt = [p[0] for p in pairs], [p[1] for p in pairs]
    max_len = max(buckets) - 2
    kept = [(s, t) for s, t in pairs if 0 < len(s) <= max_len and 0 < len(t) <= max_len]
    rows = data.draw(rows_of(batch_size))

    def make(rows=rows):
        return sentences.ParallelBatches(
            src,
            tgt,
            src_lang=0,
            tgt_lang=1,
            batch_size=batch_size,
            buckets=buckets,
            seed=0,
            name="mt_en-fr",
            rows=rows,
        )

    if not kept:
        with pytest.raises(ValueError, match="mt_en-fr: no pair"):
            make()
        return
    it, whole = make(), make(rows=None)
    assert it.n_dropped == len(pairs) - len(kept)
    src_pool = {tuple(s.tolist()) for s, _ in kept}
    tgt_pool = {tuple(t.tolist()) for _, t in kept}
    pair_pool = {(tuple(s.tolist()), tuple(t.tolist())) for s, t in kept}
    r0, r1 = rows or (0, batch_size)
    for _ in range(4):
        b, g = next(it), next(whole)
        check_sentence_rows(g, "src_", 0, buckets, src_pool)
        check_sentence_rows(g, "tgt_", 1, buckets, tgt_pool)
        for s_row, t_row in zip(g["src_tokens"], g["tgt_tokens"], strict=True):
            s = tuple(s_row[1 : (s_row != PAD_ID).sum() - 1].tolist())
            t = tuple(t_row[1 : (t_row != PAD_ID).sum() - 1].tolist())
            assert (s, t) in pair_pool  # sides stay aligned
        for k in b:
            np.testing.assert_array_equal(b[k], g[k][r0:r1])
    check_resume(make, data.draw(st.integers(0, 4)), 4)


def test_mismatched_iterator_inputs_are_refused_at_construction():
    one = [np.array([5, 6], np.int32)]
    with pytest.raises(ValueError, match="1 source but 0 target"):
        batches.PairBatches(
            one, [], src_lang=0, tgt_lang=1, batch_size=1, length=8, seed=0, name="p"
        )
    with pytest.raises(ValueError, match="1 source but 0 target"):
        sentences.ParallelBatches(
            one, [], src_lang=0, tgt_lang=1, batch_size=1, buckets=[8], seed=0, name="p"
        )
    for rows in [(0, 0), (1, 3), (-1, 1)]:
        with pytest.raises(ValueError, match="not a slice of a batch of 2"):
            sentences.SentenceBatches(
                one, lang_id=0, batch_size=2, buckets=[8], seed=0, name="s", rows=rows
            )
