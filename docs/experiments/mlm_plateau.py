"""Does a small MLM leave the unigram plateau? The experiment behind docs/results.md's section
"Why the encoders above did not transfer: they never left the unigram plateau" (issue 19).

Trains xlm_jax's encoder with MLM (objectives.mask_tokens: XLM's 15% / 80-10-10) on windows of
Multi30k's English training stream, with Adam (XLM's betas, clipping at 5) at a *constant*
learning rate after a linear warm-up, and prints the mean training loss and accuracy of every
100 updates. `--baseline` instead prints what a count model of each target's two neighbours
reaches on `val` (the accuracy a model that reads only one word either side can reach).

  T=--tokenizer=/tmp/mlm_enfr/tokenizer.model  # any run's; the 10k one of the UNMT stage 1
  python docs/experiments/mlm_plateau.py $T --window=128 --lr=5e-4   # stays on the plateau
  python docs/experiments/mlm_plateau.py $T --window=32 --lr=5e-4    # leaves it
  python docs/experiments/mlm_plateau.py $T --baseline
"""

from __future__ import annotations

import argparse
import collections
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xlm_jax.data.batches import make_stream
from xlm_jax.model import objectives
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.text.tokenizer import EOS_ID, Tokenizer


def read(path: str, tokenizer: Tokenizer, n: int | None = None) -> list[np.ndarray]:
    with open(path, encoding="utf-8") as f:
        return [tokenizer.encode(line.strip()) for line in list(f)[:n]]


def neighbour_baseline(train: list[np.ndarray], valid: list[np.ndarray], vocab: int) -> None:
    """Accuracy and perplexity on val of P(w | left, right), interpolated with the unigram."""
    unigram = collections.Counter()
    by_context = collections.defaultdict(collections.Counter)  # (left, right) -> word counts
    for s in train:
        s = [EOS_ID, *s, EOS_ID]
        unigram.update(s[1:-1])
        for i in range(1, len(s) - 1):
            by_context[s[i - 1], s[i + 1]][s[i]] += 1
    total, weight = sum(unigram.values()), 0.7
    nll, hits = [], []
    for s in valid:
        s = [EOS_ID, *s, EOS_ID]
        for i in range(1, len(s) - 1):
            seen = by_context.get((s[i - 1], s[i + 1]))
            p_uni = (unigram[s[i]] + 1) / (total + vocab)
            n = sum(seen.values()) if seen else 0
            p = weight * seen[s[i]] / n + (1 - weight) * p_uni if n else p_uni
            nll.append(-math.log(p))
            best = seen.most_common(1)[0][0] if seen else unigram.most_common(1)[0][0]
            hits.append(best == s[i])
    uni_nll = [-math.log((unigram[w] + 1) / (total + vocab)) for s in valid for w in s]
    print(
        f"val: unigram ppl {math.exp(np.mean(uni_nll)):.1f}; neighbour model ppl "
        f"{math.exp(np.mean(nll)):.1f}, accuracy {100 * np.mean(hits):.1f}%"
    )


def train(args, windows: np.ndarray, vocab_size: int) -> None:
    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=vocab_size,
            n_langs=2,  # en, fr as the UNMT stage 1 (only en is read here)
            emb_dim=args.dim,
            n_layers=args.layers,
            n_heads=args.heads,
            dropout=0.0,
            attention_dropout=0.0,
            sinusoidal_embeddings=args.sinusoidal,
        )
    )
    model = XLMEncoder(cfg)
    rows, length = args.tokens // args.window, args.window
    pos = jnp.broadcast_to(jnp.arange(length), (rows, length))
    langs = jnp.zeros((rows, length), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(windows[:rows]), pos, langs)
    schedule = optax.linear_schedule(1e-7, args.lr, args.warmup)
    tx = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(schedule, 0.9, 0.98, 1e-6))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, tokens, key):
        b = objectives.mask_tokens({"tokens": tokens}, key, vocab_size=vocab_size)

        def loss(p):
            logits = model.apply(p, b["tokens"], pos, langs, pred_index=b["pred_index"])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)
            hit = logits.argmax(-1) == b["targets"]
            n = b["weights"].sum()
            return (nll[..., 0] * b["weights"]).sum() / n, (hit * b["weights"]).sum() / n

        (value, acc), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value, acc

    order, start, log = np.random.default_rng(0), time.time(), []
    for i in range(args.steps):
        tokens = jnp.asarray(windows[order.integers(0, len(windows), rows)])
        params, opt, value, acc = step(params, opt, tokens, jax.random.PRNGKey(i + 1))
        log.append((float(value), float(acc)))
        if (i + 1) % 100 == 0:
            value, acc = np.mean(log[-100:], axis=0)
            print(
                f"update {i + 1}: loss {value:.3f} acc {100 * acc:.1f}% "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/multi30k")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="a SentencePiece model (e.g. a pretraining workdir's tokenizer.model)",
    )
    p.add_argument("--window", type=int, default=128, help="tokens per row (XLM's bptt)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sinusoidal", action="store_true")
    p.add_argument("--baseline", action="store_true")
    args = p.parse_args()
    tokenizer = Tokenizer.load(args.tokenizer)
    sentences = read(f"{args.data}/train.en", tokenizer, 14_500)  # the UNMT protocol's half
    if args.baseline:
        neighbour_baseline(sentences, read(f"{args.data}/val.en", tokenizer), tokenizer.vocab_size)
        return
    stream = make_stream(sentences)
    n = len(stream) // args.window
    train(args, stream[: n * args.window].reshape(n, args.window), tokenizer.vocab_size)


if __name__ == "__main__":
    main()
