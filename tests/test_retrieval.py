"""The Tatoeba retrieval probe: nearest-neighbour accuracy, end to end on a tiny pretraining."""

import json

import numpy as np
import pytest

from tests.conftest import write_lines
from xlm_jax.tasks import retrieval


def test_retrieval_accuracy_counts_the_diagonal():
    x = np.eye(4) + 0.1
    assert retrieval.retrieval_accuracy(x, x) == (100.0, 100.0)
    assert retrieval.retrieval_accuracy(x, x[::-1]) == (0.0, 0.0)
    y = x.copy()
    y[[0, 1]] = y[[1, 0]]  # two translations swapped: half right in both directions
    assert retrieval.retrieval_accuracy(x, y) == (50.0, 50.0)


def test_retrieval_of_identical_sides_is_perfect(pretrained, tmp_path):
    sentences = [
        "A dog runs in the park.",
        "Two men are playing football.",
        "A woman reads a book on a bench.",
        "Children swim in a lake.",
        "A red car drives down the street.",
        "The cat sleeps on the sofa.",
        "A man is cooking dinner.",
        "People walk along the beach at sunset.",
        "A girl rides a bicycle.",
        "An old man feeds the birds.",
    ]
    f = write_lines(tmp_path / "side.txt", sentences)
    config = retrieval.retrieval_default_config()
    config.init_checkpoint = str(pretrained)
    config.data.pairs = f"fr-en: {f}|{f}; de-en: {f}@2:|{f}@2:"
    config.batch_size = 4
    results = retrieval.retrieval(config, tmp_path / "probe")
    assert set(results["pairs"]) == {"fr-en", "de-en"} and results["pairs"]["de-en"]["n"] == 8
    # the same sentences in the same language on both sides: each must find its twin
    config.data.pairs = f"en-en: {f}|{f}"
    same = retrieval.retrieval(config, tmp_path / "probe_same")
    assert same["pairs"]["en-en"] == {"n": 10, "xx->en": 100.0, "en->xx": 100.0, "mean": 100.0}
    text = (tmp_path / "probe_same" / "retrieval.md").read_text()
    assert "| en-en | 10 | 100.0 | 100.0 | 100.0 |" in text
    saved = json.loads((tmp_path / "probe_same" / "retrieval.json").read_text())
    assert saved["average"]["mean"] == 100.0


def test_retrieval_skips_pairs_without_held_out_lines(pretrained, tmp_path):
    f = write_lines(tmp_path / "short.txt", ["one line", "two lines", "three"])
    config = retrieval.retrieval_default_config()
    config.init_checkpoint = str(pretrained)
    config.data.pairs = f"fr-en: {f}@3:|{f}@3:; de-en: {f}|{f}"
    results = retrieval.retrieval(config, tmp_path / "probe")
    assert list(results["pairs"]) == ["de-en"] and "fr-en" in results["skipped"]


def test_the_probe_reads_the_layer_it_is_given(pretrained, tmp_path):
    f = write_lines(tmp_path / "side.txt", ["A dog runs.", "Two men play.", "A cat sleeps."])
    config = retrieval.retrieval_default_config()
    config.init_checkpoint = str(pretrained)
    config.data.pairs = f"en-en: {f}|{f}"
    config.layer = 0  # the embeddings' output (the tiny encoder has one layer)
    results = retrieval.retrieval(config, tmp_path / "probe")
    assert results["layer"] == 0 and results["pairs"]["en-en"]["mean"] == 100.0
    assert "mean-pooled embedding-layer states" in (tmp_path / "probe" / "retrieval.md").read_text()
    config.layer = 2
    with pytest.raises(ValueError, match=r"layer=2: the encoder has layers 1\.\.1"):
        retrieval.retrieval(config, tmp_path / "probe")
