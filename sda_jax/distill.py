"""Self-distillation averaging (SDA): the teacher's EMA schedule and the distillation loss.

The teacher is an exponential moving average of the student's parameters, updated after every
optimizer step t (1-based) with decay min(decay_cap, (1 + t) / (10 + t)): the ramp lets the
teacher follow the student closely while the student moves fast early on. The student's loss is
cross-entropy on the labels plus kd_coeff times the mean squared difference of the two models'
logits. Rows with weight 0 (batch padding) count for nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def teacher_decay(step: jax.Array, decay_cap: float) -> jax.Array:
    """The reference's bias-corrected EMA decay after the `step`-th update (step ≥ 1)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay_cap, (1.0 + step) / (10.0 + step))


def ema_update(new_params: Any, ema_params: Any, decay: jax.Array) -> Any:
    """ema ← decay · ema + (1 − decay) · new, leaf by leaf."""
    return optax.incremental_update(new_params, ema_params, 1.0 - decay)


def eval_ema_decay(step: jax.Array, decay: float, start_step: int) -> jax.Array:
    """Decay of the evaluation EMA after the `step`-th update.

    Until `start_step` the decay is 0, so the EMA is an exact copy of the student; from then on it
    averages with `decay`. That reproduces the reference, which creates the EMA as a copy of the
    student at its start step, with one fixed-shape state and no branch in the train step.
    """
    return jnp.where(step <= start_step, 0.0, decay)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy over rows with weight 1 (a real example), in float32."""
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def weighted_logit_mse(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array) -> jax.Array:
    """torch.nn.MSELoss over the real rows: mean over rows × classes of (student − teacher)²."""
    squared = jnp.square(student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32))
    num_classes = student_logits.shape[-1]
    return jnp.sum(squared.sum(-1) * weights) / (jnp.maximum(jnp.sum(weights), 1.0) * num_classes)


def sda_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, weights: jax.Array, kd_coeff: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """CE + kd_coeff · MSE; returns (loss, (ce, kd)). The teacher's logits carry no gradient."""
    ce = weighted_cross_entropy(student_logits, labels, weights)
    kd = weighted_logit_mse(student_logits, jax.lax.stop_gradient(teacher_logits), weights)
    return ce + kd_coeff * kd, (ce, kd)


# The SDA paper's teachers built from the last K student snapshots (Xu et al., 2020): `window`
# averages their parameters (SDA), `vote` averages their logits (SDV). The snapshots live in one
# stacked pytree (leading axis K) used as a ring buffer: slot t mod K holds the student after
# step t; before K steps exist the initial parameters fill the remaining slots.


def init_snapshots(params: Any, k: int) -> Any:
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (k, *p.shape)).copy(), params)


def push_snapshot(snapshots: Any, params: Any, step: jax.Array) -> Any:
    """Stores the student after `step` over the oldest snapshot."""
    return jax.tree.map(lambda s, p: s.at[step % s.shape[0]].set(p), snapshots, params)


def snapshot_average(snapshots: Any) -> Any:
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), snapshots)
