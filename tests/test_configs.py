"""Every config builds; the paper-size model has the paper's size. (The command line runs each
config of the docs in tests/test_docs_run.py.)"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from xlm_jax.data import corpus as corpus_lib
from xlm_jax.model.encoder import XLMEncoder, count_params
from xlm_jax.tasks import pretrain

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str, *args):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


@pytest.mark.parametrize(
    "name",
    ["demo", "multi30k_mlm_tlm", "xnli15_mlm_tlm", "xnli15_small", "xnli15_small:mlm,parallel"],
)
def test_config_builds_and_docstring_shows_its_command(name):
    config = load_config(*name.split(":"))
    file, sep, arg = name.partition(":")
    text = (REPO / "configs" / f"{file}.py").read_text()
    assert f"--config=configs/{file}.py{sep}{arg}" in text
    steps = pretrain.build_steps(config)
    assert sum(len(s) for s in steps) > 0


def test_multi30k_mlm_variant_has_no_tlm():
    assert load_config("multi30k_mlm_tlm", "mlm").mlm_steps == "en,de,fr"
    with pytest.raises(ValueError, match="objectives"):
        load_config("multi30k_mlm_tlm", "tlm")


def test_xnli15_model_has_the_paper_size():
    config = load_config("xnli15_mlm_tlm")
    assert len(corpus_lib.lang_list(config)) == 15
    model = XLMEncoder(pretrain.model_config(config, config.tokenizer.vocab_size))
    params = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0)},
            jnp.zeros((1, 8), jnp.int32),
            jnp.zeros((1, 8), jnp.int32),
            jnp.zeros((1, 8), jnp.int32),
        )
    )["params"]
    # 12 x 1024, 95k vocabulary, 15 languages: ~250M parameters, never materialised here
    assert 245e6 < count_params(params) < 255e6


@pytest.mark.parametrize(
    "name",
    [
        "xnli15_mlm_tlm",
        "xnli15_small",
        "multi30k_mlm_tlm",
        "multi30k_mlm_tlm:unmt_enfr_parallel",
        "xnli15_small:mlm_tlm,parallel",
    ],
)
def test_real_data_configs_read_their_sources(name, shared_data):
    """Every source the config names exists and its line ranges fit the files."""
    from xlm_jax.data.corpus import read_split

    config = load_config(*name.split(":"))
    langs = corpus_lib.lang_list(config)
    root = shared_data / config.data.root.removeprefix("../shared/data").lstrip("/")
    for where in ("train", "valid"):
        split = read_split(config.data[where], langs, root=str(root), where=f"data.{where}")
        assert set(split.mono) == set(langs)
        for src, tgt in split.para.values():
            assert len(src) == len(tgt) > 0


def test_parallel_text_adds_pairs_and_sides_only_to_training(shared_data):
    """configs/xnli15_small.py:*,parallel = its text + parallel/ (NTREX in every pair, news and
    UN where they exist), the same validation; the MLM-only variant keeps the text."""
    from xlm_jax.data.corpus import read_split

    small, more = load_config("xnli15_small"), load_config("xnli15_small", "mlm_tlm,parallel")
    assert more.data.valid == small.data.valid
    assert load_config("xnli15_small", "mlm,parallel").data.train == more.data.train
    langs = corpus_lib.lang_list(more)
    a, b = (read_split(c.data.train, langs, root=str(shared_data), where="") for c in (small, more))
    ntrex = 1997
    for pair, (src, _) in a.para.items():
        extra = len(b.para[pair][0]) - len(src)
        assert extra >= ntrex, pair
        lang = pair[1]
        assert len(b.mono[lang]) - len(a.mono[lang]) == extra, pair  # the xx side of each pair
    assert len(b.para[("en", "de")][0]) - len(a.para[("en", "de")][0]) == ntrex + 31_158  # news
    assert len(b.para[("en", "fr")][0]) - len(a.para[("en", "fr")][0]) == ntrex + 20_173 + 8_000
    assert len(b.mono["en"]) - len(a.mono["en"]) == ntrex + 8_000 + 31_158  # one news English
