"""The notebooks' settings (xlm_jax.tools.tutorial) and the data download (xlm_jax.tools.fetch)."""

import gzip
import shutil

import numpy as np
import pytest

from tests.conftest import SHARED_DATA
from xlm_jax.text.tokenizer import UNK_ID
from xlm_jax.text.xlm_bpe import FastBPE
from xlm_jax.tools import fetch, tutorial


def test_load_config_is_the_command_lines_config():
    config = tutorial.load_config("configs/multi30k_mlm_tlm.py:mlm", {"model.n_layers": 2})
    assert config.mlm_steps == "en,de,fr" and config.model.n_layers == 2
    with pytest.raises(KeyError):
        tutorial.load_config("configs/demo.py", {"model.n_layerz": 2})


def test_sizes_differ_only_where_they_should():
    for size in tutorial.SIZES:
        pre = tutorial.pretrain(size, "/data").config()
        assert pre.langs.split(",") == ["en", "fr", "de"] or pre.langs == "en,de,fr"
        assert "en-fr" in pre.mlm_steps  # TLM in both
    assert tutorial.pretrain("tiny", "/data").config().data.root == ""  # the toy corpus
    assert tutorial.pretrain("colab", "/data").config().data.root == "/data/multi30k"
    tiny = tutorial.unmt("tiny", "/data", "/tmp/mlm").config()
    assert tiny.init_checkpoint == "/tmp/mlm" and tiny.mt_steps == ""  # never a pair
    assert "@0:" in tiny.data.train and "@14500:" in tiny.data.train  # disjoint halves
    with pytest.raises(ValueError, match="SIZE"):
        tutorial.pretrain("huge", "/data")


def test_data_and_work_roots_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XLM_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("XLM_WORK", str(tmp_path / "w"))
    assert tutorial.default_data_root() == tmp_path / "d"
    assert tutorial.default_work_root() == tmp_path / "w"
    monkeypatch.delenv("XLM_DATA")
    assert tutorial.default_data_root() == tutorial.repo_root().parent / "shared" / "data"


def test_learn_bpe_merges_the_most_frequent_pair_first():
    # Sennrich et al.'s example: e+s (9) ties with s+t</w> (9): the smaller pair wins
    codes = tutorial.learn_bpe({"low": 5, "lower": 2, "newest": 6, "widest": 3}, 3)
    assert codes == [("e", "s", 9), ("es", "t</w>", 9), ("l", "o", 7)]
    assert FastBPE(codes)("lowest") == ["lo@@", "w@@", "est"]


def test_the_standin_is_an_xlm_checkpoint_that_imports(tmp_path):
    pytest.importorskip("torch")
    from xlm_jax.data.toy import generate_toy_sentences
    from xlm_jax.tools import convert

    pth, codes = tutorial.write_standin_xlm(tmp_path, n_sentences=300, n_merges=100)
    model = convert.import_xlm_pth(pth, codes=codes)
    assert model.langs == ["de", "en", "fr"] and model.encoder.n_layers == 2
    assert model.tokenizer.lowercase  # detected from the vocabulary, as for XNLI-15
    # its vocabulary covers the corpus it was learned on
    for lang in ("en", "fr", "de"):
        for line in generate_toy_sentences(20, seed=0)[lang]:
            assert UNK_ID not in model.tokenizer.encode(line, lang), line
    # the weights round-trip: the state dict written == the one rebuilt from the import
    import torch

    state = torch.load(pth, weights_only=True)["model"]
    for key, value in convert.xlm_from_params(model.params, model.encoder).items():
        np.testing.assert_array_equal(state[f"module.{key}"].numpy(), value, err_msg=key)


# --- fetch ---------------------------------------------------------------------------------------


def test_the_checksums_are_those_of_the_shared_data():
    if not (SHARED_DATA / "multi30k" / "train.en").exists():
        pytest.skip(f"no data at {SHARED_DATA}")
    assert fetch.missing(SHARED_DATA, ["multi30k", "xnli"]) == []
    assert len(fetch.files("multi30k")) == 9 and len(fetch.files("xnli")) == 15


def test_fetch_downloads_checks_and_skips_what_is_there(tmp_path):
    if not (SHARED_DATA / "xnli" / "en.tsv").exists():
        pytest.skip(f"no data at {SHARED_DATA}")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for path, remote in fetch.files("multi30k").items():  # the source serves .gz files
        (mirror / remote).write_bytes(gzip.compress((SHARED_DATA / path).read_bytes(), 1))
    for path, remote in fetch.files("xnli").items():
        shutil.copy(SHARED_DATA / path, mirror / remote)
    bases = {"multi30k": mirror.as_uri(), "xnli": mirror.as_uri()}
    root = tmp_path / "data"
    written = fetch.fetch(root, ["multi30k", "xnli"], base_urls=bases)
    assert len(written) == 24 and fetch.missing(root, ["multi30k", "xnli"]) == []
    assert (root / "xnli" / "fr.tsv").read_bytes() == (SHARED_DATA / "xnli" / "fr.tsv").read_bytes()
    assert fetch.fetch(root, ["multi30k", "xnli"], base_urls=bases) == []  # all there already

    (root / "xnli" / "de.tsv").write_text("changed\n")  # a damaged copy is fetched again
    (mirror / "dev-de.tsv").write_text("not the file\n")  # ... from a bad mirror: refused
    with pytest.raises(ValueError, match="SHA-256"):
        fetch.fetch(root, ["xnli"], base_urls=bases)
    assert (root / "xnli" / "de.tsv").read_text() == "changed\n"  # nothing half-written
