"""The optimizer: the fused AdamW is optax's clip + adamw chain, number for number."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xlm_jax.core import train_state
from xlm_jax.tasks import pretrain_config


def _tree(key, scale=1.0):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "kernel": scale * jax.random.normal(k1, (8, 16)),
        "heads": scale * jax.random.normal(k2, (4, 2, 8)),
        "bias": scale * jax.random.normal(k3, (16,)),  # 1-D: no weight decay
    }


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
@pytest.mark.parametrize("pass_norm", [False, True])
def test_fused_adamw_is_the_optax_chain(clip_norm, pass_norm):
    schedule = train_state.inverse_sqrt_schedule(1e-2, 2, 1e-3)
    settings = dict(b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01)
    reference = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, **settings, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    )
    fused = train_state.fused_adamw(schedule, **settings, clip_norm=clip_norm)
    params = _tree(jax.random.key(0))
    state_ref, state = reference.init(params), fused.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(state_ref)  # checkpoints restore
    p_ref, p = params, params
    # gradient norms on both sides of the clipping threshold (each leaf has ~100 entries)
    for step, scale in enumerate([0.01, 3.0, 0.05, 10.0]):
        grads = _tree(jax.random.key(step + 1), scale)
        u_ref, state_ref = jax.jit(reference.update)(grads, state_ref, p_ref)
        extra = {"grad_norm": optax.tree.norm(grads)} if pass_norm else {}
        u, state = jax.jit(fused.update)(grads, state, p, **extra)
        p_ref, p = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p, u)
        pairs = zip(jax.tree.leaves((p_ref, state_ref)), jax.tree.leaves((p, state)), strict=True)
        for a, b in pairs:
            # Unclipped, the arithmetic is optax's, bit for bit; a clipped gradient is scaled by
            # one factor where optax divides then multiplies: last-bits differences (1e-6 of the
            # leaf's largest value; the moments' sums cancel, so not of each element).
            atol = 1e-6 * float(np.abs(a).max()) if clip_norm else 0.0
            np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"step {step}")
    assert not np.allclose(p["kernel"], params["kernel"])


def test_apply_gradients_scales_clips_and_skips_non_finite_updates():
    """The update of a summed loss's gradients: lam / n_pred times them, clipped, by AdamW; the
    same as optax's chain given the scaled gradients (the norm is taken before scaling: the clip
    factor may differ in its last bit). A non-finite loss leaves everything as it was."""
    cfg = pretrain_config.optimizer_config()
    cfg.clip_grad_norm = 1.0
    tx = train_state.make_optimizer(cfg)
    schedule = train_state.inverse_sqrt_schedule(cfg.lr, cfg.warmup_steps, cfg.warmup_init_lr)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, eps=cfg.eps, weight_decay=0.0),
    )
    params = _tree(jax.random.key(0))
    state = train_state.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    grads = _tree(jax.random.key(1), 50.0)  # norm ~600 / 4 predictions: clipped
    sums = {"loss_sum": jnp.float32(9.0), "n_pred": jnp.float32(4.0)}
    new, out = train_state.apply_gradients(state, grads, sums, jnp.float32(0.5), tx)
    scaled = jax.tree.map(lambda g: g * 0.125, grads)
    updates, _ = reference.update(scaled, reference.init(params), params)
    expected = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    np.testing.assert_allclose(out["grad_norm"], optax.tree.norm(scaled), rtol=1e-6)
    assert int(new.step) == 1 and float(out["nonfinite"]) == 0.0

    bad = {**sums, "loss_sum": jnp.float32(np.inf)}
    same, out = train_state.apply_gradients(new, grads, bad, jnp.float32(0.5), tx)
    assert int(same.step) == 1 and float(out["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)


def test_logged_learning_rate_is_the_schedule_computed_on_the_host():
    """The log's learning rate (numpy) is bit for bit the schedule's eager JAX ops (what the log
    showed before), and within one float32 ulp of the optimizer's compiled schedule (XLA may
    order the warmup's product and division differently)."""
    config = pretrain_config.default_config()
    config.optimizer.update(lr=3e-4, warmup_steps=7, warmup_init_lr=1e-6)
    schedule = train_state.inverse_sqrt_schedule(3e-4, 7, 1e-6)
    logged = np.asarray([train_state.learning_rate(config, n + 1) for n in range(40)], np.float32)
    eager = np.asarray([schedule(n) for n in range(40)])
    assert logged.tobytes() == eager.tobytes()
    compiled = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(40)))
    np.testing.assert_array_max_ulp(logged, compiled, maxulp=1)
    assert logged[6] == np.float32(3e-4) and logged[5] < logged[6] > logged[7]
