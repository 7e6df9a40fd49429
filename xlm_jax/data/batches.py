"""Host-side batches (numpy): MLM/CLM streams, TLM pairs, and which step trains what.

Every batch is a dict of ``(batch, length)`` int32 arrays ``tokens``, ``positions``, ``langs``
(see docs/architecture.md). Iterators are deterministic functions of ``(seed, name, epoch)`` plus a
cursor, so their whole state is a few integers that go into every checkpoint.

An iterator walks the sequence of *global* batches but builds only the rows ``rows=(start, stop)``
that its process feeds to its devices: the global batch is the same whatever the number of hosts.
"""

from __future__ import annotations

import bisect
import dataclasses
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from xlm_jax.text.tokenizer import EOS_ID, PAD_ID

Batch = dict[str, np.ndarray]


def _rng(seed: int, name: str, *more: int) -> np.random.Generator:
    # crc32, not hash(): the stream must be the same in every process and every run.
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *more])


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """``rng.permutation(n)`` (the same order, tested) as int32 when it fits: half the memory of
    an epoch's order over millions of windows or pairs."""
    return rng.permutation(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))


def make_stream(sentences: Sequence[np.ndarray]) -> np.ndarray:
    """XLM's stream: ``</s> s1 </s> s2 </s> ...`` as one int32 array; empty sentences skipped."""
    parts = [np.array([EOS_ID], np.int32)]
    eos = np.array([EOS_ID], np.int32)
    for s in sentences:
        if len(s):
            parts += [np.asarray(s, np.int32), eos]
    return np.concatenate(parts)


class EpochIterator:
    """Position in a sequence of epochs: all an iterator's state, saved in every checkpoint.

    Subclasses derive each epoch's order from ``(seed, name, epoch)`` and cache it in
    ``_order``; restoring drops the cache so the order is derived again.
    """

    epoch: int
    cursor: int
    batch_size: int
    _order: np.ndarray | None

    def __iter__(self) -> EpochIterator:
        return self

    def next_rows(self) -> int:
        """Rows of the global batch the next ``next()`` returns (token budgets vary them)."""
        return self.batch_size

    def plan_key(self) -> dict[str, Any] | None:
        """What cuts the epochs into batches, beyond (seed, name, data), when it can change
        between runs (token budgets, buckets): saved with the state; restoring under another is
        refused, as the cursor would index other batches. None: nothing recorded."""
        return None

    def state(self) -> dict[str, Any]:
        plan = self.plan_key()
        return {"epoch": self.epoch, "cursor": self.cursor} | ({"plan": plan} if plan else {})

    def restore(self, state: Mapping[str, Any]) -> None:
        saved, now = state.get("plan"), self.plan_key()
        if saved != now:
            raise ValueError(
                f"{getattr(self, 'name', 'an iterator')}: the checkpoint's batches were cut as "
                f"{saved or 'fixed batches'}, this run's as {now or 'fixed batches'} (a token "
                "budget, length buckets or the data-parallel split changed): resume with the "
                "checkpoint's settings and mesh, or use another workdir"
            )
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


class StreamBatches(EpochIterator):
    """Windows of ``length`` tokens cut from one language's stream (MLM and CLM).

    Each epoch starts the windows at a fresh random offset and visits them in a fresh random
    order, so successive epochs do not see the same cuts.
    """

    def __init__(
        self,
        stream: np.ndarray,
        *,
        lang_id: int,
        batch_size: int,
        length: int,
        seed: int,
        name: str,
        rows: tuple[int, int] | None = None,
    ) -> None:
        if length < 1:  # would pass the check below and fail at the first batch
            raise ValueError(f"{name}: window length {length}; expected at least 1 token")
        if len(stream) < length + 1:
            raise ValueError(
                f"{name}: the stream has {len(stream)} tokens, fewer than one window of {length}"
            )
        self.stream, self.lang_id, self.name = stream, lang_id, name
        self.batch_size, self.length, self.seed = batch_size, length, seed
        self.rows = _check_rows(rows, batch_size, name)
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None
        self._offset = 0

    def _epoch_windows(self) -> np.ndarray:
        if self._order is None:
            rng = _rng(self.seed, self.name, self.epoch)
            self._offset = (
                int(rng.integers(self.length)) if len(self.stream) > 2 * self.length else 0
            )
            n_windows = (len(self.stream) - self._offset) // self.length
            self._order = permutation(rng, n_windows)
        return self._order

    def __next__(self) -> Batch:
        rows = []
        for row in range(self.batch_size):
            order = self._epoch_windows()
            if self.rows[0] <= row < self.rows[1]:
                start = self._offset + int(order[self.cursor]) * self.length
                rows.append(self.stream[start : start + self.length])
            self.cursor += 1
            if self.cursor == len(order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        tokens = np.stack(rows)
        return {
            "tokens": tokens,
            "positions": np.broadcast_to(
                np.arange(self.length, dtype=np.int32), tokens.shape
            ).copy(),
            "langs": np.full(tokens.shape, self.lang_id, np.int32),
        }


def _check_rows(rows: tuple[int, int] | None, batch_size: int, name: str) -> tuple[int, int]:
    rows = (0, batch_size) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= rows[0] < rows[1] <= batch_size:
        raise ValueError(f"{name}: rows {rows} are not a slice of a batch of {batch_size}")
    return rows


def pack_pair(
    src: np.ndarray, tgt: np.ndarray, src_lang: int, tgt_lang: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One TLM row ``</s> src </s></s> tgt </s>`` padded to ``length``.

    Positions restart at 0 with the second sentence and each sentence carries its own language id,
    as XLM's ``concat_batches(..., reset_positions=True)``.
    """
    n1, n2 = len(src) + 2, len(tgt) + 2
    if n1 + n2 > length:
        raise ValueError(f"pair of {n1 + n2} tokens does not fit in {length}")
    tokens = np.full(length, PAD_ID, np.int32)
    positions = np.zeros(length, np.int32)
    langs = np.full(length, src_lang, np.int32)
    tokens[:n1] = np.concatenate([[EOS_ID], src, [EOS_ID]])
    tokens[n1 : n1 + n2] = np.concatenate([[EOS_ID], tgt, [EOS_ID]])
    positions[:n1] = np.arange(n1)
    positions[n1 : n1 + n2] = np.arange(n2)
    langs[n1:] = tgt_lang
    return tokens, positions, langs


def lengths_of(sentences: Sequence[np.ndarray]) -> np.ndarray:
    """Each sentence's length: from a prepared side's offsets alone, or by measuring a list."""
    if hasattr(sentences, "lengths"):
        return sentences.lengths()
    return np.fromiter(map(len, sentences), np.int64, count=len(sentences))


def pair_rows(
    pairs: Sequence[tuple[np.ndarray, np.ndarray] | None], src_lang: int, tgt_lang: int, length: int
) -> Batch:
    """A batch of ``pack_pair`` rows of ``length``; ``None`` is an all-PAD row (no loss, no
    tokens) completing a token-budget batch."""
    pad = (
        np.full(length, PAD_ID, np.int32),
        np.zeros(length, np.int32),
        np.full(length, src_lang, np.int32),
    )
    rows = [pad if p is None else pack_pair(*p, src_lang, tgt_lang, length) for p in pairs]
    tokens, positions, langs = (np.stack(x) for x in zip(*rows, strict=True))
    return {"tokens": tokens, "positions": positions, "langs": langs}


def kept_pairs(
    src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], length: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs a TLM row of ``length`` keeps, and every pair's row tokens
    (``</s> src </s></s> tgt </s>``), from the lengths alone.

    XLM drops pairs with an empty side and pairs longer than its max_len; so do we (counted by
    the callers).
    """
    if len(src) != len(tgt):
        raise ValueError(f"{name}: {len(src)} source but {len(tgt)} target sentences")
    n_src, n_tgt = lengths_of(src), lengths_of(tgt)
    row = n_src + n_tgt + 4
    keep = np.flatnonzero((n_src > 0) & (n_tgt > 0) & (row <= length))
    if not len(keep):
        raise ValueError(f"{name}: no pair is non-empty and fits in {length} tokens")
    return (keep.astype(np.int32) if len(src) < 2**31 else keep), row


class PairBatches(EpochIterator):
    """Shuffled batches of translation pairs packed for TLM (one pair per row).

    ``src`` and ``tgt`` are lists of id arrays or prepared sides (``data/prepared.Sentences``):
    only the pairs of this process's rows are read, when their batch is built.
    """

    def __init__(
        self,
        src: Sequence[np.ndarray],
        tgt: Sequence[np.ndarray],
        *,
        src_lang: int,
        tgt_lang: int,
        batch_size: int,
        length: int,
        seed: int,
        name: str,
        shuffle: bool = True,
        rows: tuple[int, int] | None = None,
    ) -> None:
        self.keep, row_tokens = kept_pairs(src, tgt, length, name)
        self.n_dropped = len(src) - len(self.keep)
        self.tokens = int(row_tokens[self.keep].sum())  # of its rows, padding aside
        self.src, self.tgt = src, tgt
        self.src_lang, self.tgt_lang, self.name = src_lang, tgt_lang, name
        self.batch_size, self.length, self.seed, self.shuffle = batch_size, length, seed, shuffle
        self.rows = _check_rows(rows, batch_size, name)
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keep)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self.keep)
            self._order = (
                permutation(_rng(self.seed, self.name, self.epoch), n)
                if self.shuffle
                else np.arange(n)
            )
        return self._order

    def __next__(self) -> Batch:
        pairs = []
        for row in range(self.batch_size):
            if self.rows[0] <= row < self.rows[1]:
                i = int(self.keep[self._epoch_order()[self.cursor]])
                pairs.append((np.asarray(self.src[i], np.int32), np.asarray(self.tgt[i], np.int32)))
            self.cursor += 1
            if self.cursor == len(self.keep):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return pair_rows(pairs, self.src_lang, self.tgt_lang, self.length)


def best_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Items packed into rows of ``capacity``: row r holds ``items[bounds[r]:bounds[r+1]]``
    (indices into ``lengths``), rows in the order they were opened.

    Items are taken in the given order (the epoch's shuffle), each into the open row with the
    least room that holds it, else a new row (best fit: on Multi30k TLM rows of 128 tokens, 6%
    padding where next-fit leaves 21%). Only lengths are needed, so every process plans alike.
    """
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> open rows with that much
    rooms: list[int] = []  # the keys of by_room, sorted
    smallest = int(lengths.min()) if len(lengths) else 0
    for i, n in enumerate(lengths.tolist()):
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[k]
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        room -= n
        if room >= smallest:  # a row no item can join is closed
            if room not in by_room:
                by_room[room] = []
                bisect.insort(rooms, room)
            by_room[room].append(row)
    items = np.fromiter((i for row in rows for i in row), np.int64, count=len(lengths))
    bounds = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(row) for row in rows], out=bounds[1:])
    return items, bounds


def pack_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], src_lang: int, tgt_lang: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Several ``pack_pair`` rows back to back in one row of ``length``, and their ``segments``
    (1-based index of the pair in the row, 0 at padding)."""
    parts = [pack_pair(s, t, src_lang, tgt_lang, len(s) + len(t) + 4) for s, t in pairs]
    used = sum(len(p[0]) for p in parts)
    if used > length:
        raise ValueError(f"pairs of {used} tokens do not fit in {length}")
    pad = length - used
    tokens = np.concatenate([p[0] for p in parts] + [np.full(pad, PAD_ID, np.int32)])
    positions = np.concatenate([p[1] for p in parts] + [np.zeros(pad, np.int32)])
    langs = np.concatenate([p[2] for p in parts] + [np.full(pad, src_lang, np.int32)])
    segments = np.concatenate(
        [np.full(len(p[0]), k + 1, np.int32) for k, p in enumerate(parts)]
        + [np.zeros(pad, np.int32)]
    )
    return tokens, positions, langs, segments


class PackedPairBatches(PairBatches):
    """TLM rows holding several pairs each (``segments`` says which), so short pairs stop paying
    for a row of padding; the model attends only within a pair.

    Same pairs kept as ``PairBatches``. Each epoch packs the pairs, in its shuffled order, into
    rows of ``length`` (``best_fit``): the plan comes from the lengths alone, so a process reads
    only the pairs of its rows. ``cursor`` counts the epoch's rows.
    """

    def __init__(self, src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], **kw: Any) -> None:
        super().__init__(src, tgt, **kw)  # PairBatches' settings
        n_src, n_tgt = lengths_of(src)[self.keep], lengths_of(tgt)[self.keep]
        self._pair_lengths = n_src + n_tgt + 4
        self._bounds = np.zeros(1, np.int64)

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's pair order and its row boundaries (``_order`` = None: derive both again)."""
        if self._order is None:
            order = self._epoch_order()
            items, self._bounds = best_fit(self._pair_lengths[order], self.length)
            self._order = order[items]
        return self._order, self._bounds

    def epoch_rows(self) -> int:
        """Rows of the current epoch."""
        return len(self._epoch_plan()[1]) - 1

    def _row(self, pairs: np.ndarray) -> tuple[np.ndarray, ...]:
        sides = [
            (np.asarray(self.src[i], np.int32), np.asarray(self.tgt[i], np.int32))
            for i in self.keep[pairs].tolist()
        ]
        return pack_pairs(sides, self.src_lang, self.tgt_lang, self.length)

    def __next__(self) -> Batch:
        rows = []
        for row in range(self.batch_size):
            order, bounds = self._epoch_plan()
            if self.rows[0] <= row < self.rows[1]:
                rows.append(self._row(order[bounds[self.cursor] : bounds[self.cursor + 1]]))
            self.cursor += 1
            if self.cursor == len(bounds) - 1:
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        keys = ("tokens", "positions", "langs", "segments")
        return {k: np.stack(x) for k, x in zip(keys, zip(*rows, strict=True), strict=True)}


def padding_share(iterator: Iterator[Batch], n_batches: int) -> float:
    """Fraction of PAD among the token positions of the next ``n_batches`` batches."""
    pad = total = 0
    for _ in range(n_batches):
        tokens = next(iterator)["tokens"]
        pad += int(np.count_nonzero(tokens == PAD_ID))
        total += tokens.size
    return pad / total


def eval_stream_batches(
    stream: np.ndarray, *, lang_id: int, batch_size: int, length: int
) -> list[Batch]:
    """The whole validation stream in order, every token once; the last rows padded."""
    n_rows = -(-len(stream) // length)
    flat = np.full(n_rows * length, PAD_ID, np.int32)
    flat[: len(stream)] = stream
    rows = flat.reshape(n_rows, length)
    n_batches = -(-n_rows // batch_size)
    rows = np.concatenate(
        [rows, np.full((n_batches * batch_size - n_rows, length), PAD_ID, np.int32)]
    )
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), rows.shape)
    return [
        {
            "tokens": rows[i : i + batch_size],
            "positions": positions[i : i + batch_size].copy(),
            "langs": np.full((batch_size, length), lang_id, np.int32),
        }
        for i in range(0, len(rows), batch_size)
    ]


def eval_pair_batches(
    src: Sequence[np.ndarray],
    tgt: Sequence[np.ndarray],
    *,
    src_lang: int,
    tgt_lang: int,
    batch_size: int,
    length: int,
) -> list[Batch]:
    """Every pair that fits, in order, padded to whole batches with all-pad rows."""
    pairs = PairBatches(
        src,
        tgt,
        src_lang=src_lang,
        tgt_lang=tgt_lang,
        batch_size=1,
        length=length,
        seed=0,
        name="eval",
        shuffle=False,
    )
    n = len(pairs)
    rows = [next(pairs) for _ in range(n)]
    batches = []
    for i in range(0, n, batch_size):
        chunk = rows[i : i + batch_size]
        batch = {k: np.concatenate([r[k] for r in chunk]) for k in chunk[0]}
        missing = batch_size - len(chunk)
        if missing:
            batch["tokens"] = np.concatenate(
                [batch["tokens"], np.full((missing, length), PAD_ID, np.int32)]
            )
            for k in ("positions", "langs"):
                batch[k] = np.concatenate([batch[k], np.zeros((missing, length), np.int32)])
        batches.append(batch)
    return batches


# --- which objective and language each step trains -------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One entry of ``clm_steps`` / ``mlm_steps``: objective and language (pair)."""

    objective: str  # 'clm' (a language or a pair), 'mlm' or 'tlm' (an mlm_steps pair)
    lang1: str
    lang2: str | None = None

    @property
    def key(self) -> str:
        """Metric and iterator name, e.g. ``mlm_en``, ``tlm_en-fr``."""
        return f"{self.objective}_{self.lang1}" + (f"-{self.lang2}" if self.lang2 else "")


def parse_steps(objective: str, spec: str, langs: Sequence[str]) -> list[StepSpec]:
    """Parses XLM's ``clm_steps``/``mlm_steps``: ``"en,fr,en-fr"``; a pair in mlm_steps is TLM,
    in clm_steps CLM on the pair's row ``</s> src </s></s> tgt </s>``."""
    steps = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split("-")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"{objective}_steps: cannot parse {item!r} (expected 'xx' or 'xx-yy')")
        for lang in parts:
            if lang not in langs:
                raise ValueError(
                    f"{objective}_steps: {item!r} names {lang!r}, not in langs {list(langs)}"
                )
        if len(parts) == 2 and parts[0] == parts[1]:
            raise ValueError(f"{objective}_steps: {item!r} pairs a language with itself")
        # XLM: a pair in mlm_steps is TLM; in clm_steps, CLM over the pair's row
        kind = "tlm" if len(parts) == 2 and objective == "mlm" else objective
        steps.append(StepSpec(kind, parts[0], parts[1] if len(parts) == 2 else None))
    if len(set(steps)) != len(steps):
        raise ValueError(f"{objective}_steps: duplicate entries in {spec!r}")
    return steps


class Schedule:
    """The alternation of XLM's training loop, as a pure function of the step index.

    One *iteration* runs the ``clm_steps`` entries, then the ``mlm_steps`` entries, each its own
    optimizer update. As in XLM's ``shuf_order``: with ``sampling_factor > 0`` each list
    contributes ``min(5, n)`` monolingual and ``min(5, n)`` parallel steps whose language (pair) is
    sampled with p ∝ (n_l / N) ** sampling_factor; otherwise the list is shuffled.
    """

    MAX_PER_KIND = 5  # XLM's shuf_order(n=5)

    def __init__(
        self,
        lists: Sequence[Sequence[StepSpec]],
        sizes: Mapping[str, int],
        *,
        sampling_factor: float,
        seed: int,
    ) -> None:
        self.lists = [list(x) for x in lists if x]
        if not self.lists:
            raise ValueError("no training steps: set clm_steps and/or mlm_steps")
        self.sampling_factor, self.seed = sampling_factor, seed
        self.probs: dict[str, float] = {}
        self._groups: list[tuple[list[StepSpec], np.ndarray | None, int]] = []
        for steps in self.lists:
            if sampling_factor > 0:
                for group in ([s for s in steps if s.lang2 is None], [s for s in steps if s.lang2]):
                    if not group:
                        continue
                    p = np.array([sizes[s.key] for s in group], np.float64)
                    p = (p / p.sum()) ** sampling_factor
                    p /= p.sum()
                    self.probs.update({s.key: float(q) for s, q in zip(group, p, strict=True)})
                    self._groups.append((group, p, min(self.MAX_PER_KIND, len(group))))
            else:
                self._groups.append((steps, None, len(steps)))
        self.iteration_length = sum(n for _, _, n in self._groups)

    def iteration(self, i: int) -> list[StepSpec]:
        rng = _rng(self.seed, "schedule", i)
        out: list[StepSpec] = []
        for group, p, n in self._groups:
            if p is None:
                out += [group[j] for j in rng.permutation(len(group))]
            else:
                out += [group[j] for j in rng.choice(len(group), size=n, p=p, replace=True)]
        return out

    def __call__(self, step: int) -> StepSpec:
        return self.iteration(step // self.iteration_length)[step % self.iteration_length]


def parse_lambda(spec: str | float) -> list[tuple[int, float]]:
    """XLM's lambda schedules: ``"1"`` or ``"0:1,10000:0.1,30000:0"`` (linear in between; the
    points count XLM's iterations, see `Lambdas`)."""
    text = str(spec).strip()
    if ":" not in text:
        return [(0, float(text))]
    points = []
    for item in text.split(","):
        step, _, value = item.partition(":")
        try:
            points.append((int(step), float(value)))
        except ValueError:
            raise ValueError(
                f"lambda schedule {text!r}: cannot parse {item!r} as STEP:VALUE"
            ) from None
    if points[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(points, points[1:], strict=False)):
        raise ValueError(f"lambda schedule {text!r}: steps must start at 0 and increase")
    return points


def lambda_at(points: Sequence[tuple[int, float]], at: int) -> float:
    keys, values = zip(*points, strict=True)
    return float(np.interp(at, keys, values))


LAMBDA_UNITS = ("iterations", "steps")


def lambda_steps_per_point(
    unit: str, saved_config: Mapping[str, Any] | None, iteration_length: int
) -> int:
    """Loop steps per unit of a λ schedule: an iteration (``iteration_length``), or one step.

    A run resumed from a checkpoint written before schedules counted iterations (its config has
    no ``lambda_unit``) keeps counting steps, as it did: a resume never changes its weights."""
    if saved_config is not None and "lambda_unit" not in saved_config:
        unit = "steps"
    if unit not in LAMBDA_UNITS:
        raise ValueError(f"lambda_unit={unit!r}: expected one of {LAMBDA_UNITS}")
    return iteration_length if unit == "iterations" else 1


class Lambdas:
    """The loss weights ``lambda_<objective>`` of a task, each constant or a schedule.

    A schedule counts XLM's *iterations* (its ``n_total_iter``): one iteration is one pass over
    every configured step (``clm_steps`` + ``mlm_steps``, or ``ae_steps`` + ``mt_steps`` +
    ``bt_steps``), i.e. ``iteration_length`` loop steps, so a schedule pasted from an XLM command
    decays at the same point of training. XLM updates its λ after each iteration, so every step of
    iteration ``i`` uses the schedule's value at ``i``. (``iteration_length=1``: loop steps.)
    """

    def __init__(self, specs: Mapping[str, str | float], iteration_length: int) -> None:
        if iteration_length < 1:
            raise ValueError(f"iteration_length must be >= 1, got {iteration_length}")
        self.points = {name: parse_lambda(spec) for name, spec in specs.items()}
        self.iteration_length = iteration_length

    def __call__(self, objective: str, step: int) -> float:
        return lambda_at(self.points[objective], step // self.iteration_length)
