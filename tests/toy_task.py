"""A task that is not XLM: least squares on synthetic data, plugged into the one loop.

It is the worked example of ``docs/architecture.md`` ("Adding a task"): its settings, a pure
step function, a data iterator that saves its position, an evaluation and ``setup``; the loop
gives it checkpoints, exact resume, preemption, the metrics window and best/patience.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from xlm_jax.core import loop, parallel, train_state

N_FEATURES = 4


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 8
    c.lr = 0.1
    c.max_steps = 12
    c.log_every = 2
    loop.log_settings(c)  # tensorboard
    c.tensorboard = False  # (as conftest.TENSORBOARD: no tensorboardX import)
    c.eval_every = 4
    c.checkpoint_every = 3
    c.keep_checkpoints = 2
    c.best_metric = "valid/loss"
    c.best_mode = "min"
    c.patience = -1
    c.peak_flops_per_device = 0.0
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1), "rules": parallel.DEFAULT_RULES})
    loop.nonfinite_settings(c)
    loop.resume_settings(c)  # restart_from_scratch
    loop.eval_only_settings(c)  # XLM's --eval_only
    loop.epoch_settings(c)  # XLM's epoch_size / max_epoch
    return c


class Rows:
    """Batches of ``(x, y)`` rows in a seeded order; its state is the number of batches taken."""

    def __init__(self, seed: int, batch_size: int, rows: tuple[int, int]) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(64, N_FEATURES)).astype(np.float32)
        self.y = self.x @ np.arange(1, N_FEATURES + 1, dtype=np.float32)
        self.batch_size, self.rows, self.taken = batch_size, rows, 0

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.taken * self.batch_size % len(self.x)
        index = np.arange(start, start + self.batch_size)[slice(*self.rows)] % len(self.x)
        self.taken += 1
        # the loop's batch convention: (batch, length) arrays; "tokens" are counted (none padded)
        return {"tokens": self.x[index], "targets": self.y[index][:, None]}

    def state(self) -> dict[str, int]:
        return {"taken": self.taken}

    def restore(self, state: dict[str, int]) -> None:
        self.taken = state["taken"]


def loss_sums(params, batch, model) -> dict[str, jax.Array]:
    error = model.apply({"params": params}, batch["tokens"]) - batch["targets"][:, :1]
    n = jnp.asarray(error.shape[0], jnp.float32)
    return {"loss_sum": jnp.sum(error**2), "n_pred": n, "n_correct": jnp.zeros(())}


def train_step(state, batch, rng, lam, *, model, tx):
    del rng  # nothing random: a step is a function of the batch

    def f(params):
        sums = loss_sums(params, batch, model)
        return sums["loss_sum"], sums

    grads, sums = jax.grad(f, has_aux=True)(state.params)
    return train_state.apply_gradients(state, grads, sums, lam, tx)


def setup(config: ml_collections.ConfigDict, env: loop.Env) -> loop.Plan:
    model, tx = nn.Dense(1), optax.sgd(config.lr)
    data = Rows(config.seed, config.batch_size, env.rows_of(config.batch_size))
    valid = Rows(config.seed + 1, config.batch_size, env.rows_of(config.batch_size))
    valid_batch = next(valid)

    def update(step: int) -> loop.Update:
        return loop.Update("fit", "fit", 1.0, config.batch_size, lambda: next(data))

    def compile_programs(shardings) -> loop.Programs:
        repl, batch_sh = parallel.replicated(env.mesh), env.batch_sharding
        step = jax.jit(
            functools.partial(train_step, model=model, tx=tx),
            in_shardings=(shardings, batch_sh, repl, repl),
            out_shardings=(shardings, repl),
            donate_argnums=0,
        )
        score = jax.jit(functools.partial(loss_sums, model=model))

        def evaluate(params, step_: int) -> dict[str, float]:
            batch = parallel.global_batch(valid_batch, batch_sh, config.batch_size)
            sums = jax.device_get(score(params, batch))
            return {"valid/loss": float(sums["loss_sum"] / sums["n_pred"])}

        return loop.Programs({"fit": step}, evaluate, lambda: step._cache_size())

    return loop.Plan(
        model=model,
        tx=tx,
        compile=compile_programs,
        update=update,
        cadence=loop.Cadence.of(config),
        meta={"config": config.to_dict()},
        describe="least squares",
        pad_id=-1,  # no padding
        iterators={"fit": data},
        metric_names=["valid/loss"],
        example=lambda n: (jnp.zeros((n, N_FEATURES), jnp.float32),),
    )


TASK = loop.Task("toy", setup, lambda c: {"batch_size": c.batch_size})
