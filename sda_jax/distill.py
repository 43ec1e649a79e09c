"""The self-distillation loss: cross-entropy on the labels plus kd_coeff · MSE to the teacher's logits.

The teacher itself (an average of the student) lives in `averaging`. Rows with weight 0 (batch
padding) count for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
