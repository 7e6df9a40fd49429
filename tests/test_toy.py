import os
from pathlib import Path

import pytest

from xlm_jax.data import toy
from xlm_jax.data.toy import LANGS, generate_toy_sentences, write_toy_corpus


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _read(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_files_are_aligned_and_counted(tmp_path: Path) -> None:
    out = write_toy_corpus(tmp_path / "toy", n_train=500, n_val=40, seed=3)
    assert out == tmp_path / "toy"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{split}.{lang}" for split in ("train", "val") for lang in LANGS
    )
    for split, n in (("train", 500), ("val", 40)):
        per_lang = {lang: _lines(out / f"{split}.{lang}") for lang in LANGS}
        assert all(len(lines) == n for lines in per_lang.values())
        for en, fr, de in zip(*per_lang.values(), strict=True):
            assert en and fr and de and "  " not in en + fr + de
            # Translations share the sentence type: questions stay questions.
            assert en.endswith("?") == fr.endswith(" ?") == de.endswith("?")
            assert en[-1] in ".?" and en[0].isupper() and de[0].isupper()
    train = set(_lines(out / "train.en"))
    assert len(train) == 500  # distinct lines …
    assert train.isdisjoint(_lines(out / "val.en"))  # … so val never leaks into train
    assert any(c in (out / "train.de").read_text(encoding="utf-8") for c in "äöüß")


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = _read(write_toy_corpus(tmp_path / "a", n_train=200, n_val=20, seed=0))
    b = _read(write_toy_corpus(tmp_path / "b", n_train=200, n_val=20, seed=0))
    c = _read(write_toy_corpus(tmp_path / "c", n_train=200, n_val=20, seed=1))
    assert a == b
    assert a["train.en"] != c["train.en"]
    # A longer corpus extends a shorter one; a language subset has the same lines.
    longer = generate_toy_sentences(300, seed=0)
    assert _lines(tmp_path / "a" / "train.fr") == longer["fr"][:200]
    only_de = write_toy_corpus(tmp_path / "d", langs=("de",), n_train=200, n_val=20, seed=0)
    assert _read(only_de) == {k: v for k, v in a.items() if k.endswith(".de")}


def test_idempotent(tmp_path: Path) -> None:
    out = write_toy_corpus(tmp_path, n_train=100, n_val=10)
    old = 1_000_000_000
    for p in out.iterdir():
        os.utime(p, ns=(old, old))
    before = _read(out)
    write_toy_corpus(tmp_path, n_train=100, n_val=10)
    assert all(p.stat().st_mtime_ns == old for p in out.iterdir())  # nothing rewritten
    (out / "val.fr").write_text("corrupted\n", encoding="utf-8")
    write_toy_corpus(tmp_path, n_train=100, n_val=10)
    assert _read(out) == before
    assert (out / "train.en").stat().st_mtime_ns == old
    assert not list(out.glob("*.tmp"))


def test_grammar_spot_checks() -> None:
    # Hand-checked realisations of the pieces the templates are made of.
    dog, tree = toy._ANIMATES[0], toy._PLACES[2]
    table, man = toy._PLACES[0], toy._ANIMATES[7]
    small, old, red = toy._ADJS[0], toy._ADJS[2], toy._ADJS[5]
    assert toy._en_np(toy._NP(dog, small, "indef")) == ["a", "small", "dog"]
    assert toy._en_np(toy._NP(man, old, "indef")) == ["an", "old", "man"]
    assert toy._fr_np(toy._NP(dog, red, "def")) == ["le", "chien", "rouge"]
    assert toy._fr_np(toy._NP(man, old, "indef")) == ["un", "vieil", "homme"]
    assert toy._de_np(toy._NP(dog, red, "indef"), "acc") == ["einen", "roten", "Hund"]
    assert toy._de_np(toy._NP(dog, red, "neg"), "acc") == ["keinen", "roten", "Hund"]
    assert toy._de_np(toy._NP(table, None, "def"), "dat") == ["dem", "Tisch"]
    two = toy._NUMBERS[0]
    assert toy._de_np(toy._NP(dog, small, "num", two), "nom") == ["zwei", "kleine", "Hunde"]
    assert toy._fr_np(toy._NP(dog, red, "num", two)) == ["deux", "chiens", "rouges"]
    fr = toy._fr_finish(["que", "le", "chien", "ne", "a", "pas", "à côté de", "le", "arbre"])
    assert toy._join(fr, " ?") == "Que le chien n'a pas à côté de l'arbre ?"
    assert toy._join(toy._fr_finish(["à côté de", "le", "pont"]), ".") == "À côté du pont."
    assert (
        toy._join(["ich denke , dass", *toy._de_np(toy._NP(tree, None, "def"), "nom")], ".")
        == "Ich denke, dass der Baum."
    )


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="subset"):
        write_toy_corpus(tmp_path, langs=("en", "xx"))
    with pytest.raises(ValueError, match="n_train"):
        write_toy_corpus(tmp_path, n_train=0)
