"""The numbers a model trains with that change no program's shapes, as arrays in its train state.

A sweep's members differ only in these (and their seeds): the learning-rate schedule (peak rate,
warmup steps), AdamW's weight decay, the distillation weight, the adversarial radius, and the
decays of the two averages (held by the averages themselves, `averaging.EmaTeacher.decay_cap`
and `averaging.EvalEma.decay`). Because they are arrays of the state, not constants of the
compiled step, one set of programs serves every grid of the same size, and a run with other values
finds its programs in the persistent compilation cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from sda_jax.step.optim import Schedule


@flax.struct.dataclass
class Hyperparameters:
    schedule: Schedule  # peak learning rate, warmup and total steps
    weight_decay: jax.Array  # float32: optim.weight_decay
    kd_coeff: jax.Array  # float32: sda.kd_coeff
    adversarial_epsilon: jax.Array  # float32: adversarial.epsilon
    teacher_decay: jax.Array  # float32: sda.teacher_decay, the EMA teacher's cap
    eval_ema_decay: jax.Array  # float32: sda.eval_ema_decay

    @classmethod
    def of(cls, settings, total_steps: int) -> Hyperparameters:
        """A model's numbers, from its settings (a sweep member's: `Settings.with_values`)."""
        number = lambda value: jnp.asarray(value, jnp.float32)
        return cls(
            schedule=Schedule.create(settings.optim, total_steps),
            weight_decay=number(settings.optim.weight_decay),
            kd_coeff=number(settings.sda.kd_coeff),
            adversarial_epsilon=number(settings.adversarial.epsilon),
            teacher_decay=number(settings.sda.teacher_decay),
            eval_ema_decay=number(settings.sda.eval_ema_decay),
        )
