"""Translate sentences with a trained model: one sentence per line in, one translation per line out.

  python -m xlm_jax.translate --workdir=/tmp/mt_ende --src=en --tgt=de --beam_size=4 \
      < input.en > output.de
  python -m xlm_jax.translate --workdir=/tmp/mt_ende --src=en --tgt=de --input=in.en \
      --output=out.de --reference=ref.de    # also prints BLEU against ref.de

The model is the workdir's best checkpoint (by the run's `best_metric`) unless --step is given.
Input is read whole (invalid UTF-8 is an error naming the line); the output file is written
atomically, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from xlm_jax.core.files import write_atomic
from xlm_jax.data.sources import DataError
from xlm_jax.tasks.nmt import Translator
from xlm_jax.text import bleu

_WORKDIR = flags.DEFINE_string("workdir", None, "The translation run's workdir.")
_SRC = flags.DEFINE_string("src", None, "Source language, e.g. en.")
_TGT = flags.DEFINE_string("tgt", None, "Target language, e.g. fr.")
_INPUT = flags.DEFINE_string("input", "-", "Input file, '-' = stdin.")
_OUTPUT = flags.DEFINE_string("output", "-", "Output file, '-' = stdout.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = the best (else the latest).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Sentences per batch.")
_BEAM = flags.DEFINE_integer("beam_size", 1, "1 = greedy.")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "Beam scores / length**penalty.")
_EARLY_STOPPING = flags.DEFINE_bool("early_stopping", False, "Beam: stop at beam_size finished.")
_MAX_LEN = flags.DEFINE_string("max_len", "1.5,10", "a,b: at most a * source_length + b tokens.")
_REFERENCE = flags.DEFINE_string(
    "reference", "", "Reference translations (one per line): print BLEU (sacreBLEU, tokenized)."
)


def read_input(path: str) -> list[str]:
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            name = "<stdin>" if path == "-" else path
            raise DataError(f"{name}:{i}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    lines = read_input(_INPUT.value)
    refs = read_input(_REFERENCE.value) if _REFERENCE.value else None
    if refs is not None and len(refs) != len(lines):
        raise DataError(
            f"{_REFERENCE.value} has {len(refs)} lines but the input has {len(lines)}: "
            "one reference per input line"
        )
    translator = Translator(
        _WORKDIR.value,
        step=_STEP.value,
        beam_size=_BEAM.value,
        length_penalty=_LENGTH_PENALTY.value,
        early_stopping=_EARLY_STOPPING.value,
        max_len=_MAX_LEN.value,
        batch_size=_BATCH.value,
    )
    logging.info(
        "%s: %d sentences %s→%s", translator.description, len(lines), _SRC.value, _TGT.value
    )
    hyps = translator(lines, _SRC.value, _TGT.value)
    text = "".join(t + "\n" for t in hyps)
    if _OUTPUT.value == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(_OUTPUT.value, text.encode("utf-8"))
    if refs is not None:
        # stderr, so that stdout stays the translations
        print(bleu.sacre_bleu(hyps, refs), file=sys.stderr)
        print(bleu.tokenized_bleu(hyps, refs, _TGT.value), file=sys.stderr)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "src", "tgt"])
    app.run(main)
