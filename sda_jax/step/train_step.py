"""The fine-tuning train state and its one jitted step: the student's update on CE + kd·MSE, then the averages.

`train_step(state, batch, rng)` is pure: the teacher (an `sda` average) gives its logits of the
deterministic forward, the student is differentiated through dropout (and an adversarial attack,
if configured), AdamW with Lookahead updates it, and the teacher and the evaluation EMA take their
averaging updates. `jit_train_step` lifts it over the model axis (`model_axis`) and jits it once for
the mesh with the state donated; `place_state_and_step` builds the initial state where the
compiled step expects it. The state is a plain pytree.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sda_jax.config import Settings
from sda_jax.kernels.weight_copies import WeightCopies, substitute
from sda_jax.parallel import distributed
from sda_jax.parallel.bucketed_jit import BucketedJit, batch_shape_key
from sda_jax.step import adversarial, optim, precision, sda
from sda_jax.step.hyperparameters import Hyperparameters
from sda_jax.step.model_axis import Models
from sda_jax.stopwatch import Stopwatch

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: train steps taken, skipped fp16 overflow steps included
    params: Params  # the student, the only parameters that receive gradients
    opt_state: optax.OptState
    slow_params: Params | None  # Lookahead's slow weights; None when Lookahead is a no-op (alpha = 1)
    teacher: sda.Average  # what the student distils from: EmaTeacher, WindowTeacher or VoteTeacher
    eval_ema: sda.EvalEma | None  # what dev evaluation scores once it has started; None if it never does
    hyper: Hyperparameters  # the schedule and the other numbers as arrays: the programs depend on none of them
    loss_scale: precision.LossScale | None  # float16 only
    skipped_steps: jax.Array  # int32: fp16 steps skipped for non-finite gradients
    weight_copies: WeightCopies | None  # the 16-bit weight matrices the products read, where the model's forms keep them

    def parameter_sets(self) -> tuple[Any, ...]:
        """Every set of parameters the state holds (what a checkpoint must hold finite)."""
        return self.params, self.teacher, self.eval_ema


def create_train_state(
    params: Params, hyper: Hyperparameters, settings: Settings, *, compute_dtype: Any, weight_copies: bool = False,
    eval_ema_starts: bool = True,
) -> TrainState:
    """The state before step 1: teacher, eval EMA (and Lookahead's slow weights) equal the student.

    `hyper` (`Hyperparameters.of(settings, total_steps)`) is an argument, not built here, so that
    this program, too, is the same for runs of any length and values, and for each of a sweep's members. Without `eval_ema_starts` (a run that ends before
    `sda.eval_ema_start_step`, as the reference recipe's one AFQMC epoch of 537 steps does before
    step 800) no evaluation EMA is kept: it would be a copy of the student at every step, 8 bytes
    per parameter of traffic per step for nothing.
    """
    method = settings.sda
    teacher = sda.make_teacher(method.teacher, params, decay_cap=hyper.teacher_decay, window=method.teacher_window)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=optim.make_optimizer(settings.optim).init(params),
        slow_params=jax.tree.map(jnp.copy, params) if optim.uses_lookahead(settings.optim) else None,
        teacher=teacher,
        eval_ema=(
            sda.EvalEma(jax.tree.map(jnp.copy, params), hyper.eval_ema_decay, method.eval_ema_start_step)
            if eval_ema_starts
            else None
        ),
        hyper=hyper,
        loss_scale=(
            precision.LossScale.create(settings.fp16.initial_loss_scale, settings.fp16.growth_interval)
            if jnp.dtype(compute_dtype) == jnp.float16
            else None
        ),
        skipped_steps=jnp.zeros([], jnp.int32),
        # The model's forms read 16-bit weight copies (`kernels.weight_copies`): made here, and by the
        # kernels that update the float32 values.
        weight_copies=WeightCopies.of(params, teacher.one_model(), compute_dtype) if weight_copies else None,
    )


def train_step(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, model: Any, settings: Settings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SDA step: student update on CE + kd·MSE(teacher), then the teacher and eval EMA. Pure."""
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    copies = state.weight_copies
    student_copies, teacher_copies = (None, None) if copies is None else (copies.student, copies.teacher)
    teacher_logits = state.teacher.logits(
        lambda params: model.apply({"params": substitute(params, teacher_copies)}, *inputs, deterministic=True)
    )
    dropout_rng = jax.random.fold_in(rng, state.step)
    scale = 1.0 if state.loss_scale is None else state.loss_scale.scale

    def grad_fn(params, attack: int = 0):
        """Gradients of the scaled loss; attack > 0 marks an adversarial pass (own dropout)."""

        def loss_fn(params):
            rngs = {"dropout": jax.random.fold_in(dropout_rng, attack) if attack else dropout_rng}
            logits = model.apply({"params": substitute(params, student_copies)}, *inputs, deterministic=False, rngs=rngs)
            loss, (ce, kd) = sda.sda_loss(logits, teacher_logits, batch["labels"], batch["weights"], state.hyper.kd_coeff)
            return loss * scale, (loss, ce, kd)

        return jax.grad(loss_fn, has_aux=True)(params)

    grads, (loss, ce, kd) = grad_fn(state.params)
    attack = settings.adversarial
    if attack.method != "none":
        grads = adversarial.adversarial_gradients(
            grad_fn, state.params, grads, method=attack.method, epsilon=state.hyper.adversarial_epsilon, alpha=attack.alpha,
            steps=attack.steps,
        )  # fmt: skip
    grads = jax.tree.map(lambda g: g / scale, grads)
    tx = optim.make_optimizer(settings.optim, weight_decay=state.hyper.weight_decay)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, learning_rate=state.hyper.schedule(state.step))
    params = optax.apply_updates(state.params, updates)
    slow_params = state.slow_params
    if slow_params is not None:
        applied_updates = state.step + 1 - state.skipped_steps
        params, slow_params = optim.lookahead_sync(
            params, slow_params, applied_updates, settings.optim.lookahead_k, settings.optim.lookahead_alpha
        )

    loss_scale, skipped_steps = state.loss_scale, state.skipped_steps
    if loss_scale is not None:
        # An overflowed fp16 step changes nothing but the scale, as torch's GradScaler.step does;
        # the learning-rate schedule still moves on, since it follows the train step.
        finite = precision.all_finite(grads)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state, slow_params = keep((params, opt_state, slow_params), (state.params, state.opt_state, state.slow_params))
        loss_scale = loss_scale.adjust(finite)
        skipped_steps = skipped_steps + (~finite).astype(jnp.int32)

    step = state.step + 1
    teacher = state.teacher.update(params, step)
    new_state = state.replace(
        step=step,
        params=params,
        opt_state=opt_state,
        slow_params=slow_params,
        teacher=teacher,
        eval_ema=None if state.eval_ema is None else state.eval_ema.update(params, step),
        loss_scale=loss_scale,
        skipped_steps=skipped_steps,
        # Made by the kernels that update the float32 values, which read them anyway.
        weight_copies=None if copies is None else WeightCopies.of(params, teacher.one_model(), copies.dtype()),
    )
    metrics = {"loss": loss, "ce": ce, "kd": kd, "skipped_steps": skipped_steps}
    if loss_scale is not None:
        metrics["loss_scale"] = loss_scale.scale
    return new_state, metrics


def jit_train_step(model: Any, settings: Settings, mesh: jax.sharding.Mesh, state_sharding: Any, models: Models) -> Any:
    """`train_step` over the model axis (state and dropout key per model, the batch shared),
    jitted for the mesh: batch rows split over the data axis, the state donated."""
    step = functools.partial(train_step, model=model, settings=settings)
    per_model = models.sharding(mesh)
    return jax.jit(
        models.lift(step, in_axes=(0, None, 0)),
        in_shardings=(state_sharding, distributed.batch_sharding(mesh), per_model),
        out_shardings=(state_sharding, per_model),
        donate_argnums=0,
    )


def _create(settings: Settings, total_steps: int, compute_dtype: Any, models: Models, weight_copies: bool):
    create = functools.partial(
        create_train_state, settings=settings, compute_dtype=compute_dtype, weight_copies=weight_copies,
        eval_ema_starts=total_steps > settings.sda.eval_ema_start_step,
    )  # fmt: skip
    return models.lift(create, in_axes=(0, 0))


def abstract_train_state(
    param_shapes: Any, settings: Settings, total_steps: int, compute_dtype: Any, mesh: jax.sharding.Mesh, models: Models,
    weight_copies: bool = False,
) -> Any:  # fmt: skip
    """The train state's shapes, dtypes and shardings (on the model axis), derived with
    `jax.eval_shape` from the parameters' shapes on the axis: what compiling needs, with nothing
    allocated (also for a device that is not there)."""
    create = _create(settings, total_steps, compute_dtype, models, weight_copies)
    shapes = jax.eval_shape(create, param_shapes, models.hyperparameters(settings, total_steps))
    return models.abstract(shapes, mesh)


def place_state_and_step(
    params: Params, model: Any, settings: Settings, total_steps: int, mesh: jax.sharding.Mesh, models: Models,
    clock: Stopwatch | None = None,
) -> tuple[Any, BucketedJit]:  # fmt: skip
    """The initial state of `params` (on the model axis) on the mesh, and the train step compiled
    once per batch shape."""
    copies = model.forms.weight_copies
    abstract = abstract_train_state(params, settings, total_steps, model.dtype, mesh, models, copies)
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
    create = _create(settings, total_steps, model.dtype, models, copies)
    state = jax.jit(create, out_shardings=state_sharding)(params, models.hyperparameters(settings, total_steps))
    return state, BucketedJit(jit_train_step(model, settings, mesh, state_sharding, models), batch_shape_key, clock)
