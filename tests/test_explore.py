"""Looking inside a model: masked-word predictions, attention maps, sentence vectors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlm_jax.data.toy import generate_toy_sentences
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.text.tokenizer import MASK_ID, N_SPECIAL, PAD_ID, train_tokenizer
from xlm_jax.tools import convert, explore, plots

LANGS = ["en", "fr"]


def make_workdir(path, *, n_layers: int = 2, seed: int = 0):
    """A pretraining workdir holding a random 2-layer model with a SentencePiece vocabulary
    learned on the toy corpus (what `Encoder.load` reads from any run)."""
    text = generate_toy_sentences(300, seed=seed)
    tokenizer = train_tokenizer(
        {lang: text[lang] for lang in LANGS},
        path / "spm.model",
        vocab_size=150,
        n_sentences=600,
        character_coverage=1.0,
    )
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        n_langs=len(LANGS),
        emb_dim=32,
        n_layers=n_layers,
        n_heads=4,
        max_positions=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    dummy = jnp.zeros((1, 4), jnp.int32)
    init = jax.jit(XLMEncoder(cfg).init)  # one compile rather than one per operation
    params = nn.meta.unbox(init(jax.random.key(seed), dummy, dummy, dummy))
    imported = convert.Imported(cfg, params["params"], LANGS, tokenizer, {"format": "test"})
    convert.write_workdir(imported, path / "wd", params_only=True)
    return path / "wd"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("explore"))


@pytest.fixture(scope="module")
def enc(workdir) -> explore.Encoder:
    return explore.Encoder.load(workdir)


def direct(enc: explore.Encoder, row):
    """The model on the unpadded row: (logits, attention (layers, heads, n, n))."""
    arrays = [jnp.asarray(a)[None] for a in row]
    apply = jax.jit(  # one compile rather than one per operation
        lambda params, *xs: enc.model.apply(
            {"params": params}, *xs, deterministic=True, mutable=["intermediates"]
        )
    )
    logits, state = apply(enc.params, *arrays)
    inter = state["intermediates"]
    attn = np.stack(
        [inter[f"layer_{i}"]["attention"]["attention_weights"][0][0] for i in range(len(inter))]
    )
    return np.asarray(logits[0]), attn


def test_mask_words():
    assert explore.mask_words("the cat sleeps .", [1, 3]) == "the <mask> sleeps <mask>"


def test_encode_puts_the_mask_token_where_the_text_says(enc):
    ids = enc.encode("the cat <mask> a ball <mask>", "en")
    assert list(np.flatnonzero(ids == MASK_ID)) == [len(enc.encode("the cat", "en")), len(ids) - 1]
    assert MASK_ID not in enc.encode("the cat sleeps", "en")


def test_fill_mask_is_the_models_softmax_at_the_mask(enc):
    text = "the <mask> finds a ball ."
    preds = explore.fill_mask(enc, text, "en", top_k=4)
    assert len(preds) == 1 and len(preds[0]) == 4
    row = explore.sentence_row(enc, enc.encode(text, "en"), "en")
    logits, _ = direct(enc, row)
    slot = int(np.flatnonzero(row[0] == MASK_ID)[0])
    probs = np.exp(logits[slot] - logits[slot].max())
    probs /= probs.sum()
    probs[:N_SPECIAL] = -1  # never listed
    best = np.argsort(-probs)[:4]
    assert [p.piece for p in preds[0]] == [enc.tokenizer.id_to_piece(int(i)) for i in best]
    np.testing.assert_allclose([p.prob for p in preds[0]], probs[best], rtol=1e-4)
    with pytest.raises(ValueError, match="no <mask>"):
        explore.fill_mask(enc, "no mask here", "en")


def test_fill_mask_with_a_translation_sees_it(enc):
    """TLM: the second sentence changes the prediction (it is in the attention context)."""
    text = "le <mask> trouve une balle ."
    alone = explore.fill_mask(enc, text, "fr", top_k=3)[0]
    paired = explore.fill_mask(enc, text, "fr", text2="the cat finds a ball .", lang2="en")[0]
    assert [p.prob for p in alone] != [p.prob for p in paired]


def test_attention_maps_of_a_pair_equal_the_unpadded_model(enc):
    maps = explore.attention_maps(enc, "the cat sleeps .", "en", "le <mask> dort .", "fr")
    n_src = len(enc.encode("the cat sleeps .", "en"))
    assert maps.boundary == n_src + 2
    assert maps.pieces[0] == maps.pieces[n_src + 1] == maps.pieces[maps.boundary] == "</s>"
    assert "<special1>" in maps.pieces[maps.boundary :]
    n = len(maps.pieces)
    assert maps.weights.shape == (2, 4, n, n) and maps.langs == ("en", "fr")
    np.testing.assert_allclose(maps.weights.sum(-1), 1.0, atol=1e-5)
    row = explore.pair_row(
        enc, enc.encode("the cat sleeps .", "en"), "en", enc.encode("le <mask> dort .", "fr"), "fr"
    )
    assert len(row[0]) == n  # the row is exactly the real tokens; run() pads it to 16
    _, attn = direct(enc, row)
    np.testing.assert_allclose(maps.weights, attn, atol=1e-5)


def test_links_and_shares_on_known_weights():
    pieces = ["</s>", "a", "</s>", "</s>", "x", "y", "</s>"]
    w = np.full((1, 2, 7, 7), 0.0, np.float32)
    w[0, :, 1, 5] = 0.6  # "a" looks at "y"
    w[0, :, 1, 4] = 0.1
    w[0, :, 1, 1] = 0.3
    maps = explore.AttentionMaps(pieces, w, boundary=3, langs=("en", "fr"))
    assert explore.strongest_links(maps) == [("a", "y", pytest.approx(0.6))]
    np.testing.assert_allclose(explore.cross_share(maps)[1], 0.7)
    with pytest.raises(ValueError, match="needs a pair"):
        explore.strongest_links(explore.AttentionMaps(pieces[:3], w[..., :3, :3], 3, ("en",)))


def test_sentence_vectors_are_mean_pooled_states_whatever_the_batching(enc):
    sentences = generate_toy_sentences(5, seed=3)["en"]
    vectors = explore.sentence_vectors(enc, sentences, "en", batch_size=4)
    assert vectors.shape == (5, 32)
    np.testing.assert_allclose(
        explore.sentence_vectors(enc, sentences, "en", batch_size=2), vectors, atol=1e-5
    )
    row = explore.sentence_row(enc, enc.encode(sentences[0], "en"), "en")
    encode = jax.jit(
        lambda params, *xs: enc.model.apply({"params": params}, *xs, method=XLMEncoder.encode)
    )
    hidden = np.asarray(encode(enc.params, *(jnp.asarray(x)[None] for x in row)))[0]
    real = row[0] != PAD_ID
    np.testing.assert_allclose(vectors[0], hidden[real].mean(axis=0), atol=1e-5)


def test_cosine_neighbours_rank_by_angle():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    idx, sim = explore.cosine_neighbours(np.array([[2.0, 0.1], [0.1, 1.0]]), keys, k=2)
    assert idx.tolist() == [[0, 2], [1, 2]]
    np.testing.assert_allclose(sim[0, 0], 2.0 / np.hypot(2.0, 0.1))
    assert explore.display_piece("\u2581cat") == "_cat" and explore.display_piece("ca@@") == "ca@@"
    assert explore.display_piece("<special1>") == "<mask>"


def test_the_plots_attention_command_on_a_workdir(workdir, enc, tmp_path, capsys):
    out = tmp_path / "attention.png"
    plots.main(
        ["attention", f"--workdir={workdir}", f"--out={out}", "--lang=fr", "--lang2=en",
         "le <mask> dort .", "the cat sleeps ."]
    )  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    # a line per token of the first sentence: the token, the one it attends to most, the weight
    tokens = [line.split("\t")[0] for line in printed[:-1]]
    assert tokens == enc.pieces(enc.encode("le <mask> dort .", "fr"))
