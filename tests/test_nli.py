"""NLI data: XLM's pair rows, epoch order and evaluation batches, reading and checking the sets."""

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, needs_xnli, write_lines
from xlm_jax.data import nli
from xlm_jax.data.sources import DataError
from xlm_jax.text.tokenizer import EOS_ID, PAD_ID


def test_pack_pair_is_xlms_row():
    p, h = np.array([20, 21, 22]), np.array([30, 31])
    tokens, positions, langs = nli.pack_pair(p, h, 4, max_len=256, length=12)
    assert tokens.tolist() == [1, 20, 21, 22, 1, 30, 31, 1, 2, 2, 2, 2]
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0]
    assert set(langs.tolist()) == {4}
    # XLM's truncate: each framed sentence keeps max_len tokens, its last one </s> again
    tokens, _, _ = nli.pack_pair(np.arange(20, 30), h, 0, max_len=4, length=16)
    assert tokens[:8].tolist() == [1, 20, 21, 1, 30, 31, 1, 2]
    # a row longer than the padded length loses tokens from its longer sentence
    tokens, _, _ = nli.pack_pair(np.arange(20, 30), h, 0, max_len=256, length=9)
    assert tokens.tolist() == [1, 20, 21, 22, 23, 1, 30, 31, 1]
    assert (tokens == EOS_ID).sum() == 3 and tokens[-1] == EOS_ID


def test_batches_shuffle_per_epoch_and_pad_evaluation():
    a, b = nli.epoch_order(10, 1, 0, -1), nli.epoch_order(10, 1, 0, -1)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(10))
    assert not np.array_equal(a, nli.epoch_order(10, 2, 0, -1))
    assert len(nli.epoch_order(10, 1, 0, 4)) == 4
    rows = nli.Rows(
        tokens=np.full((5, 6), 7, np.int32),
        positions=np.zeros((5, 6), np.int32),
        langs=np.zeros((5, 6), np.int32),
        labels=np.arange(5, dtype=np.int32) % 3,
    )
    batches = nli.eval_batches(rows, 4)
    assert len(batches) == 2
    last = batches[1]
    assert last["weights"][:, 0].tolist() == [1, 0, 0, 0]
    assert (last["tokens"][1:] == PAD_ID).all()
    assert last["labels"].shape == (4, 1)


GOOD = ["A man sleeps.\tA person rests.\tentailment", "A man sleeps.\tHe runs.\tcontradiction"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("A man sleeps.\tA person rests.", r"bad\.tsv:3: 2 tab-separated column\(s\); expected 3"),
        ("A man sleeps.\tA person.\tmaybe", r"bad\.tsv:3: unknown label 'maybe'; expected one of"),
        ("\tA person rests.\tneutral", r"bad\.tsv:3: empty premise"),
        ("A man sleeps.\t \tneutral", r"bad\.tsv:3: empty hypothesis"),
        ("a\tb\tc\td", r"bad\.tsv:3: 4 tab-separated"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.tsv", [*GOOD, bad])
    with pytest.raises(DataError, match=message):
        nli.read_xnli_tsv(path)
    # a range that skips the bad line reads; line numbers stay those of the file
    assert len(nli.read_xnli_tsv(f"{path}@0:2")) == 2
    with pytest.raises(DataError, match=r"bad\.tsv:3:"):
        nli.read_xnli_tsv(path, rows=slice(1, 3))


def test_header_and_missing_classes_are_explained(tmp_path):
    path = write_lines(tmp_path / "h.tsv", ["premise\thypothesis\tlabel", *GOOD])
    with pytest.raises(DataError, match=r"h\.tsv:1: .*header"):
        nli.read_xnli_tsv(path)
    examples = nli.read_xnli_tsv(path, rows=slice(1, None))
    with pytest.raises(
        DataError, match=r"train en: .*only the labels contradiction, entailment; expected all"
    ):
        nli.check_three_classes([ex.label for ex in examples], "data.train en")


def test_tfds_sources_fail_fast_when_not_prepared(tmp_path):
    with pytest.raises(DataError, match="not prepared"):
        nli.read_nli("tfds:multi_nli:train:en", data_dir=tmp_path)
    with pytest.raises(DataError, match="MultiNLI is English"):
        nli.read_nli("tfds:multi_nli:train:fr", data_dir=tmp_path)


@needs_xnli
def test_real_xnli_files_follow_the_protocol():
    train_src, valid_src = nli.xnli_dev_sources()
    train_sets = nli.read_sets(train_src, "data.train", root=str(SHARED_DATA))
    valid = nli.read_sets(valid_src, "data.valid", root=str(SHARED_DATA))
    assert list(train_sets) == ["en"] and len(train_sets["en"]) == 1990
    nli.check_three_classes([ex.label for ex in train_sets["en"]], "en")
    assert list(valid) == list(nli.PAPER_LANGS)
    assert all(len(v) == 500 for v in valid.values())
    # row-parallel files: the same labels row by row in every language
    labels = {lang: [ex.label for ex in v] for lang, v in valid.items()}
    assert all(labels[lang] == labels["en"] for lang in labels)
