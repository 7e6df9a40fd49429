"""Look inside a pretrained XLM: masked-word predictions, sentence vectors and their cross-lingual
nearest neighbours, attention maps of a TLM pair.

    enc = Encoder.load("/tmp/xlm_demo")                  # a pretraining or imported workdir
    fill_mask(enc, "the <mask> eats an apple .", "en")   # top pieces for each <mask>
    maps = attention_maps(enc, "the cat sleeps .", "en", "le <mask> dort .", "fr")
    strongest_links(maps)                                # which word each word looks at most

Rows are laid out as in training: one sentence is ``</s> w… </s>`` (an MLM stream's sentence), a
pair is a TLM row ``</s> a </s></s> b </s>`` with positions restarting in the second sentence and
each sentence's own language id (``batches.pack_pair``). Used by the notebooks in notebooks/ and
by ``python -m xlm_jax.plots attention`` and ``python -m xlm_jax.embed``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xlm_jax.data import batches, nli
from xlm_jax.model import pretrained
from xlm_jax.model.encoder import POOLINGS, XLMEncoder, pooled
from xlm_jax.tasks import retrieval
from xlm_jax.text.tokenizer import MASK_ID, N_SPECIAL, PAD_ID, SPECIAL_PIECES

MASK = "<mask>"  # in text given to this module: one masked token


class Prediction(NamedTuple):
    piece: str  # the vocabulary entry (SentencePiece "▁word" / XLM "wo@@")
    prob: float


@dataclasses.dataclass
class Encoder:
    """A pretrained encoder ready for inspection: its tokenizer, languages and parameters."""

    source: pretrained.EncoderSource
    params: Any  # device arrays

    @classmethod
    def load(cls, workdir: str | os.PathLike, step: int = -1) -> Encoder:
        """The run's best checkpoint by its own metric (else the latest), or ``step``."""
        source = pretrained.load_pretrained(workdir, step)
        return cls(source, jax.device_put(source.params))

    @property
    def model(self) -> XLMEncoder:
        # Only the explicit attention materialises (and sows) its weights; how attention runs
        # and what is recomputed are runtime choices that do not change the parameters.
        cfg = self.source.model
        names = {f.name for f in dataclasses.fields(cfg)}
        runtime = {"attention_impl": "explicit", "remat": "none"}
        return XLMEncoder(
            dataclasses.replace(cfg, **{k: v for k, v in runtime.items() if k in names})
        )

    @property
    def tokenizer(self):
        return self.source.tokenizer

    @property
    def langs(self) -> list[str]:
        return self.source.langs

    def lang_id(self, lang: str) -> int:
        return self.source.lang_id(lang, "explore")

    def encode(self, text: str, lang: str) -> np.ndarray:
        """Token ids of ``text``; each ``<mask>`` becomes the mask token (id 5)."""
        parts = [p.strip() for p in text.split(MASK)]
        out: list[np.ndarray] = []
        for i, part in enumerate(parts):
            if i:
                out.append(np.array([MASK_ID], np.int32))
            if part:
                out.append(np.asarray(self.tokenizer.encode(part, lang), np.int32))
        return np.concatenate(out) if out else np.zeros(0, np.int32)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_piece(int(i)) for i in ids]

    @functools.cached_property
    def _forward(self):
        """Jitted (tokens, positions, langs) → (logits, attention weights per layer)."""
        model = self.model

        def forward(params, tokens, positions, langs):
            logits, state = model.apply(
                {"params": params},
                tokens,
                positions,
                langs,
                deterministic=True,
                mutable=["intermediates"],
            )
            weights = [
                state["intermediates"][f"layer_{i}"]["attention"]["attention_weights"][0]
                for i in range(model.config.n_layers)
            ]
            return logits, jnp.stack(weights, axis=1)  # (batch, layers, heads, q, k)

        return jax.jit(forward)

    def run(self, row: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One packed row → (logits ``(n, vocab)``, attention ``(layers, heads, n, n)``) over its
        ``n`` real tokens. Rows are padded to a multiple of 16 so few shapes compile."""
        tokens, positions, langs = row
        n = int(np.count_nonzero(tokens != PAD_ID))
        length = -(-len(tokens) // 16) * 16
        pad = length - len(tokens)
        arrays = [
            np.pad(a, (0, pad), constant_values=PAD_ID if k == 0 else 0)[None]
            for k, a in enumerate((tokens, positions, langs))
        ]
        logits, attn = jax.device_get(self._forward(self.params, *arrays))
        return logits[0, :n], attn[0, :, :, :n, :n]


def sentence_row(enc: Encoder, ids: np.ndarray, lang: str) -> tuple[np.ndarray, ...]:
    """``</s> ids </s>`` with positions 0..n-1 and the language's id."""
    return nli.pack_sentence(ids, enc.lang_id(lang), max_len=len(ids) + 2, length=len(ids) + 2)


def pair_row(
    enc: Encoder, ids: np.ndarray, lang: str, ids2: np.ndarray, lang2: str
) -> tuple[np.ndarray, ...]:
    """The TLM row of a translation pair (``batches.pack_pair``)."""
    return batches.pack_pair(
        ids, ids2, enc.lang_id(lang), enc.lang_id(lang2), len(ids) + len(ids2) + 4
    )


def mask_words(text: str, indices: Sequence[int]) -> str:
    """``text`` with its whitespace-separated words at ``indices`` replaced by ``<mask>``."""
    words = text.split()
    for i in indices:
        words[i] = MASK
    return " ".join(words)


def fill_mask(
    enc: Encoder,
    text: str,
    lang: str,
    *,
    text2: str | None = None,
    lang2: str | None = None,
    top_k: int = 5,
) -> list[list[Prediction]]:
    """The ``top_k`` most probable vocabulary pieces at every ``<mask>`` of ``text`` (MLM), or of
    the pair ``text`` + ``text2`` (TLM: the translation is in context), left to right.

    Probabilities are the model's softmax over the whole vocabulary; special symbols are left out
    of the list (the model is never trained to predict them).
    """
    ids = enc.encode(text, lang)
    if text2 is None:
        row = sentence_row(enc, ids, lang)
    else:
        row = pair_row(enc, ids, lang, enc.encode(text2, lang2 or lang), lang2 or lang)
    slots = np.flatnonzero(row[0] == MASK_ID)
    if not len(slots):
        raise ValueError(f"no {MASK} in {text!r}" + (f" / {text2!r}" if text2 else ""))
    logits, _ = enc.run(row)
    out = []
    for slot in slots:
        z = logits[slot].astype(np.float64)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        probs[:N_SPECIAL] = -1.0
        best = np.argsort(-probs)[:top_k]
        out.append([Prediction(enc.tokenizer.id_to_piece(int(i)), float(probs[i])) for i in best])
    return out


@dataclasses.dataclass
class AttentionMaps:
    """Self-attention of one row: ``weights[layer, head, query, key]`` over its real tokens."""

    pieces: list[str]
    weights: np.ndarray
    boundary: int  # index of the second sentence's first token (== len(pieces) if none)
    langs: tuple[str, ...]

    @property
    def n_layers(self) -> int:
        return self.weights.shape[0]


def attention_maps(
    enc: Encoder, text: str, lang: str, text2: str | None = None, lang2: str | None = None
) -> AttentionMaps:
    """Attention weights of every layer and head for ``text`` (an MLM row) or the TLM pair
    ``text`` + ``text2``; ``<mask>`` in either text is the mask token."""
    ids = enc.encode(text, lang)
    if text2 is None:
        row, boundary, langs = sentence_row(enc, ids, lang), len(ids) + 2, (lang,)
    else:
        lang2 = lang2 or lang
        row = pair_row(enc, ids, lang, enc.encode(text2, lang2), lang2)
        boundary, langs = len(ids) + 2, (lang, lang2)
    _, attn = enc.run(row)
    n = attn.shape[-1]
    return AttentionMaps(enc.pieces(row[0][:n]), np.asarray(attn, np.float32), boundary, langs)


def head_mean(maps: AttentionMaps, layer: int = -1) -> np.ndarray:
    """``(query, key)`` weights of ``layer``, averaged over its heads."""
    return maps.weights[layer].mean(axis=0)


def cross_share(maps: AttentionMaps, layer: int = -1) -> np.ndarray:
    """Per token of the first sentence, the share of its attention (mean over heads) that goes to
    the second sentence: how much it looks at the translation."""
    w = head_mean(maps, layer)
    return w[: maps.boundary, maps.boundary :].sum(axis=1)


def strongest_links(
    maps: AttentionMaps, layer: int = -1, *, skip_separators: bool = True
) -> list[tuple[str, str, float]]:
    """For each token of the first sentence, the token of the second that it attends to most
    (mean over the heads of ``layer``): ``(token, attended token, weight)``. Separators
    (``</s>``) are left out on both sides when ``skip_separators``."""
    if maps.boundary >= len(maps.pieces):
        raise ValueError("strongest_links needs a pair (attention_maps with text2)")
    w = head_mean(maps, layer)
    keys = np.arange(maps.boundary, len(maps.pieces))
    sep = maps.pieces[0]  # every row starts with </s>
    if skip_separators:
        keys = np.array([k for k in keys if maps.pieces[k] != sep])
    out = []
    for q in range(maps.boundary):
        if skip_separators and maps.pieces[q] == sep:
            continue
        k = keys[int(np.argmax(w[q, keys]))]
        out.append((maps.pieces[q], maps.pieces[k], float(w[q, k])))
    return out


class Embedded(NamedTuple):
    """One batch of ``embed_batches``: its rows' places in the input and what they gave."""

    index: np.ndarray  # (k,) positions in the input
    vectors: np.ndarray  # (k, emb_dim) float32
    tokens: list[np.ndarray] | None  # per row: its token ids ``</s> s </s>`` (after the cut)
    states: list[np.ndarray] | None  # per row: last-layer states ``(len(tokens[j]), emb_dim)``


def row_lengths(enc: Encoder, ids: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """Tokens of each sentence's row ``</s> s </s>``: cut to ``max_len`` and the positions."""
    cap = enc.source.model.max_positions
    return np.array([min(nli.sentence_length(x, max_len), cap) for x in ids], np.int64)


def embed_batches(
    enc: Encoder,
    ids: Sequence[np.ndarray],
    lang: str,
    *,
    pooling: str = "mean",
    batch_size: int = 64,
    max_len: int = 256,
    states: bool = False,
) -> Iterator[Embedded]:
    """Sentence vectors of the token ids ``ids``, each row ``</s> s </s>`` with its language's
    id, batch by batch, longest rows first: a batch is padded only to its longest row, rounded
    up to a multiple of 16 (one compile per such length), and topped up with all-pad rows to
    ``batch_size``. ``pooling``: ``"mean"`` over the row's tokens (the retrieval probe's vector,
    ``retrieval.mean_pooled``), ``"first"`` the state at position 0, the first ``</s>`` (XLM's
    generate-embeddings notebook: ``tensor[0]``). ``states``: also each row's token states."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: one of {POOLINGS}")
    lid = enc.lang_id(lang)
    lengths = row_lengths(enc, ids, max_len)
    order = np.argsort(-lengths, kind="stable")
    embed = _embed_fn(enc.source.model, pooling, states)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        length = min(-(-int(lengths[index[0]]) // 16) * 16, enc.source.model.max_positions)
        rows = nli.Rows.stack(
            [nli.pack_sentence(ids[i], lid, max_len=max_len, length=length) for i in index],
            np.zeros(len(index), np.int32),
        )
        batch = rows.batch(np.arange(len(index)), batch_size)
        vectors, hidden = jax.device_get(
            embed(enc.params, {k: batch[k] for k in ("tokens", "positions", "langs")})
        )
        k, n = len(index), lengths[index]
        if not states:
            yield Embedded(index, vectors[:k], None, None)
            continue
        tokens = [rows.tokens[j, : n[j]] for j in range(k)]
        yield Embedded(index, vectors[:k], tokens, [hidden[j, : n[j]] for j in range(k)])


def sentence_vectors(
    enc: Encoder,
    sentences: Sequence[str],
    lang: str,
    *,
    pooling: str = "mean",
    batch_size: int = 64,
    max_len: int = 256,
) -> np.ndarray:
    """Sentence vectors ``(n, emb_dim)`` float32 of ``sentences``, each ``</s> s </s>`` with its
    language's id: mean-pooled last-layer states (the retrieval probe's vectors) or, with
    ``pooling="first"``, the first ``</s>``'s state (``embed_batches``). ``python -m
    xlm_jax.embed`` is the same over a file."""
    ids = enc.tokenizer.encode_many(list(sentences), lang)
    out = np.zeros((len(ids), enc.source.model.emb_dim), np.float32)
    for b in embed_batches(enc, ids, lang, pooling=pooling, batch_size=batch_size, max_len=max_len):
        out[b.index] = b.vectors
    return out


@functools.cache
def _embed_fn(model_config, pooling: str, states: bool):
    """Jitted (params, batch) → (vectors, last-layer states or None)."""
    model = XLMEncoder(model_config)

    def embed(params, batch):
        hidden = retrieval.layer_states(params, batch, model=model)
        return pooled(hidden, batch["tokens"], pooling), hidden if states else None

    return jax.jit(embed)


def cosine_neighbours(
    queries: np.ndarray, keys: np.ndarray, k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``keys`` most cosine-similar to each query: (indices, similarities),
    each ``(n_queries, k)``, best first."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    c = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    sim = q @ c.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1)


def display_piece(piece: str) -> str:
    """A vocabulary piece as plain text: SentencePiece's ``▁`` word start (invisible as a space
    in a table) becomes ``_``, the mask token (``<special1>``) ``<mask>``; XLM's ``@@`` stays."""
    if piece == SPECIAL_PIECES[MASK_ID]:
        return MASK
    return re.sub("^\u2581", "_", piece)
