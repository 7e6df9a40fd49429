"""Stopping cleanly when the scheduler says so: SIGTERM/SIGINT, or JAX's preemption sync point.

The first signal only sets a flag; the training loop checks it at each step boundary, writes a
checkpoint and exits with ``EXIT_PREEMPTED``, so rerunning the same command resumes. A second
signal ends the process at once: checkpoints are committed atomically by Orbax and every other
file is written atomically too, so an abrupt end loses at most the unsaved steps.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from absl import logging
from jax.experimental import multihost_utils

# sysexits.h EX_TEMPFAIL: "try again later"; schedulers can requeue on it.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised by the loop after it saved a checkpoint because a stop was requested."""

    def __init__(self, step: int, *, saved: bool = True) -> None:
        super().__init__(
            f"stopped at step {step} on request; the checkpoint is saved, rerun to resume"
            if saved
            else f"stopped on request while starting (step {step}); nothing was written, rerun"
        )
        self.step = step


class PreemptionGuard:
    """Context manager: installs the handlers, answers ``should_stop(step)`` at step boundaries.

    With several processes every one must stop at the same step, so the local flags are combined
    (a tiny all-gather) every ``sync_every`` steps, and JAX's own preemption notice (Cloud TPU
    maintenance events) is honoured through ``reached_preemption_sync_point``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, sync_every: int = 10) -> None:
        self.sync_every = sync_every
        self._requested = threading.Event()
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._requested.is_set():  # second signal: stop now, with the default behaviour
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        logging.warning(
            "%s received: checkpointing at the next step boundary (send it again to stop at once)",
            signal.Signals(signum).name,
        )
        self._requested.set()

    def request(self) -> None:
        """Asks for a stop as a signal would (tests, hooks)."""
        self._requested.set()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._requested.is_set()
        if multihost_utils.reached_preemption_sync_point(step):
            return True
        if step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(int(self._requested.is_set()))
        return bool(max(flags))
