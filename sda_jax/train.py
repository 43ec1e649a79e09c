"""Training with self-distillation averaging: the train state, the jitted train step, the loop.

Data flow: `splits` (read + encode the files) → `input_pipeline` (host bucketing) → `parallel`
(sharded device batches) → `train_step` (one jitted, donated program per bucket length) →
`evaluate` (every parameter set of the run in one pass over dev) → `checkpoints` (the best by dev
accuracy, and full states for resume) → the prediction file. The state is a plain pytree; the
teacher and the evaluation EMA are `averaging` objects that only ever receive averaging
updates, never gradients. The command line is `sda_jax.main` (`python -m sda_jax.train` runs it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import signal
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from sda_jax import (
    adversarial,
    averaging,
    bucket_policy,
    distill,
    evaluate,
    input_pipeline,
    mixed_precision,
    optim,
    parallel,
    run_summary,
    selection,
    splits,
)
from sda_jax.bucketed_jit import BucketedJit, batch_shape_key, compile_concurrently
from sda_jax.checkpoints import TrainCheckpoints
from sda_jax.errors import InputError
from sda_jax.metrics_writer import MetricsWriter, plot_training_curves
from sda_jax.model_loading import load_model
from sda_jax.preemption import Preempted, PreemptionGuard
from sda_jax.run_record import prepare_workdir, truncate_metrics, write_run_record
from sda_jax.settings import Settings, TrainSettings
from sda_jax.stopwatch import Stopwatch

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: train steps taken, skipped fp16 overflow steps included
    params: Params  # the student, the only parameters that receive gradients
    opt_state: optax.OptState
    slow_params: Params | None  # Lookahead's slow weights; None when Lookahead is a no-op (alpha = 1)
    teacher: averaging.Average  # what the student distils from: EmaTeacher, WindowTeacher or VoteTeacher
    eval_ema: averaging.EvalEma | None  # what dev evaluation scores once it has started; None if it never does
    schedule: optim.Schedule  # learning-rate numbers as arrays: the programs do not depend on the run's length
    loss_scale: mixed_precision.LossScale | None  # float16 only
    skipped_steps: jax.Array  # int32: fp16 steps skipped for non-finite gradients


def create_train_state(
    params: Params, schedule: optim.Schedule, settings: Settings, *, compute_dtype: Any, eval_ema_starts: bool = True
) -> TrainState:
    """The state before step 1: teacher, eval EMA (and Lookahead's slow weights) equal the student.

    `schedule` is an argument (not built here from the run's length) so that this program, too,
    is the same for runs of any length. Without `eval_ema_starts` (a run that ends before
    `sda.eval_ema_start_step`, as the reference recipe's one AFQMC epoch of 537 steps does before
    step 800) no evaluation EMA is kept: it would be a copy of the student at every step, 8 bytes
    per parameter of traffic per step for nothing.
    """
    sda = settings.sda
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=optim.make_optimizer(settings.optim).init(params),
        slow_params=jax.tree.map(jnp.copy, params) if optim.uses_lookahead(settings.optim) else None,
        teacher=averaging.make_teacher(sda.teacher, params, decay_cap=sda.teacher_decay, window=sda.teacher_window),
        eval_ema=(
            averaging.EvalEma(jax.tree.map(jnp.copy, params), sda.eval_ema_decay, sda.eval_ema_start_step)
            if eval_ema_starts
            else None
        ),
        schedule=schedule,
        loss_scale=(
            mixed_precision.LossScale.create(settings.fp16.initial_loss_scale, settings.fp16.growth_interval)
            if jnp.dtype(compute_dtype) == jnp.float16
            else None
        ),
        skipped_steps=jnp.zeros([], jnp.int32),
    )


def train_step(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, model: Any, settings: Settings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SDA step: student update on CE + kd·MSE(teacher), then the teacher and eval EMA. Pure."""
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    teacher_logits = state.teacher.logits(lambda params: model.apply({"params": params}, *inputs, deterministic=True))
    dropout_rng = jax.random.fold_in(rng, state.step)
    scale = 1.0 if state.loss_scale is None else state.loss_scale.scale

    def grad_fn(params, attack: int = 0):
        """Gradients of the scaled loss; attack > 0 marks an adversarial pass (own dropout)."""

        def loss_fn(params):
            rngs = {"dropout": jax.random.fold_in(dropout_rng, attack) if attack else dropout_rng}
            logits = model.apply({"params": params}, *inputs, deterministic=False, rngs=rngs)
            loss, (ce, kd) = distill.sda_loss(logits, teacher_logits, batch["labels"], batch["weights"], settings.sda.kd_coeff)
            return loss * scale, (loss, ce, kd)

        return jax.grad(loss_fn, has_aux=True)(params)

    grads, (loss, ce, kd) = grad_fn(state.params)
    attack = settings.adversarial
    if attack.method != "none":
        grads = adversarial.adversarial_gradients(
            grad_fn, state.params, grads, method=attack.method, epsilon=attack.epsilon, alpha=attack.alpha,
            steps=attack.steps,
        )  # fmt: skip
    grads = jax.tree.map(lambda g: g / scale, grads)
    tx = optim.make_optimizer(settings.optim)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, learning_rate=state.schedule(state.step))
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
    new_state = state.replace(
        step=step,
        params=params,
        opt_state=opt_state,
        slow_params=slow_params,
        teacher=state.teacher.update(params, step),
        eval_ema=None if state.eval_ema is None else state.eval_ema.update(params, step),
        loss_scale=loss_scale,
        skipped_steps=skipped_steps,
    )
    metrics = {"loss": loss, "ce": ce, "kd": kd, "skipped_steps": skipped_steps}
    if loss_scale is not None:
        metrics["loss_scale"] = loss_scale.scale
    return new_state, metrics


def jit_train_step(model: Any, settings: Settings, mesh: jax.sharding.Mesh, state_sharding: Any, num_seeds: int = 0) -> Any:
    """`train_step` jitted for the mesh: batch rows split over devices, the state donated.

    With `num_seeds` > 0 the state has a leading seed axis and the step is `vmap`ped over it
    (state and dropout key per seed, the batch shared): N runs in one program.
    """
    step = functools.partial(train_step, model=model, settings=settings)
    if num_seeds:
        step, per_seed = jax.vmap(step, in_axes=(0, None, 0)), parallel.seeds_sharding(mesh)
    else:
        per_seed = parallel.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), per_seed),
        out_shardings=(state_sharding, per_seed),
        donate_argnums=0,
    )


def _create(settings: Settings, total_steps: int, compute_dtype: Any, num_seeds: int):
    create = functools.partial(
        create_train_state, settings=settings, compute_dtype=compute_dtype,
        eval_ema_starts=total_steps > settings.sda.eval_ema_start_step,
    )  # fmt: skip
    return jax.vmap(create, in_axes=(0, None)) if num_seeds else create


def abstract_train_state(
    param_shapes: Any, settings: Settings, total_steps: int, compute_dtype: Any, mesh: jax.sharding.Mesh, num_seeds: int = 0
) -> TrainState:
    """The train state's shapes, dtypes and shardings (replicated; split over seed groups with a
    seed axis), derived with `jax.eval_shape`: what compiling needs, with nothing allocated (also
    for a device that is not there). `param_shapes` are seed-stacked when `num_seeds` > 0."""
    create = _create(settings, total_steps, compute_dtype, num_seeds)
    shapes = jax.eval_shape(create, param_shapes, optim.Schedule.create(settings.optim, total_steps))
    sharding = parallel.seeds_sharding(mesh) if num_seeds else parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def place_state_and_step(
    params: Params, model: Any, settings: Settings, total_steps: int, mesh: jax.sharding.Mesh,
    clock: Stopwatch | None = None, num_seeds: int = 0,
) -> tuple[TrainState, BucketedJit]:  # fmt: skip
    """The initial state on the mesh and the train step compiled once per batch shape; `params`
    are seed-stacked when `num_seeds` > 0."""
    abstract = abstract_train_state(params, settings, total_steps, model.dtype, mesh, num_seeds)
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
    create = _create(settings, total_steps, model.dtype, num_seeds)
    state = jax.jit(create, out_shardings=state_sharding)(params, optim.Schedule.create(settings.optim, total_steps))
    return state, BucketedJit(jit_train_step(model, settings, mesh, state_sharding, num_seeds), batch_shape_key, clock)


def check_state_fits(abstract_state: Any, mesh: jax.sharding.Mesh, num_seeds: int) -> None:
    """A clear error before training when the train states of all seeds cannot fit in the
    memory of a device (where JAX reports it; the estimate counts the state alone: activations
    and compiled programs need room too, so 80% of the device is the limit)."""
    local = [d for d in mesh.devices.flat if getattr(d, "process_index", jax.process_index()) == jax.process_index()]
    stats = local[0].memory_stats() or {}  # only this process's devices answer
    limit = stats.get("bytes_limit")
    if not limit:
        return
    per_device = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    per_device //= mesh.shape.get(parallel.SEEDS_AXIS, 1)
    if per_device > 0.8 * limit:
        what = f"{num_seeds} seeds' train states" if num_seeds else "the train state"
        raise InputError(
            f"config key train.seeds: {what} need {per_device / 2**30:.1f} GiB per device (from jax.eval_shape), "
            f"more than 80% of the device's {limit / 2**30:.1f} GiB; train fewer seeds at once or on more devices"
        )


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Which periodic actions fall on a step. They depend on the step alone, so that a resumed
    run logs, evaluates and checkpoints at the same steps as an uninterrupted one."""

    log: bool
    evaluate: bool
    checkpoint: bool

    @classmethod
    def at(cls, step: int, total_steps: int, train: TrainSettings) -> Cadence:
        last = step == total_steps
        return cls(
            log=step % train.log_every == 0 or last,
            evaluate=step % train.eval_every == 0 or last,
            checkpoint=step % train.checkpoint_every == 0 or last,
        )

    def any(self) -> bool:
        return self.log or self.evaluate or self.checkpoint


def train_and_evaluate(
    settings: Settings, workdir: Any, *, fresh: bool = False, stopwatch: Stopwatch | None = None
) -> dict[str, Any]:
    """Trains (resuming from the workdir's latest checkpoint), evaluates, predicts the test set.

    Every input is read and checked before the workdir is touched, so bad input leaves nothing.
    Dev evaluation every `eval_every` steps keeps the best checkpoint; a full train checkpoint
    every `checkpoint_every` steps, and on SIGTERM/SIGINT, makes a restart resume exactly.
    Returns the run summary (also written to workdir/summary.json by process 0).
    """
    clock = stopwatch or Stopwatch()
    with clock.phase("data"):
        data = splits.load_splits(settings.data, settings.model.dir)
    # One model per seed of `train.seeds` (its initial weights and dropout stream), side by side
    # on a leading axis when there are several; the data order comes from `seed` either way.
    seeds = settings.train.seeds if len(settings.train.seeds) > 1 else ()
    model_seeds = settings.train.seeds or (settings.seed,)
    dtype = mixed_precision.compute_dtype(settings.model.dtype, jax.devices()[0].platform)
    mesh = parallel.make_seeds_mesh(len(seeds)) if seeds else parallel.make_mesh()
    parallel.check_batch_size(settings.train.batch_size, mesh)
    batch_size = settings.train.batch_size
    steps_per_epoch = input_pipeline.steps_per_epoch(len(data.train), batch_size)
    total_steps = settings.train.num_epochs * steps_per_epoch
    if settings.train.max_steps:
        total_steps = min(total_steps, settings.train.max_steps)
    keys = [jax.random.split(jax.random.key(seed)) for seed in model_seeds]
    with clock.phase("model"):
        model, params, load_note = load_model(settings, len(data.tokenizer), keys[0][0], dtype)
        if seeds:
            stacked_shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct((len(seeds), *p.shape), p.dtype), params)
            check_state_fits(abstract_train_state(stacked_shapes, settings, total_steps, dtype, mesh, len(seeds)), mesh, len(seeds))
            others = [load_model(settings, len(data.tokenizer), key[0], dtype)[1] for key in keys[1:]]
            params = jax.tree.map(lambda *leaves: jnp.stack(leaves), params, *others)
            del others
    dropout_rng = parallel.put_keys(jnp.stack([key[1] for key in keys]), mesh) if seeds else keys[0][1]
    # Every process reads the whole train set, so all of them choose the same lengths.
    buckets = bucket_policy.choose(
        settings.data, data.train.lengths, model.config, jax.devices()[0].platform, total_steps / steps_per_epoch,
        models=len(model_seeds),
    )  # fmt: skip
    bucket_lengths = buckets.lengths
    is_main = jax.process_index() == 0
    if is_main:
        prepare_workdir(workdir, settings, settings.train.predict_file, fresh=fresh)
        write_run_record(workdir, settings, model.config, settings.data.label_names, data.tokenizer)
        print(load_note if not seeds else f"{load_note} ({len(seeds)} seeds: {', '.join(map(str, seeds))})")
        if buckets.note:
            print(buckets.note)
    multihost_utils.sync_global_devices("workdir ready")
    state, train_fn = place_state_and_step(params, model, settings, total_steps, mesh, clock, len(seeds))
    del params
    programs = evaluate.EvalPrograms(model, mesh, bucket_lengths, batch_size, len(seeds), clock)
    with clock.phase("compile"):
        # Every program of the run, up front and side by side: train and eval per bucket length.
        tasks = [(train_fn, (state, parallel.abstract_batch(batch_size, n, mesh), dropout_rng)) for n in bucket_lengths]
        sets = selection.param_sets(state)
        tasks += programs.compile_tasks(
            selection.scored_sets(sets, settings, step=1), selection.prediction_sets(sets["eval_ema"].single_params())
        )
        compile_wall = compile_concurrently(tasks)

    with contextlib.ExitStack() as stack:
        checkpoints = TrainCheckpoints(workdir, settings.train.keep_checkpoints)
        stack.callback(checkpoints.close)  # lets a pending write finish, whatever ends the run
        start_step = checkpoints.latest_step() or 0
        if start_step:
            with clock.phase("checkpointing"):
                state = checkpoints.restore(start_step, state)
            if is_main:
                truncate_metrics(workdir, start_step)
                print(f"Resuming from the checkpoint of step {start_step}.")
        best = selection.Selection(workdir, seeds)
        stack.callback(best.close)
        writer = stack.enter_context(MetricsWriter(workdir, enabled=is_main, resume_step=start_step))
        guard = stack.enter_context(PreemptionGuard())
        progress = stack.enter_context(
            tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, disable=not is_main)
        )
        train_batches = input_pipeline.train_batches(
            data.train, batch_size=batch_size, bucket_lengths=bucket_lengths,
            bucket_multiplier=settings.data.bucket_multiplier, seed=settings.seed, start_step=start_step,
        )  # fmt: skip
        device_batches = parallel.prefetch_to_mesh(itertools.islice(train_batches, total_steps - start_step), mesh)
        window: list[dict[str, jax.Array]] = []
        examples_seen = 0
        schedule = optim.Schedule.create(settings.optim, total_steps)  # on the host, for the log
        with clock.phase("train loop"):
            for step, (host_batch, batch) in enumerate(device_batches, start=start_step + 1):
                state, step_metrics = train_fn(state, batch, dropout_rng)
                window.append(step_metrics)
                examples_seen += int(host_batch["weights"].sum())
                due = Cadence.at(step, total_steps, settings.train)
                if not due.any():
                    continue
                report_train(parallel.fetch(window), step, schedule, progress, writer, seeds)
                window = []
                if due.evaluate:
                    with clock.phase("evaluation"):
                        best.evaluate(state, step, settings, programs, data.dev, writer, progress)
                stop = guard.should_stop(multi_process=jax.process_count() > 1)
                if due.checkpoint or stop:
                    with clock.phase("checkpointing"):
                        save_train_state(checkpoints, state, step, settings, steps_per_epoch)
                if stop:
                    raise Preempted(guard.received or signal.SIGTERM, step)

        with clock.phase("prediction"):
            best_params, best_metrics = best.restore_best(state)
            test_logits = best.predict(best_params, programs, data.test)  # [seeds, examples, classes]
            ensemble_dev = None
            if seeds:
                dev_logits = best.predict(best_params, programs, data.dev).mean(axis=0)
                ensemble_dev = evaluate.dev_metrics(dev_logits, data.dev.labels)
    predict_path = workdir / settings.train.predict_file
    summary = run_summary.build(
        settings=settings, state=parallel.fetch({"step": state.step, "skipped_steps": state.skipped_steps}), best_metrics=best_metrics, start_step=start_step,
        examples_seen=examples_seen, train_fn=train_fn, eval_fn=programs.eval_fn, compile_wall=compile_wall,
        buckets=buckets, compute_dtype=dtype, predict_path=predict_path, data=data,
        test_logits=test_logits.mean(axis=0), stopwatch=clock, seeds=seeds, ensemble_dev=ensemble_dev,
    )  # fmt: skip
    if is_main:
        selection.write_predictions(predict_path, test_logits, seeds, settings, data.test)
        run_summary.write(workdir, summary)
        plot_training_curves(workdir)
        print(run_summary.format_summary(summary))
    return summary


def report_train(window: list[dict[str, np.ndarray]], step: int, schedule: optim.Schedule, progress, writer, seeds=()) -> None:
    """Logs the mean losses of the steps since the last report (over seeds too, and per seed
    when there are several); stops a diverged run."""
    stacked = {key: np.stack([np.asarray(m[key]) for m in window]) for key in window[0]}  # [steps(, seeds)]
    loss = float(stacked["loss"].mean())
    if not np.all(np.isfinite(stacked["loss"])) and "loss_scale" not in stacked:
        raise FloatingPointError(
            f"training diverged: the loss is {loss} in the steps up to {step}; the last checkpoint "
            "was saved before that and is what a restart resumes from"
        )

    def record(values: dict[str, np.ndarray]) -> dict[str, float | int]:
        out = {
            "loss": float(values["loss"].mean()),
            "ce": float(values["ce"].mean()),
            "kd": float(values["kd"].mean()),
            "learning_rate": float(np.ravel(schedule(step - 1))[0]),
            "skipped_steps": int(np.max(values["skipped_steps"][-1])),
        }
        if "loss_scale" in values:
            out["loss_scale"] = float(np.ravel(values["loss_scale"][-1])[0])
        return out

    writer.write_train(step, record(stacked))
    for i, seed in enumerate(seeds):
        writer.write_train(step, record({key: value[:, i] for key, value in stacked.items()}), seed=seed)
    progress.set_postfix_str(f"loss {loss:.4f}", refresh=False)
    progress.update(len(window))


def save_train_state(checkpoints: TrainCheckpoints, state: TrainState, step: int, settings: Settings, steps_per_epoch: int) -> None:
    """A full train checkpoint, refused if any parameter is not finite (so none reaches disk)."""
    if not bool(_all_params_finite(state)):
        raise FloatingPointError(f"non-finite parameters at step {step}; the checkpoint was not saved")
    position = {
        "step": step, "seed": settings.seed, "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
        "model_seeds": list(settings.train.seeds or (settings.seed,)),
    }  # fmt: skip
    checkpoints.save(step, state, position)


@jax.jit
def _all_params_finite(state: TrainState) -> jax.Array:
    return mixed_precision.all_finite((state.params, state.teacher, state.eval_ema))


if __name__ == "__main__":
    from sda_jax import main

    main.run_train()
