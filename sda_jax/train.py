"""Training with self-distillation averaging: the train state, the train step, `train_and_evaluate`.

Data flow: `splits` (read + encode the files) → `input_pipeline` (host bucketing) → `parallel`
(sharded device batches) → `train_step` (one jitted, donated program per bucket length, over the
model axis of `model_axis`) → `evaluate` (the parameter sets of every model scored on dev) →
`selection` (each model's best checkpoint) → the prediction file. The state is a plain pytree; the
teacher and the evaluation EMA are `averaging` objects that only ever receive averaging updates,
never gradients. `train_and_evaluate` is `run.prepare` → `loop.train` (its hooks) → `finish`.
The command line is `sda_jax.main` (`python -m sda_jax.train` runs it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sda_jax import (
    adversarial,
    atomic_write,
    averaging,
    distill,
    evaluate,
    loop,
    mixed_precision,
    optim,
    parallel,
    run_summary,
    selection,
    sweep_results,
)
from sda_jax.bucketed_jit import BucketedJit, batch_shape_key, compile_concurrently
from sda_jax.hyperparameters import Hyperparameters
from sda_jax.metrics_writer import plot_training_curves
from sda_jax.model_axis import Models
from sda_jax.run import Run, prepare
from sda_jax.settings import Settings
from sda_jax.stopwatch import Stopwatch
from sda_jax.weight_copies import WeightCopies, substitute
from sda_jax.workdir import Workdir

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: train steps taken, skipped fp16 overflow steps included
    params: Params  # the student, the only parameters that receive gradients
    opt_state: optax.OptState
    slow_params: Params | None  # Lookahead's slow weights; None when Lookahead is a no-op (alpha = 1)
    teacher: averaging.Average  # what the student distils from: EmaTeacher, WindowTeacher or VoteTeacher
    eval_ema: averaging.EvalEma | None  # what dev evaluation scores once it has started; None if it never does
    hyper: Hyperparameters  # the schedule and the other numbers as arrays: the programs depend on none of them
    loss_scale: mixed_precision.LossScale | None  # float16 only
    skipped_steps: jax.Array  # int32: fp16 steps skipped for non-finite gradients
    weight_copies: WeightCopies | None  # the 16-bit weight matrices the products read; None in float32

    def parameter_sets(self) -> tuple[Any, ...]:
        """Every set of parameters the state holds (what a checkpoint must hold finite)."""
        return self.params, self.teacher, self.eval_ema


def create_train_state(
    params: Params, hyper: Hyperparameters, settings: Settings, *, compute_dtype: Any, eval_ema_starts: bool = True
) -> TrainState:
    """The state before step 1: teacher, eval EMA (and Lookahead's slow weights) equal the student.

    `hyper` (`Hyperparameters.of(settings, total_steps)`) is an argument, not built here, so that
    this program, too, is the same for runs of any length and values, and for each of a sweep's members. Without `eval_ema_starts` (a run that ends before
    `sda.eval_ema_start_step`, as the reference recipe's one AFQMC epoch of 537 steps does before
    step 800) no evaluation EMA is kept: it would be a copy of the student at every step, 8 bytes
    per parameter of traffic per step for nothing.
    """
    sda = settings.sda
    teacher = averaging.make_teacher(sda.teacher, params, decay_cap=hyper.teacher_decay, window=sda.teacher_window)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=optim.make_optimizer(settings.optim).init(params),
        slow_params=jax.tree.map(jnp.copy, params) if optim.uses_lookahead(settings.optim) else None,
        teacher=teacher,
        eval_ema=(
            averaging.EvalEma(jax.tree.map(jnp.copy, params), hyper.eval_ema_decay, sda.eval_ema_start_step)
            if eval_ema_starts
            else None
        ),
        hyper=hyper,
        loss_scale=(
            mixed_precision.LossScale.create(settings.fp16.initial_loss_scale, settings.fp16.growth_interval)
            if jnp.dtype(compute_dtype) == jnp.float16
            else None
        ),
        skipped_steps=jnp.zeros([], jnp.int32),
        weight_copies=(
            None if jnp.dtype(compute_dtype) == jnp.float32 else WeightCopies.of(params, teacher.one_model(), compute_dtype)
        ),
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
            loss, (ce, kd) = distill.sda_loss(logits, teacher_logits, batch["labels"], batch["weights"], state.hyper.kd_coeff)
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
        finite = mixed_precision.all_finite(grads)
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
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), per_model),
        out_shardings=(state_sharding, per_model),
        donate_argnums=0,
    )


def _create(settings: Settings, total_steps: int, compute_dtype: Any, models: Models):
    create = functools.partial(
        create_train_state, settings=settings, compute_dtype=compute_dtype,
        eval_ema_starts=total_steps > settings.sda.eval_ema_start_step,
    )  # fmt: skip
    return models.lift(create, in_axes=(0, 0))


def abstract_train_state(
    param_shapes: Any, settings: Settings, total_steps: int, compute_dtype: Any, mesh: jax.sharding.Mesh, models: Models
) -> Any:
    """The train state's shapes, dtypes and shardings (on the model axis), derived with
    `jax.eval_shape` from the parameters' shapes on the axis: what compiling needs, with nothing
    allocated (also for a device that is not there)."""
    create = _create(settings, total_steps, compute_dtype, models)
    shapes = jax.eval_shape(create, param_shapes, models.hyperparameters(settings, total_steps))
    return models.abstract(shapes, mesh)


def place_state_and_step(
    params: Params, model: Any, settings: Settings, total_steps: int, mesh: jax.sharding.Mesh, models: Models,
    clock: Stopwatch | None = None,
) -> tuple[Any, BucketedJit]:  # fmt: skip
    """The initial state of `params` (on the model axis) on the mesh, and the train step compiled
    once per batch shape."""
    abstract = abstract_train_state(params, settings, total_steps, model.dtype, mesh, models)
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
    create = _create(settings, total_steps, model.dtype, models)
    state = jax.jit(create, out_shardings=state_sharding)(params, models.hyperparameters(settings, total_steps))
    return state, BucketedJit(jit_train_step(model, settings, mesh, state_sharding, models), batch_shape_key, clock)


@dataclasses.dataclass(frozen=True)
class Programs:
    """Every compiled program of a run: the train step and the eval programs, per bucket length."""

    train_fn: BucketedJit
    eval: evaluate.EvalPrograms
    compile_wall: float  # seconds the up-front compiles took, side by side


def compile_programs(run: Run, clock: Stopwatch) -> tuple[Any, Programs]:
    """The initial train state on the mesh, and every program of the run compiled up front, side by
    side: train and eval per bucket length (dev scores the sets of step 1's structure; prediction
    the best eval EMA)."""
    settings, lengths = run.settings, run.buckets.lengths
    state, train_fn = place_state_and_step(run.params, run.model, settings, run.total_steps, run.mesh, run.models, clock)
    programs = evaluate.EvalPrograms(run.model, run.mesh, run.models, lengths, settings.train.batch_size, clock)
    with clock.phase("compile"):
        batch = lambda n: parallel.abstract_batch(settings.train.batch_size, n, run.mesh)
        tasks = [(train_fn, (state, batch(n), run.dropout_keys)) for n in lengths]
        _, dev, _ = selection.scored_averages(state, selection.scored_names(settings, step=1))
        prediction = (averaging.plain(selection.param_sets(state)["eval_ema"]),)  # the shape of the best eval EMA
        tasks += programs.compile_tasks(dev, prediction)
        wall = compile_concurrently(tasks)
    return state, Programs(train_fn, programs, wall)


def train_and_evaluate(settings: Settings, workdir: Any, *, fresh: bool = False, stopwatch: Stopwatch | None = None) -> dict[str, Any]:
    """Trains every model of the run (resuming from the workdir's latest checkpoint), evaluates,
    predicts the test set; returns the run summary (also written to summary.json by process 0).

    Every input is read and checked before the workdir is touched, so bad input leaves nothing; a
    workdir another live run holds is refused before that. Dev evaluation every `eval_every` steps
    keeps each model's best checkpoint; a full train checkpoint on its cadence, and on SIGTERM/SIGINT,
    makes a restart resume exactly.
    """
    clock = stopwatch or Stopwatch()
    workdir = Workdir(workdir)
    with workdir.lock() as lock:  # one run per workdir, held by process 0 until the run ends
        run = prepare(settings, workdir, fresh=fresh, clock=clock, abstract_state=abstract_train_state, lock=lock)
        state, programs = compile_programs(run, clock)
        return _train(run, programs, state, clock)


def _train(run: Run, programs: Programs, state: Any, clock: Stopwatch) -> dict[str, Any]:
    settings = run.settings
    with loop.Session(run, clock, state) as session:  # resumed from the newest intact checkpoint
        report = loop.Report(session, run.models.hyperparameters(settings, run.total_steps).schedule)  # for the log
        hooks = [loop.Evaluate(run, session, programs.eval), loop.Checkpoint(run, session)]
        state = loop.train(run, programs.train_fn, session, hooks, report)
        return finish(run, programs, state, session, clock)


def finish(run: Run, programs: Programs, state: Any, session: loop.Session, clock: Stopwatch) -> dict[str, Any]:
    """The test predictions of the models' best eval EMAs (the best combination's ensemble, or the
    best model; each model's too if asked), their dev metrics, the sweep's table, the summary and
    the curves."""
    settings, data = run.settings, run.data
    with clock.phase("prediction"):
        best_params, best_metrics = session.selection.restore(state)
        best = (averaging.Current(best_params["eval_ema"]),)
        (test_logits,) = programs.eval.logits(best, data.test)  # [models, examples, classes]
        (dev_logits,) = programs.eval.logits(best, data.dev)
    table = sweep_results.summary(run.models.describe(), best_metrics)
    chosen = table["best_combination"]["models"] if settings.train.predict_with == "best_combination" else [table["best_model"]["model"]]
    prediction = {
        "with": settings.train.predict_with, "models": chosen,
        **{f"dev_{k}": v for k, v in evaluate.dev_metrics(dev_logits[chosen].mean(axis=0), data.dev.labels).items()},
    }  # fmt: skip
    counts = parallel.fetch({"step": state.step, "skipped_steps": state.skipped_steps})
    summary = run_summary.build(
        run, programs, counts=counts, best_metrics=best_metrics, table=table, prediction=prediction,
        ensemble_dev=evaluate.dev_metrics(dev_logits.mean(axis=0), data.dev.labels), test_logits=test_logits[chosen],
        start_step=session.start_step, examples_seen=session.examples_seen, stopwatch=clock,
        to_first_step=session.to_first_step,
    )  # fmt: skip
    if run.is_main:
        label = lambda logits: evaluate.argmax_labels(logits, settings.data.label_names)
        evaluate.write_predictions(run.workdir.predictions(settings), data.test.ids, label(test_logits[chosen].mean(axis=0)))
        if settings.train.per_model_predictions:
            for i, logits in enumerate(test_logits):
                evaluate.write_predictions(run.workdir.predictions(settings, i), data.test.ids, label(logits))
        if settings.sweep:
            for path, text in zip(run.workdir.sweep_tables, (sweep_results.to_csv(table), sweep_results.to_markdown(table)), strict=True):
                atomic_write.write_text(path, text)
        run_summary.write(run.workdir, summary)
        plot_training_curves(run.workdir)
        print(run_summary.format_summary(summary))
    return summary


if __name__ == "__main__":
    from sda_jax import main

    main.run_train(train_and_evaluate)
