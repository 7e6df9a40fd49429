"""NLI sets prepared once (data.records = "nli"): the same ids and labels as the text read in
memory, rows read per process, and bad lines named before anything is tokenized."""

import numpy as np
import pytest

from tests.conftest import XNLI_DIR, needs_xnli, tiny_config
from xlm_jax.data import nli, prepare, prepared
from xlm_jax.data.sources import DataError
from xlm_jax.tasks import pretrain, xnli
from xlm_jax.text import tokenizer as tokenizer_lib
from xlm_jax.text import xlm_bpe


def _config(root, **data):
    c = xnli.default_config()
    c.data.root = str(root)
    c.data.shard_lines = 8  # several shards per set
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A small tokenizer trained on XNLI's first English and French rows."""
    texts = {
        lang: [s for ex in nli.read_xnli_tsv(XNLI_DIR / f"{lang}.tsv@0:60") for s in ex[:2]]
        for lang in ("en", "fr")
    }
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer_lib.train_tokenizer(texts, path, vocab_size=400, n_sentences=1000, seed=0)
    return path


@needs_xnli
def test_prepared_pairs_equal_the_text_read_in_memory(tok_path, tmp_path):
    config = _config(
        XNLI_DIR.parent,
        train="en: xnli/en.tsv@0:30, xnli/en.tsv@40:45",
        valid="en: xnli/en.tsv@1990:2010; fr: xnli/fr.tsv@1990:2010",
        translate_test="fr: xnli/en.tsv@1990:2010",  # English text: English rules and lang id
    )
    prepare.prepare(config, tmp_path / "p", root=config.data.root, tokenizer_path=tok_path)
    ps = prepared.PreparedSet.open(tmp_path / "p")
    tok = tokenizer_lib.Tokenizer.load(tok_path)
    for split in ("train", "valid", "translate_test"):
        text = nli.read_sets(config.data[split], split, root=config.data.root)
        for lang, examples in text.items():
            premises, hypotheses = ps.sentences(split, lang)
            tok_lang = "en" if split == "translate_test" else lang
            want = [tok.encode_many([ex[k] for ex in examples], tok_lang) for k in (0, 1)]
            assert [list(x) for x in premises] == [list(x) for x in want[0]]
            assert [list(x) for x in hypotheses] == [list(x) for x in want[1]]
            np.testing.assert_array_equal(ps.labels(split, lang), [ex.label for ex in examples])
    entry = ps.keys("train")["en"]
    assert entry["sentences"] == 35 and len(entry["shards"]) == 5  # 30 + 5 lines, 8 a shard
    assert sum(entry["labels"].values()) == 35 and set(entry["labels"]) == set(nli.LABELS)
    assert ps.keys("translate_test")["fr"]["langs"] == ["en", "en"]
    with pytest.raises(DataError, match="is text, not NLI pairs"):
        _text_set(ps).labels("t", "en")


@needs_xnli
def test_a_moses_tokenized_set_is_detokenized_before_tokenizing(tok_path, tmp_path):
    """SNLI's text is Moses-tokenized ("a cat , sleeping ."), XNLI's is not: data.detokenize
    names the sources to detokenize, so training and validation pairs read alike."""
    import sacremoses

    moses = sacremoses.MosesTokenizer("en")
    raw = nli.read_xnli_tsv(XNLI_DIR / "en.tsv@0:16")
    rows = [
        "\t".join([*(moses.tokenize(t, escape=False, return_str=True) for t in ex[:2]), "neutral"])
        for ex in raw
    ]
    (tmp_path / "tok.tsv").write_text("\n".join(rows) + "\n")
    tok = tokenizer_lib.Tokenizer.load(tok_path)

    def premises(**data):
        config = _config(tmp_path, train="en: tok.tsv@0:16", valid="", **data)
        out = tmp_path / f"p{len(data)}"
        prepare.prepare(config, out, root=str(tmp_path), tokenizer_path=tok_path)
        return [list(x) for x in prepared.PreparedSet.open(out).sentences("train", "en")[0]]

    detok = [xlm_bpe.moses_detokenize(r.split("\t")[0], "en") for r in rows]
    assert premises(detokenize="tok.tsv") == [list(x) for x in tok.encode_many(detok, "en")]
    as_written = premises()
    assert as_written != premises(detokenize="tok.tsv")
    assert detok == [ex.premise for ex in raw]  # the round trip gives back XNLI's own text
    with pytest.raises(DataError, match=r"data.detokenize names \['snli.tsv'\], not a source"):
        premises(detokenize="tok.tsv, snli.tsv")


def _text_set(ps: prepared.PreparedSet) -> prepared.PreparedSet:
    """``ps`` with its train entry passed off as text (no label counts)."""
    manifest = {**ps.manifest, "splits": {"t": {"en": {**ps.keys("train")["en"]}}}}
    del manifest["splits"]["t"]["en"]["labels"]
    return prepared.PreparedSet(ps.path, manifest)


@needs_xnli
def test_each_process_reads_only_the_pairs_of_its_rows(tok_path, tmp_path):
    config = _config(XNLI_DIR.parent, train="en: xnli/en.tsv@0:24; fr: xnli/fr.tsv@24:40")
    config.data.valid = "en: xnli/en.tsv@1990:1994"
    prepare.prepare(config, tmp_path / "p", root=config.data.root, tokenizer_path=tok_path)
    ps = prepared.PreparedSet.open(tmp_path / "p")
    sets = [
        nli.Pairs(*ps.sentences("train", k), ps.labels("train", k), i)
        for i, k in enumerate(ps.keys("train"))
    ]
    index = nli.padded(np.array([3, 30, 7, 25, 0, 39]), 8)  # two pad rows at the end
    whole = nli.batch_of(sets, index, max_len=64, length=64)
    reads_before = sum(p.premises.reads + p.hypotheses.reads for p in sets)
    halves = [nli.batch_of(sets, index[a:b], max_len=64, length=64) for a, b in ((0, 4), (4, 8))]
    for k, v in whole.items():
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v)
    assert sum(p.premises.reads + p.hypotheses.reads for p in sets) - reads_before == 12
    np.testing.assert_array_equal(whole["weights"][:, 0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(whole["langs"][:, 0], [0, 1, 0, 1, 0, 1, 0, 0])  # en, fr


@pytest.mark.parametrize(
    "line, message",
    [
        ("a premise\tentailment", r"bad\.tsv:3: 2 tab-separated column\(s\)"),
        ("a premise\ta hypothesis\tmaybe", r"bad\.tsv:3: unknown label 'maybe'"),
        ("a premise\t \tneutral", r"bad\.tsv:3: empty hypothesis"),
    ],
)
@needs_xnli
def test_a_bad_line_is_named_and_no_manifest_written(tok_path, tmp_path, line, message):
    good = ["p one\th one\tentailment", "p two\th two\tneutral", "p three\th three\tcontradiction"]
    (tmp_path / "bad.tsv").write_text("\n".join([*good[:2], line, good[2]]) + "\n")
    (tmp_path / "ok.tsv").write_text("\n".join(good) + "\n")
    config = _config(tmp_path, train="en: ok.tsv", valid="en: bad.tsv")
    with pytest.raises(DataError, match=message):
        prepare.prepare(config, tmp_path / "p", root=str(tmp_path), tokenizer_path=tok_path)
    assert not (tmp_path / "p" / prepared.MANIFEST).exists()


def test_xnli_batches_are_padded_to_the_bucket_of_their_longest_row():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 12, (2, 50))
    n[:, :4] = 35  # a few long pairs: most batches are short
    sides = [[np.arange(3, 3 + k, dtype=np.int32) for k in side] for side in n]
    pairs = nli.Pairs(*sides, np.arange(50) % 3, 0)
    config = xnli.default_config()
    config.max_len, config.batch_size, config.epoch_size = 32, 8, -1
    config.length_buckets = "16,48,40"
    buckets = xnli.buckets_of(config, 64)
    assert buckets == (16, 40, 48, 64)
    epochs, one_shape = xnli.Epochs(config, [pairs], buckets), xnli.Epochs(config, [pairs], (64,))
    lengths = pairs.lengths(32)  # each sentence cut to 30 tokens: rows of at most 63
    seen = []
    for step in range(epochs.steps):
        batch, wide = epochs.batch(step, (0, 8)), one_shape.batch(step, (0, 8))
        index = epochs.order(1)[step * 8 : step * 8 + 8]
        want = min(b for b in buckets if b >= lengths[index].max())
        assert batch["tokens"].shape == (8, want)
        for k, v in batch.items():  # the same rows, less padding
            np.testing.assert_array_equal(v, wide[k][:, : v.shape[1]])
        assert (wide["tokens"][:, want:] == nli.PAD_ID).all()
        seen.append(want)
    assert len(set(seen)) > 1
    with pytest.raises(ValueError, match="length_buckets='16,x'"):
        config.length_buckets = "16,x"
        xnli.buckets_of(config, 64)


def test_each_task_refuses_records_it_does_not_read():
    pre = tiny_config(**{"data.records": "nli"})
    with pytest.raises(DataError, match="data.records='nli': expected 'text' for this task"):
        pretrain.check(pre)
    fine = _config("/nowhere", train="en: a.tsv", valid="en: b.tsv", records="text")
    with pytest.raises(DataError, match="data.records='text': expected 'nli' for this task"):
        xnli._check_config(fine)
    fine.data.records = "csv"
    with pytest.raises(DataError, match="data.records='csv': expected 'text' or 'nli'"):
        prepare.records_of(fine)


def test_a_mid_epoch_resume_with_other_length_buckets_is_refused():
    config = xnli.default_config()
    before = xnli.order_inputs_of(config, 100)
    assert "length_buckets" not in before  # as runs saved it before buckets existed
    config.length_buckets = "32,64"
    after = xnli.order_inputs_of(config, 100)
    with pytest.raises(ValueError, match="length_buckets=None -> 32,64"):
        xnli.check_mid_epoch_resume(before, after, "checkpoint 5")
    with pytest.raises(ValueError, match="length_buckets=32,64 -> None"):
        xnli.check_mid_epoch_resume(after, before, "checkpoint 5")
    xnli.check_mid_epoch_resume(before, dict(before), "checkpoint 5")
