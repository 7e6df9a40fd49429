"""``python -m xlm_jax.embed``: a file's sentence vectors (and token states) equal the Python
API's, ``explore.sentence_vectors``. Runs the command in-process on a random 2-layer model."""

from __future__ import annotations

import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags

from tests.test_explore import make_workdir
from xlm_jax.data import nli
from xlm_jax.data.sources import DataError
from xlm_jax.data.toy import generate_toy_sentences
from xlm_jax.model.encoder import XLMEncoder
from xlm_jax.text.tokenizer import PAD_ID
from xlm_jax.tools import embed, explore

# toy sentences of several lengths, an empty line (embedded as </s></s>) and one longer than
# --max_len=24 (cut, as the Python API cuts it)
SENTENCES = [
    *generate_toy_sentences(12, seed=5)["en"],
    "",
    " ".join(generate_toy_sentences(6, seed=6)["en"]),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # test_explore's model: in one session its programs (init, ...) come from the compile cache
    return make_workdir(tmp_path_factory.mktemp("embed"))


@pytest.fixture(scope="module")
def enc(workdir) -> explore.Encoder:
    return explore.Encoder.load(workdir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "in.en"
    path.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    return path


def run(*args: str) -> None:
    """The command, in this process: its own flags, parsed as ``app.run`` would."""
    fv = flags.FlagValues()
    defined = embed.define_flags(fv)
    fv(["embed", *args])
    embed.main(["embed"], defined)


@pytest.mark.parametrize("pooling", explore.POOLINGS)
def test_the_command_equals_sentence_vectors(workdir, enc, text_file, tmp_path, capsys, pooling):
    out = tmp_path / "vectors.npy"
    run(f"--workdir={workdir}", f"--input={text_file}", "--lang=en", f"--out={out}",
        f"--pooling={pooling}", "--batch_size=4", "--max_len=24")  # fmt: skip
    expected = explore.sentence_vectors(enc, SENTENCES, "en", pooling=pooling, batch_size=4,
                                        max_len=24)  # fmt: skip
    # the same batches (the input is one chunk) through the same function: equal to the bit
    np.testing.assert_array_equal(np.load(out), expected)
    assert expected.shape == (len(SENTENCES), 32) and expected.dtype == np.float32
    assert "sentences/s" in capsys.readouterr().err  # the progress line


def reference_states(enc: explore.Encoder, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SENTENCES' rows (cut to ``max_len``) in input order, all padded to 32 in one batch, and
    their last-layer states: other batches and padding than the command's."""
    lid = enc.lang_id("en")
    rows = [
        nli.pack_sentence(enc.encode(s, "en"), lid, max_len=max_len, length=32) for s in SENTENCES
    ]
    arrays = [jnp.asarray(np.stack([r[k] for r in rows])) for k in range(3)]
    model = XLMEncoder(enc.source.model)
    hidden = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs, method=XLMEncoder.encode))(
        enc.params, *arrays
    )
    return np.asarray(arrays[0]), np.asarray(hidden)


def test_token_states_are_each_rows_states(workdir, enc, text_file, tmp_path):
    out, tokens = tmp_path / "first.npy", tmp_path / "tokens.npz"
    run(f"--workdir={workdir}", f"--input={text_file}", "--lang=en", f"--out={out}",
        "--pooling=first", f"--tokens={tokens}", "--batch_size=4", "--max_len=24")  # fmt: skip
    first = np.load(out)
    z = np.load(tokens)
    assert sorted(z.files) == ["ids", "offsets", "states"]
    offsets, ids, states = z["offsets"], z["ids"], z["states"]
    assert offsets.shape == (len(SENTENCES) + 1,) and offsets[-1] == len(ids) == len(states)
    mean = explore.sentence_vectors(enc, SENTENCES, "en", batch_size=4, max_len=24)
    ref_tokens, ref_states = reference_states(enc, 24)
    for i in range(len(SENTENCES)):
        rows = slice(offsets[i], offsets[i + 1])
        n = offsets[i + 1] - offsets[i]
        np.testing.assert_array_equal(ids[rows], ref_tokens[i, :n])  # </s> s </s>, cut
        assert (ref_tokens[i, n:] == PAD_ID).all()
        # other padding and batch shapes: float32 rounding of differently shaped products
        np.testing.assert_allclose(states[rows], ref_states[i, :n], atol=1e-5)
        np.testing.assert_array_equal(states[offsets[i]], first[i])
        np.testing.assert_allclose(states[rows].mean(axis=0), mean[i], atol=1e-5)
    assert offsets[len(SENTENCES) - 1] - offsets[len(SENTENCES) - 2] == 2  # the empty line
    assert offsets[-1] - offsets[-2] == 24  # the long line, cut


def test_chunks_sorted_by_length_keep_the_input_order(enc, text_file, tmp_path, monkeypatch):
    out, tokens, once = tmp_path / "v.npy", tmp_path / "t.npz", tmp_path / "once.npz"
    # from stdin, 5 lines a chunk (sorted longest first within each), and one chunk for all
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text_file.read_bytes())))
    kw = {"pooling": "first", "batch_size": 4, "max_len": 24}  # the programs compiled above
    lengths = explore.row_lengths(enc, enc.tokenizer.encode_many(SENTENCES, "en"), 24)
    assert (np.diff(lengths[:5]) > 0).any()  # the first chunk is not longest first already
    assert embed.embed_file(enc, "-", "en", str(out), tokens=str(tokens), chunk=5, **kw) == 14
    embed.embed_file(enc, str(text_file), "en", str(tmp_path / "x.npy"), tokens=str(once), **kw)
    expected = explore.sentence_vectors(enc, SENTENCES, "en", **kw)
    # other batches than sentence_vectors' (chunks cut the sort): float32 rounding at most
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    a, b = np.load(tokens), np.load(once)
    np.testing.assert_array_equal(a["offsets"], b["offsets"])
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_allclose(a["states"], b["states"], atol=1e-5)


def test_an_empty_input_gives_an_empty_array(enc, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    out = tmp_path / "e.npy"
    assert embed.embed_file(enc, str(tmp_path / "empty.txt"), "en", str(out)) == 0
    assert np.load(out).shape == (0, 32)


def test_bad_flags_and_input_fail_clearly(workdir, text_file, tmp_path):
    common = [f"--workdir={workdir}", f"--out={tmp_path / 'v.npy'}"]
    with pytest.raises(app.UsageError, match=r"--lang: language 'xx' is not one of .*'en'"):
        run(*common, f"--input={text_file}", "--lang=xx")
    with pytest.raises(app.UsageError, match="--input=.*nope.txt: no such file"):
        run(*common, f"--input={tmp_path / 'nope.txt'}", "--lang=en")
    with pytest.raises(flags.IllegalFlagValueError, match="--input"):
        run(*common, "--lang=en")
    with pytest.raises(flags.IllegalFlagValueError, match="pooling"):
        run(*common, f"--input={text_file}", "--lang=en", "--pooling=max")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a cat .\n\xff\n")
    with pytest.raises(DataError, match=r"bad.txt:2: invalid UTF-8"):
        run(*common, f"--input={bad}", "--lang=en")
    assert not (tmp_path / "v.npy").exists() and list(tmp_path.iterdir()) == [bad]
