"""The original XLM code (facebookresearch/XLM) timed on the benchmark's shapes, in the same run.

XLM is not a package: give the benchmark a checkout (``python -m xlm_jax.bench
--xlm_original=PATH``, PATH holding ``src/model/transformer.py``). Its ``TransformerModel`` is
imported from there, never copied into this project (the code is CC BY-NC), with random weights
of the benchmark config's sizes, and run as XLM's trainer and evaluator run it:

* training steps as ``Trainer.mlm_step`` / ``clm_step``: ``fwd``, then ``predict`` at the
  predicted positions only (MLM/TLM: a ``word_pred`` share of random positions; CLM: every
  position but the last), backward, gradient clipping and Adam (XLM's ``optimize``). TLM is
  MLM on a pair: two halves of the row, positions restarting at the second half, two languages.
  Host-side batch making and masking are left out of the timing, as in ours.
* decoding as ``EncDecEvaluator``: the encoder's ``fwd`` over the source, then ``generate``
  (greedy) or ``generate_beam`` (length penalty 1, no early stopping), ``max_len`` = the output
  tokens + 1. End-of-sentence gets an output bias of -inf, so every sentence runs to its length
  limit and does the work ours does with ``eos_allowed=False``.

XLM was written for torch 1.0: its ``generate`` masks with ``unfinished_sents.byte()``, which
torch 2 refuses in ``masked_fill_``; during ``generate`` only, ``Tensor.byte`` returns a bool
tensor (``_torch1_masks``), the one change of behaviour the harness makes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from xlm_jax.text.tokenizer import EOS_ID, N_SPECIAL, PAD_ID
from xlm_jax.tools.roofline import median_seconds

MODULE = "src.model.transformer"  # where XLM keeps TransformerModel, relative to its root


def load(xlm_dir: str | Path) -> types.ModuleType:
    """XLM's ``src/model/transformer.py`` from a checkout, imported as XLM imports it."""
    root = Path(xlm_dir).resolve()
    if not (root / "src" / "model" / "transformer.py").is_file():
        raise FileNotFoundError(
            f"--xlm_original={xlm_dir}: expected a checkout of facebookresearch/XLM "
            f"(no {root / 'src/model/transformer.py'})"
        )
    loaded = sys.modules.get("src")
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent != root / "src":
        raise RuntimeError(f"a module 'src' from {loaded.__file__} is imported already")
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(root))


def revision(xlm_dir: str | Path) -> str:
    """The checkout's git commit, or "unknown" (a copy without .git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(xlm_dir), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _params(config) -> types.SimpleNamespace:
    """XLM's ``params`` for ``TransformerModel``: our config's sizes, two languages."""
    m = config.model
    if m.ffn_dim not in (None, 4 * m.emb_dim):
        raise ValueError("XLM's TransformerModel has a fixed 4 x emb_dim feed-forward layer")
    return types.SimpleNamespace(
        n_langs=2,
        id2lang={0: "en", 1: "fr"},
        lang2id={"en": 0, "fr": 1},
        n_words=config.tokenizer.vocab_size,
        eos_index=EOS_ID,
        pad_index=PAD_ID,
        use_lang_emb=m.use_lang_emb,
        emb_dim=m.emb_dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        sinusoidal_embeddings=m.sinusoidal_embeddings,
        gelu_activation=True,
        share_inout_emb=True,
        asm=False,
        use_memory=False,
    )


def _model(xlm: types.ModuleType, config, is_encoder: bool):
    params = _params(config)
    return xlm.TransformerModel(params, range(params.n_words), is_encoder, with_output=True)


def _step_batch(config, kind: str, rows: int, length: int) -> dict[str, Any]:
    """XLM's step inputs, sequence first: x, lengths, positions, langs, pred_mask, y."""
    import torch

    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.integers(N_SPECIAL, config.tokenizer.vocab_size, (length, rows)))
    positions = torch.arange(length)[:, None].expand(length, rows)
    langs = torch.zeros((length, rows), dtype=torch.long)
    if kind == "tlm":  # a pair: the second half restarts its positions, in the other language
        half = length // 2
        positions = torch.cat([positions[:half], positions[half:] - half])
        langs[half:] = 1
    if kind == "clm":
        pred_mask = torch.ones((length, rows), dtype=torch.bool)
        pred_mask[-1] = False
        y = x[1:].masked_select(pred_mask[:-1])
    else:
        pred_mask = torch.as_tensor(rng.random((length, rows)) < config.word_pred)
        y = x[pred_mask]
    return {
        "x": x,
        "lengths": torch.full((rows,), length, dtype=torch.long),
        "positions": positions.contiguous(),
        "langs": langs,
        "pred_mask": pred_mask,
        "y": y,
    }


def bench_step(
    xlm: types.ModuleType, config, kind: str, *, rows: int, length: int, n_steps: int
) -> dict[str, Any]:
    """Median seconds of one XLM training step of ``kind`` (mlm, tlm, clm)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = _model(xlm, config, is_encoder=True).train()
    opt = config.optimizer
    adam = torch.optim.Adam(
        model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
    )
    b = _step_batch(config, kind, rows, length)

    def step() -> None:
        adam.zero_grad()
        tensor = model(
            "fwd",
            x=b["x"],
            lengths=b["lengths"],
            positions=b["positions"],
            langs=b["langs"],
            causal=kind == "clm",
        )
        _, loss = model(
            "predict", tensor=tensor, pred_mask=b["pred_mask"], y=b["y"], get_scores=False
        )
        loss.backward()
        if opt.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad_norm)
        adam.step()

    seconds = median_seconds(step, n_steps, warmup=2)
    return {"batch": [rows, length], "step_s": seconds, "tokens_per_s": rows * length / seconds}


@contextlib.contextmanager
def _torch1_masks() -> Iterator[None]:
    """``Tensor.byte()`` gives a bool tensor: torch 1.0's uint8 masks, as XLM's code uses them."""
    import torch

    byte = torch.Tensor.byte
    torch.Tensor.byte = torch.Tensor.bool
    try:
        yield
    finally:
        torch.Tensor.byte = byte


def bench_decoding(
    xlm: types.ModuleType,
    config,
    *,
    batch: int,
    src_len: int,
    out_tokens: int,
    n_runs: int = 3,
    beams: tuple[int, ...] = (1, 4),
) -> list[dict[str, Any]]:
    """Median seconds of encoding ``batch`` random sources and decoding ``out_tokens`` each."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    encoder = _model(xlm, config, is_encoder=True).eval()
    decoder = _model(xlm, config, is_encoder=False).eval()
    with torch.no_grad():
        decoder.pred_layer.proj.bias[EOS_ID] = -float("inf")  # every sentence runs to the limit
    rng = np.random.default_rng(0)
    src = torch.as_tensor(rng.integers(N_SPECIAL, config.tokenizer.vocab_size, (src_len, batch)))
    src[0] = src[-1] = EOS_ID
    lengths = torch.full((batch,), src_len, dtype=torch.long)
    langs = torch.zeros_like(src)
    results = []
    for beam in beams:

        def run(beam: int = beam) -> torch.Tensor:
            with torch.no_grad(), _torch1_masks():
                enc = encoder("fwd", x=src, lengths=lengths, langs=langs, causal=False)
                enc = enc.transpose(0, 1)
                if beam == 1:
                    return decoder.generate(enc, lengths, 1, max_len=out_tokens + 1)[1]
                return decoder.generate_beam(
                    enc, lengths, 1, beam, 1.0, False, max_len=out_tokens + 1
                )[1]

        t = time.perf_counter()
        out_lengths = run()
        first_s = time.perf_counter() - t
        assert int(out_lengths.min()) == out_tokens + 1, "every sentence must be full length"
        seconds = median_seconds(run, n_runs, warmup=0)
        results.append(
            {
                "search": "greedy" if beam == 1 else f"beam {beam}",
                "first_run_s": first_s,
                "seconds": seconds,
                "sentences_per_s": batch / seconds,
            }
        )
    return results


def run(
    xlm_dir: str | Path,
    config,
    *,
    kinds: tuple[str, ...],
    n_steps: int,
    decode_shape: tuple[int, int, int] | None,
) -> dict[str, Any]:
    """Everything the benchmark times of the original code: one entry of the report."""
    import torch

    xlm = load(xlm_dir)
    report: dict[str, Any] = {
        "source": str(Path(xlm_dir).resolve()),
        "revision": revision(xlm_dir),
        "framework": f"torch {torch.__version__}",
        "threads": os.cpu_count() or 1,
        "steps": {},
    }
    for kind in kinds:
        rows, length = (
            (config.tlm_batch_size, config.tlm_length)
            if kind == "tlm"
            else (config.batch_size, config.bptt)
        )
        report["steps"][kind] = bench_step(
            xlm, config, kind, rows=rows, length=length, n_steps=n_steps
        )
    if decode_shape is not None:
        batch, src_len, out_tokens = decode_shape
        report["decoding"] = bench_decoding(
            xlm, config, batch=batch, src_len=src_len, out_tokens=out_tokens
        )
    return report
