"""The train state every task trains, its optimizer, the update from gradients, and creating the
state directly with its shardings (nothing of a task: tasks bring their model and loss)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from xlm_jax.core import parallel

Sums = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates applied so far
    params: Any
    opt_state: Any


def inverse_sqrt_schedule(
    lr: float, warmup_steps: int, warmup_init_lr: float, xp: Any = jnp
) -> optax.Schedule:
    """XLM's ``adam_inverse_sqrt``: linear warmup to ``lr``, then ``lr * sqrt(warmup / step)``.
    ``xp=numpy`` evaluates the same float32 arithmetic on the host."""
    warmup_steps = max(1, warmup_steps)

    def schedule(step: jax.Array) -> jax.Array:
        step = xp.asarray(step, xp.float32) + 1.0  # XLM counts updates from 1
        warm = warmup_init_lr + (lr - warmup_init_lr) * step / warmup_steps
        decay = lr * xp.sqrt(warmup_steps / step)
        return xp.where(step < warmup_steps, warm, decay)

    return schedule


def learning_rate(config: ml_collections.ConfigDict, updates: int) -> float:
    """The learning rate of the ``updates``-th update (for the log). On the host: as eager JAX
    ops it compiled eight tiny programs in every run and dispatched them at every log."""
    o = config.optimizer
    schedule = inverse_sqrt_schedule(o.lr, o.warmup_steps, o.warmup_init_lr, xp=np)
    return float(schedule(max(updates - 1, 0)))


def check_optimizer(cfg: ml_collections.ConfigDict, where: str = "optimizer") -> None:
    """Learning rates of at least 0 (0 freezes the parameters; below 0 ascends the loss)."""
    for name in ("lr", "warmup_init_lr"):
        if cfg[name] < 0:
            raise ValueError(f"{where}.{name}={cfg[name]}: a learning rate must be >= 0")
    if cfg.warmup_steps < 0:
        raise ValueError(f"{where}.warmup_steps={cfg.warmup_steps}: must be >= 0")


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Adam with XLM's schedule, global-norm clipping and optional decoupled weight decay.

    Weight decay skips biases and LayerNorm parameters (1-D leaves), the usual practice.
    """
    check_optimizer(cfg)
    return fused_adamw(
        inverse_sqrt_schedule(cfg.lr, cfg.warmup_steps, cfg.warmup_init_lr),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        clip_norm=cfg.clip_grad_norm,
    )


def decayed_leaves(params) -> Any:
    """Weight decay's mask: leaves of 2 or more dimensions (not biases and LayerNorms)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def fused_adamw(
    learning_rate: optax.Schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    clip_norm: float,
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, ...))``
    (no clipping if ``clip_norm <= 0``; decay on leaves of 2 or more dimensions): the same state,
    the same arithmetic (but for a clipped gradient's rounding: one factor, not a division then a
    product), in one elementwise expression per parameter.

    Why: optax's chain materialises the clipped gradients, both moments, the bias-corrected moments
    and the update as separate passes over every parameter; XLA:CPU did not fuse them, and the
    6 x 512 model's update took 111 ms instead of 40 (one pass reads a parameter, its gradient and
    moments and writes the three back: memory bound). ``update`` takes the gradients' global norm
    as ``grad_norm`` when the caller has it (``apply_gradients``), which saves another pass.
    Checkpoints written with the optax chain restore as they are (same state tree).
    """
    reference = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decayed_leaves
        ),
    )

    def update(grads, state, params=None, *, grad_norm=None, **_):
        if params is None:
            raise ValueError("fused_adamw needs the parameters (weight decay)")
        clip_state, (adam, decay_state, schedule) = state
        count = optax.safe_increment(adam.count)
        c1, c2 = 1 - b1**count, 1 - b2**count  # optax.tree.bias_correction's
        step_size = -learning_rate(schedule.count)
        if clip_norm > 0:
            norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
            # One factor (optax divides each gradient by the norm, then multiplies: that pass's
            # output was written out for the three expressions that read it)
            clip = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)

        def leaf(g, m, v, p, decayed):
            if clip_norm > 0:
                g = g * clip.astype(g.dtype)
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * g**2 + b2 * v
            u = (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + eps)
            if decayed:
                u = u + weight_decay * p
            return jnp.array(step_size, dtype=u.dtype) * u, m, v

        out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, decayed_leaves(params))
        updates, mu, nu = (
            jax.tree.map(lambda t, i=i: t[i], out, is_leaf=lambda t: isinstance(t, tuple))
            for i in range(3)
        )
        adam = adam._replace(count=count, mu=mu, nu=nu)
        schedule = schedule._replace(count=optax.safe_increment(schedule.count))
        return updates, (clip_state, (adam, decay_state, schedule))

    return optax.GradientTransformationExtraArgs(reference.init, update)


def apply_gradients(
    state: TrainState, grads, sums: Sums, lam: jax.Array, tx
) -> tuple[TrainState, Sums]:
    """The update from gradients of a *summed* loss: scaled to ``lam`` × the mean over
    ``sums["n_pred"]`` predictions, clipped and applied by ``tx``.

    A non-finite loss or gradient skips the update (counted in ``sums["nonfinite"]``); params and
    the optimizer state stay as they were.
    """
    scale = lam / jnp.maximum(sums["n_pred"], 1.0)
    # The norm of the unscaled gradients, scaled: the scaled ones are then only read by the
    # update, into which XLA fuses the multiplication (no pass writes them).
    grad_norm = optax.tree.norm(grads) * jnp.abs(scale)
    grads = jax.tree.map(lambda g: g * scale, grads)
    finite = jnp.isfinite(sums["loss_sum"] * scale) & jnp.isfinite(grad_norm)

    def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
        return optax.apply_updates(state.params, updates), opt_state

    params, opt_state = jax.lax.cond(
        finite, update, lambda _: (state.params, state.opt_state), None
    )
    sums = {
        **sums,
        "grad_norm": jnp.where(finite, grad_norm, 0.0),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    step = state.step + finite.astype(state.step.dtype)
    return TrainState(step=step, params=params, opt_state=opt_state), sums


def keyed_by_step(fn: Callable, seed: int, argnum: int) -> Callable:
    """``fn`` with its key argument (position ``argnum``) replaced by a step number (a host
    int32): the key ``fold_in(key(seed), step)`` is computed inside the compiled program.

    Why: the loops used to call ``fold_in`` eagerly between steps, a small device computation of
    its own. Besides the dispatch, with 8 emulated CPU devices it could deadlock XLA:CPU (the
    eager op held a pool thread waiting for a sharded step whose collective waited for a thread).
    The keys are the same as before, so runs and checkpoints are unchanged."""

    def with_key(*args):
        args = list(args)
        args[argnum] = jax.random.fold_in(jax.random.key(seed), args[argnum])
        return fn(*args)

    return with_key


def abstract_state(
    model: nn.Module, tx, mesh, rules, dp: int, example: Callable[[int], tuple] | None = None
) -> tuple[Any, Any, Callable]:
    """The train state's shapes with their shardings (nothing allocated), the shardings, and the
    init function that creates it. ``dp`` is the batch split, which the dummy input must divide;
    ``example(dp)`` gives the dummy arguments of ``model.init`` (default: an encoder's three).
    """

    def boxed_init(rng):
        if example is None:
            dummy = jnp.zeros((dp, 8), jnp.int32)
            args: tuple = (dummy, dummy, dummy)
        else:
            args = example(dp)
        params = model.init({"params": rng}, *args)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    key = jax.random.key(0)  # made outside the mesh: it may hold devices that cannot run it
    with parallel.mesh_context(mesh, rules):
        boxed = jax.eval_shape(boxed_init, key)
        shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings, boxed_init


def init_state(
    model: nn.Module, tx, rng, mesh, rules, dp: int, example: Callable[[int], tuple] | None = None
) -> tuple[TrainState, Any]:
    """Creates the state directly with its shardings: parameters never sit whole on one device."""
    _, shardings, boxed_init = abstract_state(model, tx, mesh, rules, dp, example)
    with parallel.mesh_context(mesh, rules):
        state = jax.jit(lambda r: nn.meta.unbox(boxed_init(r)), out_shardings=shardings)(rng)
    return state, shardings
