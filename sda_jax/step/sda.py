"""The SDA method in one file: the teachers and the evaluation EMA as pytree objects, and the loss.

As Levanter's `ModelAveraging`: the train state holds these objects, `train_step` calls
`update(student_params, step)` on each after the optimizer update, and asks the teacher for its
`logits(forward)`, never for its kind. `forward(params) -> logits` is the model's deterministic
forward pass on the current batch (the reference's `kd_model.eval()`: no dropout, no gradient).
Evaluation scores an average through the same `logits`.

* `EmaTeacher`: the reference's teacher, EMA with decay min(cap, (1 + t) / (10 + t)) after update t.
* `WindowTeacher`: the SDA paper's teacher, the mean parameters of the last K students.
* `VoteTeacher`: the paper's SDV, the mean *logits* of the last K students: not one model.
* `EvalEma`: the reference's evaluation EMA, a copy of the student until its start step.
* `Current`: the student itself, so that evaluation treats every parameter set alike.

`one_model()` is the one parameter set an average stands for (what a best checkpoint keeps and
export writes); the vote has none. `plain(average)` is an average as evaluation runs it: every
one-model average as `Current` of its parameters, so that all of them share one program.

`sda_loss` is the distillation loss: cross-entropy on the labels plus kd_coeff · MSE to the
teacher's logits; rows with weight 0 (batch padding) count for nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

Params = Any
Forward = Callable[[Params], jax.Array]  # params -> float32 logits [batch, classes]


class Average(flax.struct.PyTreeNode):
    """Interface of a parameter average (see the module docstring); subclasses are pytrees."""

    def update(self, params: Params, step: jax.Array) -> Average:
        """The average after the student's `step`-th update (step >= 1) gave `params`."""
        raise NotImplementedError

    def one_model(self) -> Params | None:
        """The parameters of the one model this average is; None for an ensemble (the vote)."""
        raise NotImplementedError

    def logits(self, forward: Forward) -> jax.Array:
        return forward(self.one_model())


class Current(Average):
    """The student as it is: no averaging."""

    params: Params

    def update(self, params: Params, step: jax.Array) -> Current:
        del step
        return self.replace(params=params)

    def one_model(self) -> Params:
        return self.params


class EmaTeacher(Average):
    """teacher ← decay · teacher + (1 − decay) · student, decay = min(cap, (1 + t) / (10 + t)).

    The ramp lets the teacher follow the student closely while the student moves fast early on.
    """

    params: Params
    decay_cap: jax.Array  # float32: sda.teacher_decay (an array, so that a sweep's members can differ)

    @staticmethod
    def decay(step: jax.Array, decay_cap: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        return jnp.minimum(decay_cap, (1.0 + step) / (10.0 + step))

    def update(self, params: Params, step: jax.Array) -> EmaTeacher:
        return self.replace(params=ema_update(params, self.params, self.decay(step, self.decay_cap)))

    def one_model(self) -> Params:
        return self.params


class EvalEma(Average):
    """The evaluation EMA: decay 0 (an exact copy of the student) until `start_step`, then `decay`.

    That reproduces the reference, which creates its EMA as a copy of the student at its start
    step, with one fixed-shape state and no branch in the train step.
    """

    params: Params
    decay: jax.Array  # float32: sda.eval_ema_decay (an array, so that a sweep's members can differ)
    start_step: int = flax.struct.field(pytree_node=False)

    def decay_at(self, step: jax.Array) -> jax.Array:
        return jnp.where(step <= self.start_step, 0.0, self.decay)

    def update(self, params: Params, step: jax.Array) -> EvalEma:
        return self.replace(params=ema_update(params, self.params, self.decay_at(step)))

    def one_model(self) -> Params:
        return self.params


class WindowTeacher(Average):
    """The mean parameters of the last K students (the SDA paper's teacher).

    The snapshots live in one stacked pytree (leading axis K) used as a ring buffer: slot t mod K
    holds the student after update t; until K updates exist, the initial parameters fill the
    remaining slots.
    """

    snapshots: Params  # [K, ...]

    def update(self, params: Params, step: jax.Array) -> WindowTeacher:
        return self.replace(snapshots=jax.tree.map(lambda s, p: s.at[step % s.shape[0]].set(p), self.snapshots, params))

    def one_model(self) -> Params:
        return jax.tree.map(lambda s: jnp.mean(s, axis=0), self.snapshots)


class VoteTeacher(WindowTeacher):
    """The mean logits of the last K students (the SDA paper's SDV): K forward passes, one ensemble."""

    def one_model(self) -> None:
        return None

    def logits(self, forward: Forward) -> jax.Array:
        return jax.vmap(forward)(self.snapshots).mean(axis=0)


def plain(average: Average) -> Average:
    """`average` as evaluation runs it: `Current` of its parameters when it is one model (whatever
    kind of average it is, so that they all share one program), the ensemble itself otherwise."""
    params = average.one_model()
    return average if params is None else Current(params)


def ema_update(new_params: Params, ema_params: Params, decay: jax.Array) -> Params:
    """ema ← decay · ema + (1 − decay) · new, leaf by leaf (the reference's s.sub_((1 − d)(s − p)))."""
    return optax.incremental_update(new_params, ema_params, 1.0 - decay)


def stacked_copies(params: Params, k: int) -> Params:
    """K copies of `params` along a new leading axis (own buffers, never aliases of `params`)."""
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (k, *p.shape)).copy(), params)


def make_teacher(kind: str, params: Params, *, decay_cap: jax.Array, window: int) -> Average:
    """The teacher of `sda.teacher` (ema, window or vote), equal to the initial student."""
    copy = jax.tree.map(jnp.copy, params)
    if kind == "ema":
        return EmaTeacher(params=copy, decay_cap=decay_cap)
    if kind == "window":
        return WindowTeacher(snapshots=stacked_copies(params, window))
    if kind == "vote":
        return VoteTeacher(snapshots=stacked_copies(params, window))
    raise ValueError(f"unknown teacher {kind!r}")


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
