"""The one training loop: pretraining, translation and XNLI fine-tuning all run `run`.

A task plugs in as a `Task` (its settings checks, batch sizes, checkpoint ranking and `setup`);
`setup` returns a `Plan`: the model and optimizer, which update each loop step makes, the compiled
programs and the evaluation, and what a checkpoint saves. The loop owns the rest, the same for
every task: mesh and batch checks, the checkpoint's metadata and fallback past unreadable
checkpoints, the train state with its shardings, resume or pretrained init, the metrics window
(tokens/s, TFLOP/s, MFU), the non-finite guard, evaluation on its cadence, best/patience,
preemption, and checkpoint-or-stop.

Loop state (a JSON dict saved in every checkpoint): ``step`` (loop steps done), ``best`` and
``bad_evals`` (patience), ``nonfinite_run`` (skipped updates in a row), ``stopped``, plus what a
task adds. The step index fixes everything random about a step, so resumed = uninterrupted.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from xlm_jax.core import data_sources, mfu, parallel
from xlm_jax.core.checkpoint import Checkpointer, abstract_of, parse_tracked
from xlm_jax.core.files import write_atomic
from xlm_jax.core.metrics import MetricWriter, summarize
from xlm_jax.core.preemption import Preempted, PreemptionGuard
from xlm_jax.core.train_state import TrainState, init_state

Batch = dict[str, np.ndarray]
SUM_KEYS = ("loss_sum", "n_pred", "n_correct")


# --- what a task gives the loop -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Env:
    """What the loop knows when a task's setup runs: the mesh, this process's rows of a batch,
    the workdir, and the newest readable checkpoint's metadata (None in a fresh run)."""

    workdir: Path
    mesh: Mesh
    rules: parallel.Rules
    batch_sharding: NamedSharding
    saved: dict[str, Any] | None
    where: str  # "checkpoint N in DIR", for messages about ``saved``
    saved_step: int | None = None  # N

    def rows_of(self, n: int) -> tuple[int, int]:
        return parallel.process_rows(self.batch_sharding, n)


def xlm_epoch(epoch_size: int, batch_size: int, iteration_length: int) -> int:
    """Loop steps in one of XLM's epochs: whole iterations (``iteration_length`` steps each)
    until ``epoch_size`` sentences were seen, each step counting ``batch_size`` (XLM's
    ``while n_sentences < epoch_size`` in train.py, checked after each iteration)."""
    per_iteration = batch_size * iteration_length
    return iteration_length * -(-epoch_size // per_iteration)


def epoch_settings(c: ml_collections.ConfigDict) -> None:
    """XLM's ``--epoch_size`` / ``--max_epoch``, for commands pasted from XLM (``xlm_epoch``)."""
    # > 0: evaluate (and keep the best) every epoch of this many sentences, batch_size per step
    # in whole iterations, instead of eval_every. XLM counts one GPU's sentences: multiply its
    # number by its GPU count when batch_size is the global batch of all of them
    c.epoch_size = -1
    c.max_epoch = -1  # > 0 (with epoch_size): stop after this many epochs, instead of max_steps


@dataclasses.dataclass(frozen=True)
class Cadence:
    max_steps: int
    log_every: int
    eval_every: int  # 0 = never
    checkpoint_every: int  # 0 = only after evaluations, at the end and on preemption

    @classmethod
    def of(cls, config: ml_collections.ConfigDict, iteration_length: int = 1) -> Cadence:
        """The config's cadence; in XLM's units when ``epoch_size`` > 0 (``xlm_epoch``)."""
        c = config
        max_steps, eval_every = c.max_steps, c.eval_every
        if c.get("epoch_size", -1) > 0:
            eval_every = xlm_epoch(c.epoch_size, c.batch_size, iteration_length)
            max_steps = c.max_epoch * eval_every if c.max_epoch > 0 else max_steps
        return cls(max_steps, c.log_every, eval_every, c.checkpoint_every)

    def evaluates(self, step: int) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.max_steps)

    def logs(self, step: int) -> bool:
        """A log line ends a window at every ``log_every`` step and at every evaluation."""
        return step % self.log_every == 0 or step == self.max_steps or self.evaluates(step)

    def checkpoints(self, step: int) -> bool:
        return self.checkpoint_every > 0 and step % self.checkpoint_every == 0


@dataclasses.dataclass(frozen=True)
class Update:
    """The update loop step ``s`` makes: ``programs.train[program](state, global batch,
    int32(s), float32(lam), *extra)``. ``fetch`` (this process's rows) runs only if it does:
    XLM skips an objective whose lambda is 0 without reading its batch."""

    key: str  # the metrics' name for it, e.g. "mlm_en"
    program: str
    lam: float
    rows: int  # of the global batch
    fetch: Callable[[], Batch]
    flops_per_token: Callable[[int], float] = lambda length: 0.0  # model FLOPs at a row length
    extra: tuple = ()


@dataclasses.dataclass(frozen=True)
class Programs:
    """A run's compiled functions, its evaluation ``(params, step) -> metrics``, and how many
    programs it compiled (tests check that the loop never recompiles)."""

    train: Mapping[str, Callable]
    evaluate: Callable[[Any, int], dict[str, float]]
    compilations: Callable[[], int]


def _iterators_state(plan: Plan, loop: dict) -> dict:
    return {"loop": loop, "iterators": {k: it.state() for k, it in plan.iterators.items()}}


def _restore_iterators(plan: Plan, saved: dict, step: int) -> dict:
    for key, it_state in saved["iterators"].items():
        plan.iterators[key].restore(it_state)
    return {"nonfinite_run": 0, **saved["loop"]}


@dataclasses.dataclass
class Plan:
    """A task's run, as its setup built it."""

    model: nn.Module
    tx: optax.GradientTransformation
    compile: Callable[[Any], Programs]  # the state's shardings -> programs
    update: Callable[[int], Update]
    cadence: Cadence
    meta: dict[str, Any]  # saved with every checkpoint
    describe: str  # one log line on what runs
    pad_id: int  # the tokens' padding id: the loop counts real tokens for tokens/s and MFU
    iterators: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metric_names: Sequence[str] | None = None  # what ``evaluate`` reports, known up front
    example: Callable[[int], tuple] | None = None  # model.init's dummy arguments for n rows
    init_params: Callable[[TrainState], TrainState] | None = None  # fresh run: pretrained init
    lr: Callable[[int], float] | None = None  # the learning rate after n updates, for the log
    loop: dict[str, Any] = dataclasses.field(default_factory=dict)  # the task's loop keys
    # The checkpoint's data state from the loop state, and back (restoring iterators).
    save_state: Callable[[Plan, dict], dict] = _iterators_state
    restore_state: Callable[[Plan, dict, int], dict] = _restore_iterators
    observe: Callable[[dict, str, dict], None] | None = None  # each counted finite update
    on_eval: Callable[[dict, int, dict], dict] | None = None  # -> the checkpoint's metrics
    eval_at_start: bool = False  # also evaluate before the first update (a fresh run)
    finish: Callable[[dict, dict], Any] | None = None  # (loop, last scalars) -> the result
    sources: Sequence[Path] = ()  # the data files (or dataset directories) the run reads
    # path -> {"size", "mtime_ns", "sha256"} already taken (e.g. when the data was prepared): a
    # file whose size and mtime are unchanged is not hashed again at every start
    known_sources: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def run_meta(config: ml_collections.ConfigDict, tokenizer_bytes: bytes, **fields: Any) -> dict:
    """A checkpoint's metadata: the config, the task's ``fields``, the tokenizer (a resumed or
    fine-tuned run never retrains it) and the library versions that wrote it."""
    return {
        "config": config.to_dict(),
        **fields,
        "tokenizer": base64.b64encode(tokenizer_bytes).decode("ascii"),
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }


def default_best(config: ml_collections.ConfigDict) -> tuple[str | None, str]:
    return config.best_metric or None, config.best_mode


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    setup: Callable[[ml_collections.ConfigDict, Env], Plan]
    batch_sizes: Callable[[ml_collections.ConfigDict], Mapping[str, int]]
    best: Callable[[ml_collections.ConfigDict], tuple[str | None, str]] = default_best
    check: Callable[[ml_collections.ConfigDict], None] = lambda config: None


# --- the non-finite guard, best/patience, saving -----------------------------------------------


def nonfinite_settings(c: ml_collections.ConfigDict) -> None:
    """The settings of the non-finite step guard (``apply_gradients``, ``count_nonfinite``)."""
    c.max_nonfinite_steps = 20  # stop after this many consecutive skipped (NaN/inf) updates
    c.debug_nonfinite_steps = ""  # test hook: "5,6" makes those steps' loss NaN


def log_settings(c: ml_collections.ConfigDict) -> None:
    """Where the loop's scalars go besides the console and ``metrics.jsonl`` (``MetricWriter``).
    False spares tensorboardX's import, which imports PyTorch where it is installed: ~1.4 s of
    CPU at every start on a 2-core AMD EPYC."""
    c.tensorboard = True  # also TensorBoard event files in workdir/tensorboard


def resume_settings(c: ml_collections.ConfigDict) -> None:
    """What a run does with a workdir whose checkpoints all fail to read (``prepare``), and a
    resume whose data changed (``data_sources``)."""
    # A workdir whose checkpoints all fail to read: True = set them aside and start over;
    # False = refuse to run (never a silent restart)
    c.restart_from_scratch = False
    # A resume whose data files changed (size or hash): True = go on, warn and record it in the
    # checkpoint; False = refuse (the saved data positions index into the old data)
    c.allow_data_change = False


def eval_only_settings(c: ml_collections.ConfigDict) -> None:
    """XLM's ``--eval_only``: evaluate one checkpoint of the workdir (``evaluate_only``)."""
    c.eval_only = False  # True: evaluate a checkpoint and exit; nothing is trained or saved
    c.eval_checkpoint = "latest"  # which: "latest" (what a resume reads), "best", or a step


LEAST = {"max_steps": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0}


def check_loop_settings(config: ml_collections.ConfigDict) -> None:
    """The loop's own settings, before anything is read: each an integer of at least LEAST
    (``checkpoint_every`` 0 = after evaluations, at the end and on preemption only)."""
    for name, least in LEAST.items():
        if name in config and config[name] < least:
            raise ValueError(f"{name}={config[name]}: must be at least {least}")
    if config.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints={config.keep_checkpoints}: must be at least 1")


def refuse_silent_restart(ckpt: Checkpointer, newest, config: ml_collections.ConfigDict) -> None:
    """A workdir with checkpoints of which none reads back (or only set-aside ones) is not a
    fresh start: refuse, unless ``restart_from_scratch``, which sets the unreadable ones aside."""
    steps = ckpt.all_steps()
    aside = ckpt.directory.parent / f"{ckpt.directory.name}_unreadable"
    set_aside = sorted(p.name for p in aside.iterdir()) if aside.exists() else []
    if newest is not None or not (steps or set_aside):
        return
    if not config.restart_from_scratch:
        raise RuntimeError(
            f"{ckpt.directory} holds no readable checkpoint (unreadable metadata: steps "
            f"{steps}; set aside earlier as unreadable: {set_aside} in {aside}). Refusing to "
            "start over: repair or remove them, or rerun with "
            "--config.restart_from_scratch=true to set them aside and train from step 0"
        )
    for step in steps:
        logging.warning("restart_from_scratch: setting aside checkpoint %d", step)
        ckpt.set_aside(step)


def poisoned_steps(config: ml_collections.ConfigDict) -> set[int]:
    """The loop steps whose loss ``debug_nonfinite_steps`` makes NaN (a test hook)."""
    return {int(x) for x in str(config.debug_nonfinite_steps).split(",") if x.strip()}


def count_nonfinite(
    flags: Iterable[float], loop: dict[str, Any], limit: int, advice: Callable[[], str]
) -> None:
    """Follows the steps' ``nonfinite`` flags, in order, in ``loop["nonfinite_run"]`` (saved with
    the loop state, so a resume counts on); raises ``FloatingPointError`` after ``limit`` skips in
    a row, with ``advice()``: which checkpoint to go on from."""
    for flag in flags:
        loop["nonfinite_run"] = loop["nonfinite_run"] + 1 if flag else 0
        if loop["nonfinite_run"] >= limit:
            raise FloatingPointError(
                f"{loop['nonfinite_run']} consecutive steps with a non-finite loss or gradient "
                f"before step {loop['step']}; their updates were skipped. {advice()}"
            )


def good_checkpoint_advice(ckpt: Checkpointer, abstract: Any) -> str:
    """Names the newest good checkpoint (finite when saved, no update being skipped), verified
    by reading it back now, and the command that makes a rerun resume from it. Reading it needs
    memory for a second copy of the state, as a resume does."""
    ckpt.wait()  # the checkpoints named are complete, not saves still in flight
    steps = ckpt.all_steps()
    if not steps:
        return "No checkpoint was written yet."
    for step in sorted((s for s in steps if ckpt.is_good(s)), reverse=True):
        try:
            ckpt.restore(step, abstract_state=abstract)  # raises if it does not verify
        except Exception as e:
            logging.warning("checkpoint %d does not verify: %s: %s", step, type(e).__name__, e)
            continue
        later = [s for s in steps if s > step]
        if not later:
            return f"The newest verified good checkpoint is {step}; rerun to resume from it."
        aside = ckpt.directory.parent / f"{ckpt.directory.name}_superseded"
        mv = "gcloud storage mv" if "://" in str(aside) else "mv"
        moved = " ".join(str(ckpt.directory / str(s)) for s in later)
        return (
            f"The newest verified good checkpoint is {step} (finite when saved, no update being "
            f"skipped, checksums verified just now); checkpoints {later} were saved while updates "
            f"were being skipped. To go on from {step}, fix the cause, move the later ones "
            f"aside and rerun: mkdir -p {aside} && {mv} {moved} {aside}/"
        )
    return (
        f"No checkpoint in {ckpt.directory} is verified good (finite when saved, no update "
        f"being skipped): steps {steps}."
    )


def track_best(loop: dict[str, Any], value: float, metric: str, mode: str, patience: int) -> bool:
    """Updates ``loop``'s best value and count of evaluations without improvement; True when
    ``patience`` (> 0) evaluations in a row did not improve."""
    better = loop["best"] is None or (
        value < loop["best"] if mode == "min" else value > loop["best"]
    )
    loop["best"], loop["bad_evals"] = (
        (value, 0) if better else (loop["best"], loop["bad_evals"] + 1)
    )
    if patience > 0 and loop["bad_evals"] >= patience:
        logging.info("stopping: %s did not improve for %d evaluations", metric, patience)
        return True
    return False


def count_tokens(batch: Batch, rows: int, pad_id: int) -> int:
    """Real (non-padding) tokens of a global batch of ``rows`` rows, from this process's rows."""
    n = sum(int(np.count_nonzero(v != pad_id)) for k, v in batch.items() if "tokens" in k)
    return n * rows // len(next(iter(batch.values())))


# Updates dispatched ahead of the device at most. JAX dispatches asynchronously and the host
# prepares a batch in microseconds, so unbounded it ran dozens of steps ahead: a stop request
# (SIGTERM, with a scheduler's grace period of seconds) then waited for all of them before the
# checkpoint (100 s measured at 30 queued 3-s steps). Two keep the next batch's host work
# overlapped with the device's step.
IN_FLIGHT = 2


class Window:
    """The updates since the last log line. Their sums stay on device until a log line or a
    checkpoint needs them (the loop's only regular host sync); each update is then counted once,
    in order: its non-finite flag goes to the guard and, if finite, its sums to ``observe``."""

    def __init__(self, loop: dict, guard: Callable[[list[float]], None], observe) -> None:
        self.loop, self.guard, self.observe = loop, guard, observe
        self.updates: list[tuple[str, Any]] = []  # (key, device sums | host dict once counted)
        self.counted, self.tokens, self.flops = 0, 0, 0.0
        self.since: float | None = None  # the first window includes compilation: no rates

    def add(self, key: str, sums: Any, tokens: int, flops: float) -> None:
        self.updates.append((key, sums))
        self.tokens, self.flops = self.tokens + tokens, self.flops + flops
        if len(self.updates) > IN_FLIGHT:  # the update IN_FLIGHT back has finished on device
            jax.block_until_ready(self.updates[-1 - IN_FLIGHT][1])

    def count(self) -> list[tuple[str, dict[str, float]]]:
        got = jax.device_get([s for _, s in self.updates])
        host = [
            (k, {n: float(v) for n, v in s.items()})
            for (k, _), s in zip(self.updates, got, strict=True)
        ]
        new, self.updates, self.counted = host[self.counted :], host, len(host)
        self.guard([s["nonfinite"] for _, s in new])
        if self.observe is not None:
            for key, s in new:
                if not s["nonfinite"]:
                    self.observe(self.loop, key, s)
        return host

    def scalars(self, peak: float | None) -> dict[str, float]:
        """The window's loss/accuracy/perplexity and gradient norm per key (skipped updates left
        out: they would make it NaN), how many were skipped, and its throughput."""
        done: dict[str, list[dict]] = {}
        host = self.count()
        for key, s in host:
            if not s["nonfinite"]:
                done.setdefault(key, []).append(s)
        out = summarize({k: {n: sum(s[n] for s in v) for n in SUM_KEYS} for k, v in done.items()})
        out |= {
            f"{k}/grad_norm": float(np.mean([s["grad_norm"] for s in v])) for k, v in done.items()
        }
        out["skipped_updates"] = float(sum(s["nonfinite"] for _, s in host))
        if self.since is not None and self.flops > 0:  # count() waited for the window's steps
            seconds = time.perf_counter() - self.since
            out |= mfu.throughput(self.tokens, self.flops, seconds, jax.device_count(), peak)
        return out

    def restart(self) -> None:
        self.updates, self.counted, self.tokens, self.flops = [], 0, 0, 0.0
        self.since = time.perf_counter()


# --- the loop ----------------------------------------------------------------------------------


def prepare(task: Task, config: ml_collections.ConfigDict, workdir: Path, ckpt_kw: dict):
    """Checks settings, mesh and batch sizes (milliseconds), opens the checkpoint directory and
    reads the newest readable checkpoint's metadata: what a task's setup starts from."""
    check_loop_settings(config)
    task.check(config)
    rules = parallel.rules_from_config(config.mesh.rules)
    mesh = parallel.make_mesh(config.mesh.shape)
    for what, n in task.batch_sizes(config).items():
        parallel.check_batch_size(n, mesh, rules, what)
    best_metric, best_mode = task.best(config)
    tracked = parse_tracked(best_metric, best_mode)  # the first is patience's
    ckpt = Checkpointer(
        workdir / "checkpoints", best_metric=best_metric, best_mode=best_mode, **ckpt_kw
    )
    newest = ckpt.newest_readable_meta()
    refuse_silent_restart(ckpt, newest, config)
    latest, saved = newest if newest is not None else (None, None)
    where = f"checkpoint {latest} in {ckpt.directory}"
    env = Env(workdir, mesh, rules, parallel.batch_sharding(mesh, rules), saved, where, latest)
    return env, ckpt, tracked


def start_state(plan: Plan, env: Env, ckpt: Checkpointer, seed: int):
    """The train state with its shardings, restored from the newest checkpoint that reads back
    (an unreadable one is set aside) or initialised (``plan.init_params``); the loop state."""
    dp = parallel.data_parallel_size(env.mesh, env.rules)
    state, shardings = init_state(
        plan.model, plan.tx, jax.random.key(seed), env.mesh, env.rules, dp, plan.example
    )
    loop = {"step": 0, "best": None, "bad_evals": 0, "nonfinite_run": 0, **plan.loop}
    if env.saved is not None:
        # the state just built: restoring reads straight into its shardings
        latest, state, data_state, _ = ckpt.restore_newest_readable(abstract_of(state))
        loop = {**loop, **plan.restore_state(plan, data_state, latest)}
        logging.info("resumed from step %d (%d updates)", loop["step"], int(state.step))
    elif plan.init_params is not None:
        state = plan.init_params(state)
    return state, shardings, loop


def check_measured(tracked: Sequence[tuple[str, str]], names: Sequence[str] | None) -> None:
    for metric, _ in tracked if names is not None else ():
        if metric not in names:
            raise ValueError(
                f"best_metric {metric!r} will not be measured; the evaluation reports "
                f"{sorted(names)}"
            )


def one_update(
    plan: Plan, programs: Programs, env: Env, window: Window, state, step: int, poisoned: set[int]
) -> TrainState:
    """Loop step ``step``'s update, its sums added to the window (no host sync)."""
    u = plan.update(step)
    lam = math.nan if step in poisoned else u.lam  # test hook: a NaN step
    if lam == 0:  # XLM skips an objective whose lambda is 0
        return state
    batch = u.fetch()
    tokens = count_tokens(batch, u.rows, plan.pad_id)
    length = next(iter(batch.values())).shape[1]
    state, sums = programs.train[u.program](
        state,
        parallel.global_batch(batch, env.batch_sharding, u.rows),
        np.int32(step),  # the step's keys: fold_in(key(seed), step), inside the program
        np.float32(lam),
        *u.extra,
    )
    window.add(u.key, sums, tokens, tokens * u.flops_per_token(length))
    return state


def start(task: Task, config: ml_collections.ConfigDict, workdir: Path, guard: PreemptionGuard):
    """Everything before the first update: checks, the task's setup, the state (restored or
    initialised) and the compiled programs. A stop requested meanwhile ends it, unsaved."""
    env, ckpt, tracked = prepare(task, config, workdir, {"keep_last": config.keep_checkpoints})
    plan = task.setup(config, env)
    # Before anything compiles: a resume over changed data is refused (or, allowed, recorded).
    allow, step = config.allow_data_change, env.saved_step
    plan.meta.update(
        data_sources.check(
            env.saved, plan.sources, allow, step, env.where, known=plan.known_sources
        )
    )
    check_measured(tracked, plan.metric_names)
    state, shardings, loop = start_state(plan, env, ckpt, config.seed)
    programs = plan.compile(shardings)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("%s; %d parameters; mesh %s", plan.describe, n_params, dict(env.mesh.shape))
    if guard.should_stop(loop["step"]):  # nothing trained yet: nothing to save
        ckpt.close()
        raise Preempted(loop["step"], saved=False)
    return env, ckpt, plan, (state, loop, programs), tracked


def _listed(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))


def eval_step_of(ckpt: Checkpointer, which: str, latest: int) -> int:
    """The checkpoint ``eval_checkpoint`` names: "latest" (the newest readable), "best" (by the
    first tracked metric) or a step number; an absent one is an error, never another step."""
    which = str(which).strip()
    if which == "latest":
        return latest
    step = ckpt.best_step() if which == "best" else int(which) if which.isdigit() else None
    if step is None or step not in ckpt.all_steps():
        raise ValueError(
            f"eval_checkpoint={which!r}: no such checkpoint in {ckpt.directory} (steps "
            f"{ckpt.all_steps()}, best {ckpt.best_step()}; expected 'latest', 'best' or a step)"
        )
    return step


def evaluate_only(task: Task, config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """XLM's ``--eval_only``: the task's evaluation of one checkpoint of ``workdir``, written to
    ``workdir/eval_only/step_N.json`` and returned (with ``step``). Nothing is trained, and the
    checkpoints are opened read-only: nothing there is written or removed."""
    env, ckpt, _ = prepare(task, config, workdir, {"read_only": True})
    try:
        if env.saved is None:
            raise FileNotFoundError(f"eval_only: no readable checkpoint in {ckpt.directory}")
        step = eval_step_of(ckpt, config.eval_checkpoint, env.saved_step)
        plan = task.setup(config, env)
        dp = parallel.data_parallel_size(env.mesh, env.rules)
        state, shardings = init_state(
            plan.model, plan.tx, jax.random.key(config.seed), env.mesh, env.rules, dp, plan.example
        )
        state = ckpt.restore(step, abstract_state=abstract_of(state))[0]
    finally:
        ckpt.close()
    programs = plan.compile(shardings)
    with parallel.mesh_context(env.mesh, env.rules):
        metrics = programs.evaluate(state.params, step)
    logging.info("eval_only, checkpoint %d: %s", step, _listed(metrics))
    result = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    if jax.process_index() == 0:
        out = workdir / "eval_only" / f"step_{step}.json"
        out.parent.mkdir(exist_ok=True)
        write_atomic(out, (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
    return result


def run(
    task: Task,
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    on_step: Callable[[int, TrainState], None] | None = None,
) -> Any:
    """Runs ``task`` as ``config`` says, resuming from ``workdir`` if it holds a checkpoint.

    Returns ``plan.finish(loop, last)``, by default the last logged scalars and
    ``compiled_programs``. On SIGTERM/SIGINT it checkpoints at the next step boundary and
    raises ``Preempted``. ``on_step(step, state)`` runs after every loop step (tests).
    """
    workdir = Path(workdir)
    if config.get("eval_only"):
        return evaluate_only(task, config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Installed first: a signal while starting up also ends with Preempted (exit 75).
    with PreemptionGuard() as guard:
        env, ckpt, plan, (state, loop, programs), tracked = start(task, config, workdir, guard)
        best_metric, best_mode = tracked[0] if tracked else (None, "min")
        cad = plan.cadence
        writer = MetricWriter(
            workdir,
            total_steps=cad.max_steps,
            is_primary=jax.process_index() == 0,
            tensorboard=config.tensorboard,
        )

        def guard_nonfinite(flags: list[float]) -> None:
            advise = functools.partial(good_checkpoint_advice, ckpt, abstract_of(state))
            count_nonfinite(flags, loop, config.max_nonfinite_steps, advise)

        window = Window(loop, guard_nonfinite, plan.observe)
        peak = mfu.peak_flops_per_device(config.peak_flops_per_device)
        poisoned = poisoned_steps(config)
        last: dict[str, float] = {}

        def save(metrics: Mapping[str, float] | None = None, force: bool = False) -> None:
            window.count()  # a task's observed sums (e.g. the epoch's loss) go into the checkpoint
            healthy = loop["nonfinite_run"] == 0  # else kept, but not as the good one
            kw = {"data_state": plan.save_state(plan, loop), "meta": plan.meta, "healthy": healthy}
            ckpt.save(loop["step"], state, metrics=metrics, force=force, **kw)

        def evaluate(step: int) -> dict[str, float]:
            metrics = programs.evaluate(state.params, step)
            writer.write(step, metrics)
            logging.info("eval step %d: %s", step, _listed(metrics))
            last.update(metrics)
            return plan.on_eval(loop, step, metrics) if plan.on_eval is not None else metrics

        try:
            with parallel.mesh_context(env.mesh, env.rules):
                if plan.eval_at_start and env.saved is None:
                    evaluate(0)
                while loop["step"] < cad.max_steps and not loop.get("stopped"):
                    state = one_update(plan, programs, env, window, state, loop["step"], poisoned)
                    loop["step"] += 1
                    step = loop["step"]
                    if on_step is not None:
                        on_step(step, state)
                    if cad.logs(step):
                        scalars = window.scalars(peak)
                        if plan.lr is not None:
                            scalars["lr"] = plan.lr(int(state.step))
                        writer.progress(step, scalars, tokens=window.tokens)
                        writer.write(step, scalars, prefix="train/")
                        last.update({f"train/{k}": v for k, v in scalars.items()})
                    metrics = evaluate(step) if cad.evaluates(step) else None
                    if metrics is not None and best_metric in metrics:  # evaluators may skip some
                        value = metrics[best_metric]
                        loop["stopped"] = track_best(
                            loop, value, best_metric, best_mode, config.patience
                        )
                    if cad.logs(step):
                        window.restart()  # after the evaluation: a window times only its updates
                    done = step >= cad.max_steps or bool(loop.get("stopped"))
                    preempted = guard.should_stop(step) and not done
                    if metrics is not None or cad.checkpoints(step) or done or preempted:
                        save(metrics, force=done or preempted)
                    if preempted:
                        ckpt.close()  # waits for the save: its error, if it failed, not Preempted
                        writer.close()
                        raise Preempted(step)
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the run is the one to see
                ckpt.close()  # a crash, too, waits for a save in flight: the newest good checkpoint
            writer.close()
            raise
        ckpt.close()  # waits for pending saves first
        writer.close()
        last["compiled_programs"] = programs.compilations()
        logging.info("compiled programs: %d", last["compiled_programs"])
        return plan.finish(loop, last) if plan.finish is not None else last
