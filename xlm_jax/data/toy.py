"""A generated, line-aligned parallel toy corpus (en/fr/de) so the demo runs offline with no data.

This is SYNTHETIC text for demos and tests only: a hand-written lexicon of ~80 words and a few
sentence templates, realised with simplified (but plausible) grammar. Line i of every language is a
translation of line i. It is not a benchmark and says nothing about real translation quality.

The templates deliberately exercise places where the languages differ: French colour adjectives
follow the noun, German inverts subject and verb after a fronted adverb (V2), puts the verb last
in a `dass` clause and `nicht` after a definite object, French negation is `ne … pas (de)`, and
articles and adjectives agree in gender, number and (German) case.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from xlm_jax.core.files import write_atomic

LANGS: tuple[str, ...] = ("en", "fr", "de")
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Noun:
    en: str
    en_pl: str
    fr: str
    fr_pl: str
    fr_g: str  # "m" | "f"
    de: str
    de_pl: str
    de_g: str  # "m" | "f" | "n"
    kind: str  # "a" animal, "p" person, "t" thing or place: which adjectives make sense


@dataclass(frozen=True)
class _Adj:
    en: str
    fr: tuple[str, str, str, str]  # masc sg, fem sg, masc pl, fem pl
    fr_pre: bool  # French position: before the noun (petit, grand …) or after (colours)
    de: str  # stem; the ending depends on article, case, gender
    kinds: str  # noun kinds it may describe (no "young box", no "green woman")
    fr_ms_vowel: str | None = None  # masc sg form before a vowel: "vieil", "bel"


@dataclass(frozen=True)
class _Verb:
    en3: str  # "sees"
    en: str  # "see" (plural, after "does")
    fr3: str
    fr3pl: str
    de3: str
    de3pl: str


def _n(*fields: str) -> _Noun:
    return _Noun(*fields) if len(fields) == 9 else _Noun(*fields, kind="t")


_ANIMATES = (
    _n("dog", "dogs", "chien", "chiens", "m", "Hund", "Hunde", "m", "a"),
    _n("cat", "cats", "chat", "chats", "m", "Katze", "Katzen", "f", "a"),
    _n("bird", "birds", "oiseau", "oiseaux", "m", "Vogel", "Vögel", "m", "a"),
    _n("horse", "horses", "cheval", "chevaux", "m", "Pferd", "Pferde", "n", "a"),
    _n("child", "children", "enfant", "enfants", "m", "Kind", "Kinder", "n", "p"),
    _n("girl", "girls", "fille", "filles", "f", "Mädchen", "Mädchen", "n", "p"),
    _n("woman", "women", "femme", "femmes", "f", "Frau", "Frauen", "f", "p"),
    _n("man", "men", "homme", "hommes", "m", "Mann", "Männer", "m", "p"),
    _n("teacher", "teachers", "professeur", "professeurs", "m", "Lehrer", "Lehrer", "m", "p"),
    _n("mouse", "mice", "souris", "souris", "f", "Maus", "Mäuse", "f", "a"),
)
_THINGS = (
    _n("ball", "balls", "balle", "balles", "f", "Ball", "Bälle", "m"),
    _n("book", "books", "livre", "livres", "m", "Buch", "Bücher", "n"),
    _n("apple", "apples", "pomme", "pommes", "f", "Apfel", "Äpfel", "m"),
    _n("hat", "hats", "chapeau", "chapeaux", "m", "Hut", "Hüte", "m"),
    _n("cup", "cups", "tasse", "tasses", "f", "Tasse", "Tassen", "f"),
    _n("box", "boxes", "boîte", "boîtes", "f", "Kiste", "Kisten", "f"),
    _n("car", "cars", "voiture", "voitures", "f", "Auto", "Autos", "n"),
    _n("key", "keys", "clé", "clés", "f", "Schlüssel", "Schlüssel", "m"),
    _n("letter", "letters", "lettre", "lettres", "f", "Brief", "Briefe", "m"),
    _n("flower", "flowers", "fleur", "fleurs", "f", "Blume", "Blumen", "f"),
)
_PLACES = (
    _n("table", "tables", "table", "tables", "f", "Tisch", "Tische", "m"),
    _n("chair", "chairs", "chaise", "chaises", "f", "Stuhl", "Stühle", "m"),
    _n("tree", "trees", "arbre", "arbres", "m", "Baum", "Bäume", "m"),
    _n("house", "houses", "maison", "maisons", "f", "Haus", "Häuser", "n"),
    _n("bed", "beds", "lit", "lits", "m", "Bett", "Betten", "n"),
    _n("bridge", "bridges", "pont", "ponts", "m", "Brücke", "Brücken", "f"),
    _n("window", "windows", "fenêtre", "fenêtres", "f", "Fenster", "Fenster", "n"),
    _n("garden", "gardens", "jardin", "jardins", "m", "Garten", "Gärten", "m"),
    _n("door", "doors", "porte", "portes", "f", "Tür", "Türen", "f"),
)
_ADJS = (
    _Adj("small", ("petit", "petite", "petits", "petites"), True, "klein", "apt"),
    _Adj("big", ("grand", "grande", "grands", "grandes"), True, "groß", "apt"),
    _Adj("old", ("vieux", "vieille", "vieux", "vieilles"), True, "alt", "apt", "vieil"),
    _Adj("young", ("jeune", "jeune", "jeunes", "jeunes"), True, "jung", "ap"),
    _Adj("beautiful", ("beau", "belle", "beaux", "belles"), True, "schön", "apt", "bel"),
    _Adj("red", ("rouge", "rouge", "rouges", "rouges"), False, "rot", "at"),
    _Adj("blue", ("bleu", "bleue", "bleus", "bleues"), False, "blau", "at"),
    _Adj("green", ("vert", "verte", "verts", "vertes"), False, "grün", "at"),
    _Adj("black", ("noir", "noire", "noirs", "noires"), False, "schwarz", "at"),
    _Adj("white", ("blanc", "blanche", "blancs", "blanches"), False, "weiß", "at"),
    _Adj("yellow", ("jaune", "jaune", "jaunes", "jaunes"), False, "gelb", "at"),
)
_TRANSITIVE = (
    _Verb("sees", "see", "voit", "voient", "sieht", "sehen"),
    _Verb("likes", "like", "aime", "aiment", "mag", "mögen"),
    _Verb("has", "have", "a", "ont", "hat", "haben"),
    _Verb("finds", "find", "trouve", "trouvent", "findet", "finden"),
    _Verb("takes", "take", "prend", "prennent", "nimmt", "nehmen"),
    _Verb("carries", "carry", "porte", "portent", "trägt", "tragen"),
    _Verb("looks for", "look for", "cherche", "cherchent", "sucht", "suchen"),
    _Verb("buys", "buy", "achète", "achètent", "kauft", "kaufen"),
)
_INTRANSITIVE = (
    _Verb("sleeps", "sleep", "dort", "dorment", "schläft", "schlafen"),
    _Verb("plays", "play", "joue", "jouent", "spielt", "spielen"),
    _Verb("waits", "wait", "attend", "attendent", "wartet", "warten"),
    _Verb("eats", "eat", "mange", "mangent", "isst", "essen"),
    _Verb("sings", "sing", "chante", "chantent", "singt", "singen"),
    _Verb("runs", "run", "court", "courent", "läuft", "laufen"),
)
# (en, fr, de) — location prepositions; German takes the dative after all of them here.
_PREPS = (
    ("on", "sur", "auf"),
    ("under", "sous", "unter"),
    ("next to", "à côté de", "neben"),
    ("behind", "derrière", "hinter"),
    ("in front of", "devant", "vor"),
)
_NUMBERS = (
    ("two", "deux", "zwei"),
    ("three", "trois", "drei"),
    ("four", "quatre", "vier"),
    ("five", "cinq", "fünf"),
)
_ADVERBS = (
    ("today", "aujourd'hui", "heute"),
    ("every day", "chaque jour", "jeden Tag"),
    ("now", "maintenant", "jetzt"),
    ("in the morning", "le matin", "morgens"),
    ("in the evening", "le soir", "abends"),
    ("sometimes", "parfois", "manchmal"),
)
# Main clause introducing a subordinate one: (en, fr, de).
_CLAUSES = (
    ("I think that", "je pense que", "ich denke , dass"),
    ("she says that", "elle dit que", "sie sagt , dass"),
    ("we know that", "nous savons que", "wir wissen , dass"),
    ("he sees that", "il voit que", "er sieht , dass"),
    ("they believe that", "ils croient que", "sie glauben , dass"),
)

# German articles and adjective endings by (determiner, case) → gender (m, f, n).
_DE_ARTICLE = {
    ("def", "nom"): ("der", "die", "das"),
    ("def", "acc"): ("den", "die", "das"),
    ("def", "dat"): ("dem", "der", "dem"),
    ("indef", "nom"): ("ein", "eine", "ein"),
    ("indef", "acc"): ("einen", "eine", "ein"),
    ("indef", "dat"): ("einem", "einer", "einem"),
}
_DE_ENDING = {
    ("def", "nom"): ("e", "e", "e"),
    ("def", "acc"): ("en", "e", "e"),
    ("def", "dat"): ("en", "en", "en"),
    ("indef", "nom"): ("er", "e", "es"),
    ("indef", "acc"): ("en", "e", "es"),
    ("indef", "dat"): ("en", "en", "en"),
}
_GENDER_INDEX = {"m": 0, "f": 1, "n": 2}
_FR_VOWELS = tuple("aeiouhéèêàâîôû")  # the only h-words in the lexicon (homme) are h muet
_FR_ELIDING = {"le": "l'", "la": "l'", "de": "d'", "que": "qu'", "ne": "n'", "je": "j'"}


@dataclass(frozen=True)
class _NP:
    noun: _Noun
    adj: _Adj | None
    det: str  # "def" | "indef" | "neg" (no/kein/pas de) | "num"
    number: tuple[str, str, str] | None = None  # set iff det == "num" (plural)


# --- realisation ---------------------------------------------------------------------------------


def _en_np(np_: _NP) -> list[str]:
    plural = np_.det == "num"
    words = [np_.adj.en] if np_.adj else []
    words.append(np_.noun.en_pl if plural else np_.noun.en)
    if np_.det == "def":
        det = "the"
    elif np_.det == "num":
        det = np_.number[0]
    else:  # "does not see a ball": English negates the verb, not the article
        det = "an" if words[0][0] in "aeiou" else "a"
    return [det, *words]


def _fr_np(np_: _NP) -> list[str]:
    n, plural = np_.noun, np_.det == "num"
    noun = n.fr_pl if plural else n.fr
    adj: list[str] = []
    if np_.adj is not None:
        form = np_.adj.fr[(n.fr_g == "f") + 2 * plural]
        if (
            np_.adj.fr_pre
            and not plural
            and n.fr_g == "m"
            and np_.adj.fr_ms_vowel
            and noun.startswith(_FR_VOWELS)
        ):
            form = np_.adj.fr_ms_vowel
        adj = [form]
    body = [*adj, noun] if np_.adj is None or np_.adj.fr_pre else [noun, *adj]
    if np_.det == "def":
        det = "le" if n.fr_g == "m" else "la"
    elif np_.det == "indef":
        det = "un" if n.fr_g == "m" else "une"
    elif np_.det == "neg":
        det = "de"  # "ne … pas de balle"
    else:
        det = np_.number[1]
    return [det, *body]


def _de_np(np_: _NP, case: str) -> list[str]:
    n = np_.noun
    if np_.det == "num":  # plural without article: strong ending -e (nominative only here)
        adj = [np_.adj.de + "e"] if np_.adj else []
        return [np_.number[2], *adj, n.de_pl]
    g = _GENDER_INDEX[n.de_g]
    kind = "def" if np_.det == "def" else "indef"  # "kein" declines like "ein"
    art = _DE_ARTICLE[kind, case][g]
    if np_.det == "neg":
        art = "k" + art
    adj = [np_.adj.de + _DE_ENDING[kind, case][g]] if np_.adj else []
    return [art, *adj, n.de]


def _de_pp(prep: tuple[str, str, str], place: _NP) -> list[str]:
    return [prep[2], *_de_np(place, "dat")]


def _fr_finish(words: list[str]) -> list[str]:
    """Elision (le arbre → l'arbre, que un → qu'un) then contraction (de le → du)."""
    words = [w for phrase in words for w in phrase.split(" ")]
    out: list[str] = []
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        out.append(_FR_ELIDING[w] if w in _FR_ELIDING and nxt.startswith(_FR_VOWELS) else w)
    merged: list[str] = []
    for w in out:
        if merged and merged[-1] == "de" and w == "le":
            merged[-1] = "du"
        else:
            merged.append(w)
    return merged


def _join(words: list[str], end: str) -> str:
    text = ""
    for w in (w for phrase in words for w in phrase.split(" ")):
        if not text or text.endswith("'") or w == ",":  # l'arbre, "denke, dass"
            text += w
        else:
            text += " " + w
    text += end
    return text[0].upper() + text[1:]


# --- sentence plans ------------------------------------------------------------------------------


class _Picker:
    """Uniform choices from `random.Random.random()` only: the one method whose sequence Python
    guarantees across versions, so the corpus does not change with the interpreter."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def choice(self, options: Sequence[_T]) -> _T:
        return options[int(self._rng.random() * len(options))]

    def coin(self, p: float) -> bool:
        return self._rng.random() < p


def _np(pick: _Picker, nouns: Sequence[_Noun], det: str, p_adj: float) -> _NP:
    noun = pick.choice(nouns)
    adjs = [a for a in _ADJS if noun.kind in a.kinds]
    adj = pick.choice(adjs) if pick.coin(p_adj) else None
    return _NP(noun, adj, det, pick.choice(_NUMBERS) if det == "num" else None)


def _sentence(pick: _Picker) -> tuple[str, str, str]:
    """One random sentence as (en, fr, de)."""
    kind = pick.choice(("svo", "svo", "plural", "adverb", "that", "neg", "question"))
    subj = _np(pick, _ANIMATES, pick.choice(("def", "indef")), 0.5)
    obj = _np(pick, _THINGS, pick.choice(("def", "indef")), 0.5)
    prep = pick.choice(_PREPS)
    place = _np(pick, _PLACES, "def", 0.25)
    with_pp = pick.coin(0.5)
    tv, iv = pick.choice(_TRANSITIVE), pick.choice(_INTRANSITIVE)
    en_pp = [prep[0], *_en_np(place)] if with_pp else []
    fr_pp = [prep[1], *_fr_np(place)] if with_pp else []
    de_pp = _de_pp(prep, place) if with_pp else []
    s_en, s_fr, s_de = _en_np(subj), _fr_np(subj), _de_np(subj, "nom")
    o_en, o_fr, o_de = _en_np(obj), _fr_np(obj), _de_np(obj, "acc")
    end = (".", ".", ".")

    if kind == "svo":
        en = [*s_en, tv.en3, *o_en, *en_pp]
        fr = [*s_fr, tv.fr3, *o_fr, *fr_pp]
        de = [*s_de, tv.de3, *o_de, *de_pp]
    elif kind == "plural":  # "three black cats sleep under the tree"
        subj = _np(pick, _ANIMATES, "num", 0.6)
        en_pp, fr_pp, de_pp = (
            [prep[0], *_en_np(place)],
            [prep[1], *_fr_np(place)],
            _de_pp(prep, place),
        )
        en = [*_en_np(subj), iv.en, *en_pp]
        fr = [*_fr_np(subj), iv.fr3pl, *fr_pp]
        de = [*_de_np(subj, "nom"), iv.de3pl, *de_pp]
    elif kind == "adverb":  # German V2: "heute sieht der Hund …"
        adv = pick.choice(_ADVERBS)
        en = [adv[0], *s_en, tv.en3, *o_en]
        fr = [adv[1], *s_fr, tv.fr3, *o_fr]
        de = [adv[2], tv.de3, *s_de, *o_de]
    elif kind == "that":  # German verb-final subordinate clause
        intro = pick.choice(_CLAUSES)
        if pick.coin(0.5):
            en = [intro[0], *s_en, tv.en3, *o_en, *en_pp]
            fr = [intro[1], *s_fr, tv.fr3, *o_fr, *fr_pp]
            de = [intro[2], *s_de, *o_de, *de_pp, tv.de3]
        else:
            en_pp, fr_pp, de_pp = (
                [prep[0], *_en_np(place)],
                [prep[1], *_fr_np(place)],
                _de_pp(prep, place),
            )
            en = [intro[0], *s_en, iv.en3, *en_pp]
            fr = [intro[1], *s_fr, iv.fr3, *fr_pp]
            de = [intro[2], *s_de, *de_pp, iv.de3]
    elif kind == "neg":
        if obj.det == "indef":  # "ne voit pas de balle" / "sieht keinen Ball"
            neg = _NP(obj.noun, obj.adj, "neg")
            en = [*s_en, "does not", tv.en, *o_en, *en_pp]
            fr = [*s_fr, "ne", tv.fr3, "pas", *_fr_np(neg), *fr_pp]
            de = [*s_de, tv.de3, *_de_np(neg, "acc"), *de_pp]
        else:  # definite object: "sieht den Ball nicht"
            en = [*s_en, "does not", tv.en, *o_en]
            fr = [*s_fr, "ne", tv.fr3, "pas", *o_fr]
            de = [*s_de, tv.de3, *o_de, "nicht"]
    else:  # yes/no question; German puts the verb first, French uses "est-ce que"
        en = ["does", *s_en, tv.en, *o_en, *en_pp]
        fr = ["est-ce que", *s_fr, tv.fr3, *o_fr, *fr_pp]
        de = [tv.de3, *s_de, *o_de, *de_pp]
        end = ("?", " ?", "?")  # French typography puts a space before "?"

    return _join(en, end[0]), _join(_fr_finish(fr), end[1]), _join(de, end[2])


def generate_toy_sentences(n: int, seed: int = 0) -> dict[str, list[str]]:
    """`n` distinct parallel sentences per language in `LANGS`, deterministic for `seed`.

    The first k sentences do not depend on `n`, so a longer corpus extends a shorter one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pick = _Picker(seed)
    seen: set[str] = set()
    out: dict[str, list[str]] = {lang: [] for lang in LANGS}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 20 * n + 1000:  # the template space is millions of sentences; never hit
            raise ValueError(f"could not generate {n} distinct toy sentences")
        triple = _sentence(pick)
        if triple[0] in seen:  # distinct lines keep val disjoint from train
            continue
        seen.add(triple[0])
        for lang, text in zip(LANGS, triple, strict=True):
            out[lang].append(text)
    return out


def _write_if_changed(path: Path, content: str) -> None:
    data = content.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return  # idempotent: keep the file (and its mtime) untouched
    write_atomic(path, data)


def write_toy_corpus(
    directory: str | os.PathLike,
    *,
    langs: Sequence[str] = LANGS,
    n_train: int = 4000,
    n_val: int = 300,
    seed: int = 0,
) -> Path:
    """Writes `train.{lang}` and `val.{lang}` (UTF-8, one sentence per line) into `directory`.

    Lines are aligned across languages and no sentence occurs twice (val is disjoint from train).
    Files whose content is already correct are not rewritten. Returns the directory.
    """
    unknown = [lang for lang in langs if lang not in LANGS]
    if unknown or not langs:
        raise ValueError(f"toy corpus languages must be a non-empty subset of {LANGS}, got {langs}")
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got {n_train}, {n_val}")
    sents = generate_toy_sentences(n_train + n_val, seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        lines = sents[lang]
        for split, part in (("train", lines[:n_train]), ("val", lines[n_train:])):
            _write_if_changed(out / f"{split}.{lang}", "".join(s + "\n" for s in part))
    return out
