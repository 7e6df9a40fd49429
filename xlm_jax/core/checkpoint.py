"""Checkpoints: train state + data-iterator state + metadata, keep-last-N plus the best ones.

One `Checkpointer` wraps one `orbax.checkpoint.CheckpointManager` (typically in
`<workdir>/checkpoints`). Every step directory holds three items:

  state       any pytree of jax arrays (params, optimizer state, step), possibly sharded;
              written shard-by-shard by the processes that own them (`StandardSave`).
  data_state  JSON: the data iterators' integers, so a resumed run sees the same batches.
  meta        JSON: config dict, base64 tokenizer model, versions; readable on its own
              (`restore_meta`) to compare configs before building a model.
  integrity   JSON: a fingerprint of every array of `state` and whether each was finite, and
              whether the run was skipping non-finite updates when it saved (`core.integrity`).
              A restore recomputes the fingerprints and refuses a checkpoint that differs.

Retention keeps the newest N, the best by each tracked metric, and the newest *good* checkpoint
(finite when saved, no non-finite updates being skipped): a run that goes bad keeps saving, but
never pushes its last good state out of keep-last-N.

Multi-process: every process calls `save`/`restore`/`wait`/`close` with the same arguments, in
the same order. Orbax coordinates them (barriers), writes each array shard from the process that
holds it, and writes the JSON items and metrics from the primary process only, so we must not
filter calls by process ourselves (a non-primary process skipping `save` would deadlock the
barriers).

Crash safety is orbax's: a step is written to `<step>.orbax-checkpoint-tmp*` and renamed
(or, on GCS, marked with a commit file) only once every item is complete, so an interrupted save
leaves the previous step usable. Leftover tmp directories are invisible to `latest_step` and are
removed when the next writing `Checkpointer` on the directory saves (`cleanup_tmp_directories`).
Readers of another run's checkpoints (initialising NMT or XNLI from a pretraining run, exports)
open them with ``read_only=True``: they never create, delete or clean up anything, so they are
safe next to a run that is still writing there.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from xlm_jax.core import integrity

# A full disk (or quota). Orbax re-raises its writers' OSError without any path; tensorstore (the
# array data) raises ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']") instead.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full_errno(e: Exception) -> int | None:
    """ENOSPC or EDQUOT if ``e`` says the disk is full, else None."""
    if isinstance(e, OSError):
        return e.errno if e.errno in _DISK_FULL else None
    text = str(e)
    return next((code for code in _DISK_FULL if f"[os_error_code='{code}']" in text), None)


# Errors worth reading again before a checkpoint is set aside: a network filesystem's hiccups.
# Damaged files fail the same way every time (DATA_LOSS, bad JSON, missing files): not retried.
_TRANSIENT_ERRNOS = (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET)
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")


def _transient(e: Exception) -> bool:
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return any(f"{status}:" in str(e) for status in _TRANSIENT_STATUS)  # tensorstore's statuses


@dataclasses.dataclass
class NewestGood:
    """An orbax preservation policy: keep the newest checkpoint that ``is_good``."""

    is_good: Callable[[int], bool]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        newest = max((c.step for c in checkpoints if self.is_good(c.step)), default=None)
        return [c.step == newest for c in checkpoints]


def parse_tracked(spec: str | None, default_mode: str = "min") -> list[tuple[str, str]]:
    """``best_metric`` as ``[(metric, mode)]``: ``"valid/bleu,valid/ppl:min"``, each entry with
    an optional ``:min`` / ``:max`` (else ``default_mode``). XLM's ``--validation_metrics``: each
    metric keeps its own best checkpoint; the first is *the* best one (and patience's)."""
    if default_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {default_mode!r}")
    tracked: list[tuple[str, str]] = []
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        name, _, mode = item.rpartition(":") if item.endswith((":min", ":max")) else (item, "", "")
        mode = mode or default_mode
        if name in dict(tracked):
            raise ValueError(f"best_metric {spec!r}: {name!r} is listed twice")
        tracked.append((name, mode))
    return tracked


def _usable(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    value = None if metrics is None else metrics.get(name)
    return None if value is None or math.isnan(float(value)) else float(value)


@dataclasses.dataclass
class BestBy:
    """An orbax preservation policy: keep the checkpoint with the best usable (present, not NaN)
    value of ``metric``; the newest among equals. Checkpoints without it are not ranked."""

    metric: str
    mode: str

    def best(self, values: Mapping[int, float | None]) -> int | None:
        scored = [(v if self.mode == "max" else -v, s) for s, v in values.items() if v is not None]
        return max(scored)[1] if scored else None

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        best = self.best({c.step: _usable(c.metrics, self.metric) for c in checkpoints})
        return [c.step == best for c in checkpoints]


def abstract_of(tree: Any) -> Any:
    """The arrays' shapes, dtypes and shardings: what a restore reads into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _jsonable(x: Any) -> Any:
    """Converts numpy scalars/arrays and tuples to plain JSON types (orbax's JSON writer won't)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    return x


class Checkpointer:
    """Save/restore training checkpoints with keep-last-N, best-by-metric and newest-good
    retention.

    Retention is `AnyPreservationPolicy([LatestN(keep_last), NewestGood, BestBy(metric)...])`: a
    checkpoint survives if it is among the newest `keep_last`, OR it is the newest good one (see
    the module's docstring), OR it is the best by one of the metrics `best_metric` lists
    (`parse_tracked`). Only checkpoints whose metrics hold a non-NaN tracked metric take part in
    its ranking; the others are kept by recency alone, so saves without an evaluation neither pin
    themselves forever nor displace a best one.
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
        read_only: bool = False,
        retry_delays: Sequence[float] = (2.0, 8.0),
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (resume needs the latest), got {keep_last}")
        path = epath.Path(directory)
        if "://" not in str(directory):  # orbax wants absolute local paths; keep gs:// as is
            path = path.resolve()
        self._best = [BestBy(m, mode) for m, mode in parse_tracked(best_metric, best_mode)]
        self._read_only = read_only
        self._retry_delays = tuple(retry_delays)  # seconds before each new attempt at a read
        self._good: dict[int, bool] = {}  # step -> finite and healthy when saved

        policies: list[ocm.PreservationPolicy] = [
            ocm.LatestN(n=keep_last),
            NewestGood(self.is_good),  # a run gone bad never pushes out its last good state
            *self._best,
        ]
        best_fn, first = None, self._best[0] if self._best else None
        if first is not None:
            # The manager writes per-step metrics (so the rankings survive restarts) only with a
            # best_fn; `best_step` ranks by itself, so a missing value just ranks last here.
            def best_fn(metrics: Mapping[str, float]) -> float:
                value = _usable(metrics, first.metric)
                worst = -math.inf if first.mode == "max" else math.inf
                return value if value is not None else worst

        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # max_to_keep must stay unset (exclusive with preservation_policy).
            best_fn=best_fn,
            best_mode=first.mode if first is not None else "min",
            enable_async_checkpointing=async_save,
            # A writer removes the tmp directories of interrupted saves. A reader must not: they
            # may be the saves in flight of a run still writing to this directory.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        # Handlers named up front, so metadata of existing checkpoints is readable before a save.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data_state": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "integrity": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(path, item_handlers=handlers, options=options)
        self._last_saved: int | None = None  # the newest step handed to the manager

    def _disk_full(self, code: int, step: int | None) -> OSError:
        """The manager's bare ``[Errno 28] No space left on device``, said with where and what
        is left: the failed step is never committed, so the previous checkpoint stays usable."""
        try:
            kept = self.latest_step()
        except Exception:  # the manager may be in a bad state after the failure
            kept = None
        left = (
            f"the newest complete checkpoint, {kept}, is untouched and a rerun resumes from it"
            if kept is not None
            else "no complete checkpoint was written yet"
        )
        return OSError(
            code,
            f"checkpoint {step} could not be written to {self.directory}: the disk is full "
            f"({os.strerror(code)}); {left}. Free space there and rerun the same command.",
        )

    def _failed_step(self, step: int | None) -> int | None:
        """The step whose write failed: an earlier async save still pending, else ``step``."""
        last = self._last_saved
        try:
            pending = last is not None and last not in self._manager.all_steps()
        except Exception:
            pending = False
        return last if pending or step is None else step

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def _ranking(self, step: int, metrics: Mapping[str, float] | None) -> dict | None:
        """The metrics the manager records for ``step``, or None (recency alone keeps it)."""
        if metrics is None or not self._best:
            return None
        if all(_usable(metrics, b.metric) is None for b in self._best):
            logging.info("checkpoint %d: no usable %s, not ranked", step, self.tracked)
            return None
        return {k: float(v) for k, v in metrics.items()}

    @property
    def tracked(self) -> list[str]:
        return [b.metric for b in self._best]

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict,
        meta: dict,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
        healthy: bool = True,
    ) -> bool:
        """Starts saving `step` (asynchronously if enabled); returns False if skipped.

        Orbax skips steps <= the latest saved one unless `force` (and raises if the step
        directory already exists). With async saving, arrays are copied off the device before
        this returns, so the caller may donate/overwrite `state` right away; the write and the
        deletion of old steps finish in the background (see `wait`). ``healthy=False`` says the
        run is skipping non-finite updates: the checkpoint is kept but not counted as good.
        """
        if self._read_only:
            raise PermissionError(f"{self.directory}: opened read-only, cannot save step {step}")
        record = integrity.record(state)  # every process: the fingerprints are collectives
        self._good[step] = record.finite and healthy
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(_jsonable(data_state)),
            meta=ocp.args.JsonSave(_jsonable(meta)),
            integrity=ocp.args.JsonSave(record.to_json(healthy)),
        )
        try:
            saved = self._manager.save(
                step, args=args, metrics=self._ranking(step, metrics), force=force
            )
        except Exception as e:
            if (code := _disk_full_errno(e)) is None:
                raise
            raise self._disk_full(code, self._failed_step(step)) from e
        if saved:
            self._last_saved = step
        return saved

    def _integrity_record(self, step: int) -> dict | None:
        """The step's integrity record; None for a checkpoint written before records existed."""
        if not (self.directory / str(step) / "integrity").exists():
            return None
        args = ocp.args.Composite(integrity=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args)["integrity"]

    def is_good(self, step: int) -> bool:
        """Finite when saved and saved while no update was being skipped. A checkpoint without
        a record (older code) counts as good; one whose record cannot be read does not."""
        if step not in self._good:
            try:
                saved = self._integrity_record(step)
                self._good[step] = saved is None or (saved["finite"] and saved["healthy"])
            except Exception:
                self._good[step] = False
        return self._good[step]

    def newest_good(self) -> int | None:
        return max((s for s in self.all_steps() if self.is_good(s)), default=None)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self, metric: str | None = None) -> int | None:
        """The best step by ``metric`` (default: the first tracked); None if untracked or no
        checkpoint carries a usable value of it."""
        if not self._best:
            return None
        by = {b.metric: b for b in self._best}
        if metric is not None and metric not in by:
            raise KeyError(f"{metric!r} is not tracked (best_metric lists {self.tracked})")
        policy = by[metric] if metric is not None else self._best[0]
        steps = self.all_steps()
        return policy.best({s: _usable(self._manager.metrics(s), policy.metric) for s in steps})

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _resolve(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def _read(self, what: str, step: int, read: Callable[[], Any]) -> Any:
        """``read()``, tried again after each of ``retry_delays`` when it fails the way a
        network filesystem does for a while (a damaged file fails at once, the same way)."""
        for delay in (*self._retry_delays, None):
            try:
                return read()
            except Exception as e:
                if delay is None or not _transient(e):
                    raise
                logging.warning(
                    "checkpoint %d in %s: reading its %s failed (%s: %s); trying again in %g s",
                    step, self.directory, what, type(e).__name__, str(e)[:200], delay,
                )  # fmt: skip
                time.sleep(delay)
        raise AssertionError("unreachable")

    def restore_newest_readable(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """Restores the newest checkpoint that reads back whole and verified, as (step, state,
        data, meta).

        A checkpoint that fails to restore (truncated or corrupt files, after retries of
        transient errors) or to verify (`integrity.verify`) is set aside with a warning naming
        it, the failed check and the one used instead; None when there is no checkpoint at all.
        """
        steps = sorted(self.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                read = functools.partial(self.restore, step, abstract_state=abstract_state)
                return (step, *self._read("state", step, read))
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                fallback = steps[i + 1] if i + 1 < len(steps) else None
                why = f"{type(e).__name__}: {str(e)[:300]}"
                kept = self.set_aside(step, why)
                logging.warning(
                    "checkpoint %d in %s cannot be restored (%s); moved to %s; %s",
                    step,
                    self.directory,
                    why,
                    kept,
                    f"falling back to checkpoint {fallback}"
                    if fallback is not None
                    else "no older checkpoint is left",
                )
        if steps:
            raise RuntimeError(f"no checkpoint in {self.directory} can be restored: {steps}")
        return None

    def set_aside(self, step: int, why: str = "", folder: str = "unreadable") -> epath.Path:
        """Moves a checkpoint out of the manager's directory to ``<dir>_<folder>/`` (kept for
        inspection, with ``why`` in its ``SET_ASIDE.txt``), so the run can write that step
        again."""
        target = self.directory.parent / f"{self.directory.name}_{folder}" / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.parent / f"{step}.{len(list(target.parent.iterdir()))}"
            (self.directory / str(step)).rename(target)
            if why:
                (target / "SET_ASIDE.txt").write_text(why + "\n")
        if jax.process_count() > 1:  # every process must see the move before it reloads
            multihost_utils.sync_global_devices(f"xlm_jax: set aside checkpoint {step}")
        self._manager.reload()
        self._good.pop(step, None)
        return target

    def newest_readable_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose metadata reads back; see above."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                read = functools.partial(self.restore_meta, step)
                return step, self._read("metadata", step, read)
            except Exception as e:
                logging.warning(
                    "checkpoint %d in %s: metadata unreadable (%s); trying an older one",
                    step,
                    self.directory,
                    type(e).__name__,
                )
        return None

    def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores `step` (default: latest) as (state, data_state, meta).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set, e.g.
        `jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init_fn), shardings)`: arrays are read directly into that sharding,
        whatever mesh the checkpoint was written from.
        """
        step = self._resolve(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_state=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        self._verify(step, restored["state"])
        return restored["state"], restored["data_state"], restored["meta"]

    def _verify(self, step: int, state: Any) -> None:
        """Raises `IntegrityError` unless ``state`` is what ``step`` saved (see `integrity`)."""
        saved = self._integrity_record(step)
        if saved is None:
            logging.info("checkpoint %d: no integrity record (older code), not verified", step)
            return
        integrity.verify(state, saved, step)

    def restore_numpy(self, step: int | None = None) -> Any:
        """The `state` of `step` (default: latest) as nested dicts of numpy arrays on the host.

        Needs no mesh and no model: for inspection, exports, and comparing runs made on different
        topologies.
        """
        step = self._resolve(step)
        metadata = self._manager.item_metadata(step)["state"]
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), metadata
        )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        self._verify(step, restored["state"])
        return jax.tree.map(np.asarray, restored["state"])

    def restore_meta(self, step: int | None = None) -> dict:
        """Reads only the JSON `meta` of `step` (default: latest); touches no arrays."""
        step = self._resolve(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def wait(self) -> None:
        """Blocks until pending async saves (and the deletions they trigger) are finished."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if (code := _disk_full_errno(e)) is None:
                raise
            raise self._disk_full(code, self._failed_step(None)) from e

    def close(self) -> None:
        try:
            self._manager.close()  # waits for pending saves first
        except Exception as e:
            if (code := _disk_full_errno(e)) is None:
                raise
            raise self._disk_full(code, self._failed_step(None)) from e

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
