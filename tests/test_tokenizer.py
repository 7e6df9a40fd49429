import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from xlm_jax.data.toy import LANGS, write_toy_corpus
from xlm_jax.text.tokenizer import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    N_SPECIAL,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    load_or_train,
    sample_sentences,
    train_tokenizer,
)

VOCAB = 400
# Full character coverage: the default 0.9995 would map the rarest characters ('Z', '/') to <unk>.
TRAIN = dict(vocab_size=VOCAB, n_sentences=6000, seed=0, character_coverage=1.0)
LITERAL = "Literal <special1> and </s> and <pad> are just text."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("toy"), n_train=1500, n_val=50)


@pytest.fixture(scope="module")
def texts(corpus: Path) -> dict[str, list[str]]:
    out = {lang: (corpus / f"train.{lang}").read_text("utf-8").splitlines() for lang in LANGS}
    # SentencePiece's trainer cuts meta pieces out of its input, so '<', '>', '/', '1' need
    # another source to be learned as characters.
    out["en"] += [LITERAL, "Symbols like < and > or 1/2 occur in text too."] * 20
    return out


@pytest.fixture(scope="module")
def model(texts: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "sub" / "bpe.model"
    train_tokenizer(texts, path, **TRAIN)
    return path


def _foreign_model(**options: object) -> bytes:
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g", "a a b b c"] * 10),
        model_writer=writer,
        model_type="bpe",
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return writer.getvalue()


def test_special_ids(model: Path) -> None:
    tok = Tokenizer.load(model)
    expected = ["<s>", "</s>", "<pad>", "<unk>"] + [f"<special{i}>" for i in range(10)]
    assert [tok.id_to_piece(i) for i in range(N_SPECIAL)] == expected
    assert (BOS_ID, EOS_ID, PAD_ID, UNK_ID, MASK_ID) == (0, 1, 2, 3, 5)
    assert tok.piece_to_id("<special1>") == MASK_ID
    assert tok.piece_to_id("no-such-piece") == UNK_ID
    assert tok.vocab_size == VOCAB
    # Control symbols: literal text never becomes a special id (not even <unk>).
    ids = tok.encode(LITERAL)
    assert ids.min() >= N_SPECIAL
    assert tok.decode(ids) == LITERAL


def test_sampling_probabilities_and_counts() -> None:
    sizes = {"en": 1000, "fr": 300, "de": 50}
    texts = {lang: [f"{lang} {i}" for i in range(n)] for lang, n in sizes.items()}
    total = sum(sizes.values())
    for alpha in (0.0, 0.3, 0.5, 1.0):
        weights = {lang: (n / total) ** alpha for lang, n in sizes.items()}
        expected = {lang: w / sum(weights.values()) for lang, w in weights.items()}
        sample, probs = sample_sentences(texts, 2001, alpha, seed=7)
        assert probs.keys() == expected.keys()
        for lang in sizes:
            assert abs(probs[lang] - expected[lang]) < 1e-12
        counts = Counter(s.split()[0] for s in sample)
        assert counts == {lang: round(2001 * p) for lang, p in expected.items()}
        # Whole passes without replacement: k = q*n + r draws use r sentences q+1 times and the
        # other n-r sentences q times (q = 0: k distinct sentences).
        for lang, n in sizes.items():
            k = counts[lang]
            q, r = divmod(k, n)
            uses = Counter(s for s in sample if s.startswith(lang + " "))
            hist = Counter(uses.values()) + Counter({0: n - len(uses)})
            assert hist == Counter({q + 1: r, q: n - r})


def test_sampling_deterministic_and_order_free() -> None:
    texts = {"en": [f"e{i}" for i in range(100)], "fr": [f"f{i}" for i in range(40)]}
    reversed_texts = dict(reversed(texts.items()))
    a, pa = sample_sentences(texts, 90, 0.5, seed=1)
    b, pb = sample_sentences(reversed_texts, 90, 0.5, seed=1)
    c, _ = sample_sentences(texts, 90, 0.5, seed=2)
    assert a == b and pa == pb
    assert a != c
    assert len(set(a)) == len(a)  # fewer than n_l per language: no repeats


def test_sampling_errors() -> None:
    with pytest.raises(ValueError, match="'fr'"):
        sample_sentences({"en": ["a"], "fr": []}, 10, 0.5, 0)
    with pytest.raises(ValueError, match="at least one"):
        sample_sentences({}, 10, 0.5, 0)
    with pytest.raises(ValueError, match="alpha"):
        sample_sentences({"en": ["a"]}, 10, -1.0, 0)


def test_training_is_deterministic(
    texts: dict[str, list[str]], model: Path, tmp_path: Path
) -> None:
    again = train_tokenizer(texts, tmp_path / "again.model", **TRAIN)
    assert (tmp_path / "again.model").read_bytes() == model.read_bytes() == again.serialized
    assert not list(tmp_path.glob("*.tmp")) and not list(model.parent.glob("*.tmp"))
    # With these inputs the seed changes which sentences are sampled, hence the merges.
    other = train_tokenizer(texts, tmp_path / "other.model", **{**TRAIN, "seed": 1})
    assert other.serialized != again.serialized


def test_encode_decode_round_trip(corpus: Path, model: Path) -> None:
    tok = Tokenizer.load(model)
    val = [s for lang in LANGS for s in (corpus / f"val.{lang}").read_text("utf-8").splitlines()]
    encoded = tok.encode_many(val)
    assert len(encoded) == len(val) == 150
    for text, ids in zip(val, encoded, strict=True):
        assert ids.dtype == np.int32 and ids.ndim == 1
        np.testing.assert_array_equal(ids, tok.encode(text))
        assert ids.min() >= N_SPECIAL  # the toy alphabet is fully covered: no <unk>
        assert tok.decode(ids) == text
        # Framing and special ids are dropped, and decoding does not stop at </s>.
        framed = np.concatenate([[EOS_ID], ids, [EOS_ID, PAD_ID, MASK_ID], ids])
        assert tok.decode(framed) == text + " " + text
    assert tok.encode("").shape == (0,)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([VOCAB])
    with pytest.raises(TypeError):
        tok.encode_many("not a list")


def test_serialized_and_sha(model: Path) -> None:
    tok = Tokenizer.load(model)
    data = model.read_bytes()
    assert tok.serialized == data
    assert tok.sha256 == hashlib.sha256(data).hexdigest()
    assert Tokenizer.from_bytes(data).sha256 == tok.sha256


def test_foreign_models_are_rejected(tmp_path: Path) -> None:
    default_ids = _foreign_model()  # spm defaults: <unk>=0, <s>=1, </s>=2, no <pad>
    with pytest.raises(ValueError, match="special ids.*unk_id is 0, expected 3"):
        Tokenizer.from_bytes(default_ids)
    path = tmp_path / "foreign.model"
    path.write_bytes(default_ids)
    with pytest.raises(ValueError, match="foreign.model"):
        Tokenizer.load(path)
    # Right ids, but user-defined (not control) specials would tokenize literal "<special1>".
    user_defined = _foreign_model(
        bos_id=0,
        eos_id=1,
        pad_id=2,
        unk_id=3,
        user_defined_symbols=[f"<special{i}>" for i in range(10)],
    )
    with pytest.raises(ValueError, match="'<special0>'.* not a control symbol"):
        Tokenizer.from_bytes(user_defined)
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer.from_bytes(b"definitely not a model")


def test_load_or_train(texts: dict[str, list[str]], tmp_path: Path) -> None:
    path = tmp_path / "bpe.model"
    calls = []

    def texts_fn() -> dict[str, list[str]]:
        calls.append(1)
        return texts

    kwargs = dict(vocab_size=VOCAB, n_sentences=3000, seed=0)
    first = load_or_train(path, texts_fn, **kwargs)
    assert calls == [1] and path.read_bytes() == first.serialized
    mtime = path.stat().st_mtime_ns

    def must_not_be_called() -> dict[str, list[str]]:
        raise AssertionError("retrained although the model exists")

    # Different options do not matter: a resumed run keeps the vocabulary on disk.
    resumed = load_or_train(path, must_not_be_called, vocab_size=VOCAB + 100, seed=5)
    assert resumed.sha256 == first.sha256
    assert path.stat().st_mtime_ns == mtime
