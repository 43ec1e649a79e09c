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
    splits,
)
from sda_jax.bucketed_jit import BucketedJit, batch_shape_key, compile_concurrently
from sda_jax.checkpoints import BestCheckpoint, TrainCheckpoints
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


def param_sets(state: TrainState) -> dict[str, averaging.Average]:
    """The run's parameter sets by the names logs, checkpoints and export use."""
    eval_ema = averaging.Current(state.params) if state.eval_ema is None else state.eval_ema
    return {"eval_ema": eval_ema, "student": averaging.Current(state.params), "teacher": state.teacher}


def single_models(sets: dict[str, averaging.Average]) -> dict[str, Params]:
    """The sets that are one model each (all but a vote teacher), as parameters: what a best checkpoint holds."""
    models = {}
    for name, average in sets.items():
        with contextlib.suppress(averaging.NotOneModel):
            models[name] = average.single_params()
    return models


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


def jit_train_step(model: Any, settings: Settings, mesh: jax.sharding.Mesh, state_sharding: Any) -> Any:
    """`train_step` jitted for the mesh: batch rows split over devices, the state donated."""
    replicated = parallel.replicated(mesh)
    return jax.jit(
        functools.partial(train_step, model=model, settings=settings),
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def abstract_train_state(
    param_shapes: Any, settings: Settings, total_steps: int, compute_dtype: Any, mesh: jax.sharding.Mesh
) -> TrainState:
    """The train state's shapes, dtypes and (replicated) shardings, derived with `jax.eval_shape`:
    what compiling needs, with nothing allocated (also for a device that is not there)."""
    create = functools.partial(
        create_train_state, settings=settings, compute_dtype=compute_dtype,
        eval_ema_starts=total_steps > settings.sda.eval_ema_start_step,
    )  # fmt: skip
    shapes = jax.eval_shape(create, param_shapes, optim.Schedule.create(settings.optim, total_steps))
    replicated = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def place_state_and_step(
    params: Params, model: Any, settings: Settings, total_steps: int, mesh: jax.sharding.Mesh, clock: Stopwatch | None = None
) -> tuple[TrainState, BucketedJit]:
    """The initial state, replicated on the mesh, and the train step compiled once per batch shape."""
    abstract = abstract_train_state(params, settings, total_steps, model.dtype, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
    create = functools.partial(
        create_train_state, settings=settings, compute_dtype=model.dtype,
        eval_ema_starts=total_steps > settings.sda.eval_ema_start_step,
    )  # fmt: skip
    state = jax.jit(create, out_shardings=state_sharding)(params, optim.Schedule.create(settings.optim, total_steps))
    return state, BucketedJit(jit_train_step(model, settings, mesh, state_sharding), batch_shape_key, clock)


def jit_eval_step(model: Any, mesh: jax.sharding.Mesh) -> Any:
    """`evaluate.eval_step` jitted for the mesh: outputs sharded like the batch rows."""
    return jax.jit(functools.partial(evaluate.eval_step, model=model), out_shardings=parallel.batch_sharding(mesh))


def abstract_batch(batch_size: int, length: int, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and sharding of a device batch of `length` tokens, for compiling ahead."""
    sharding = parallel.batch_sharding(mesh)
    matrix = lambda dtype: jax.ShapeDtypeStruct((batch_size, length), dtype, sharding=sharding)
    row = lambda dtype: jax.ShapeDtypeStruct((batch_size,), dtype, sharding=sharding)
    return {
        "input_ids": matrix(jnp.int32), "token_type_ids": matrix(jnp.int32), "attention_mask": matrix(jnp.int32),
        "labels": row(jnp.int32), "weights": row(jnp.float32),
    }  # fmt: skip


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
    init_rng, dropout_rng = jax.random.split(jax.random.key(settings.seed))
    dtype = mixed_precision.compute_dtype(settings.model.dtype, jax.devices()[0].platform)
    with clock.phase("model"):
        model, params, load_note = load_model(settings, len(data.tokenizer), init_rng, dtype)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(settings.train.batch_size, mesh)
    batch_size = settings.train.batch_size
    steps_per_epoch = input_pipeline.steps_per_epoch(len(data.train), batch_size)
    total_steps = settings.train.num_epochs * steps_per_epoch
    if settings.train.max_steps:
        total_steps = min(total_steps, settings.train.max_steps)
    # Every process reads the whole train set, so all of them choose the same lengths.
    buckets = bucket_policy.choose(
        settings.data, data.train.lengths, model.config, jax.devices()[0].platform, total_steps / steps_per_epoch
    )
    bucket_lengths = buckets.lengths
    is_main = jax.process_index() == 0
    if is_main:
        prepare_workdir(workdir, settings, settings.train.predict_file, fresh=fresh)
        write_run_record(workdir, settings, model.config, settings.data.label_names, data.tokenizer)
        print(load_note)
        if buckets.note:
            print(buckets.note)
    multihost_utils.sync_global_devices("workdir ready")
    state, train_fn = place_state_and_step(params, model, settings, total_steps, mesh, clock)
    del params
    dev_sets = _scored_sets(param_sets(state), settings, step=1)
    programs = _EvalPrograms(model, mesh, bucket_lengths, batch_size, clock)
    with clock.phase("compile"):
        # Every program of the run, up front and side by side: train and eval per bucket length.
        tasks = [(train_fn, (state, abstract_batch(batch_size, n, mesh), dropout_rng)) for n in bucket_lengths]
        tasks += programs.compile_tasks(dev_sets, _prediction_sets(state))
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
        best = BestCheckpoint(workdir)
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
        with clock.phase("train loop"):
            for step, (host_batch, batch) in enumerate(device_batches, start=start_step + 1):
                state, step_metrics = train_fn(state, batch, dropout_rng)
                window.append(step_metrics)
                examples_seen += int(host_batch["weights"].sum())
                due = Cadence.at(step, total_steps, settings.train)
                if not due.any():
                    continue
                report_train(jax.device_get(window), step, state.schedule, progress, writer)
                window = []
                if due.evaluate:
                    with clock.phase("evaluation"):
                        evaluate_and_keep_best(state, step, settings, programs, data.dev, best, writer, progress)
                stop = guard.should_stop(multi_process=jax.process_count() > 1)
                if due.checkpoint or stop:
                    with clock.phase("checkpointing"):
                        save_train_state(checkpoints, state, step, settings.seed, steps_per_epoch)
                if stop:
                    raise Preempted(guard.received or signal.SIGTERM, step)

        with clock.phase("prediction"):
            best_params, best_metrics = best.restore(single_models(param_sets(state)))
            test_logits = programs.logits(_prediction_sets(best_params), data.test)["eval_ema"]
    predict_path = workdir / settings.train.predict_file
    summary = run_summary.build(
        settings=settings, state=state, best_metrics=best_metrics, start_step=start_step,
        examples_seen=examples_seen, train_fn=train_fn, eval_fn=programs.eval_fn, compile_wall=compile_wall,
        buckets=buckets, compute_dtype=dtype, predict_path=predict_path, data=data,
        test_logits=test_logits, stopwatch=clock,
    )  # fmt: skip
    if is_main:
        labels = evaluate.argmax_labels(test_logits, settings.data.label_names)
        evaluate.write_predictions(predict_path, data.test.ids, labels)
        run_summary.write(workdir, summary)
        plot_training_curves(workdir)
        print(run_summary.format_summary(summary))
    return summary


def _scored_sets(sets: dict[str, averaging.Average], settings: Settings, step: int) -> dict[str, averaging.Average]:
    """The sets dev evaluation scores, the one that counts for "best" first: the eval EMA once it
    has started, else the student (as the reference); all three with `train.eval_all_params`."""
    scored = "eval_ema" if step > settings.sda.eval_ema_start_step else "student"
    others = sorted(set(sets) - {scored}) if settings.train.eval_all_params else []
    return {name: sets[name] for name in (scored, *others)}


def _prediction_sets(source: TrainState | dict[str, Params]) -> dict[str, averaging.Average]:
    """What test prediction runs: the eval EMA of the best checkpoint (or, to compile for it, of
    a train state), alone: one set's work per example, an eval program of its own."""
    params = source["eval_ema"] if isinstance(source, dict) else param_sets(source)["eval_ema"].single_params()
    return {"eval_ema": averaging.Current(params)}


class _EvalPrograms:
    """Dev and test evaluation of parameter sets: the stacking program and one eval program per bucket."""

    def __init__(self, model: Any, mesh: jax.sharding.Mesh, bucket_lengths: tuple[int, ...], batch_size: int, clock):
        self.mesh, self.bucket_lengths, self.batch_size = mesh, bucket_lengths, batch_size
        self.replicated = parallel.replicated(mesh)
        self.stack = BucketedJit(
            jax.jit(evaluate.stack_members, out_shardings=self.replicated),
            lambda singles, ensembles: (len(singles), *(jax.tree.leaves(e)[0].shape[0] for e in ensembles)),
            clock,
        )
        # One program per (member count, batch shape): dev evaluation and prediction may differ in the former.
        member_count = lambda members, batch: (jax.tree.leaves(members)[0].shape[0], *batch["input_ids"].shape)
        self.eval_fn = BucketedJit(jit_eval_step(model, mesh), member_count, clock)

    def compile_tasks(self, *set_groups: dict[str, averaging.Average]) -> list[tuple[BucketedJit, tuple]]:
        """What `compile_concurrently` needs to build every program that evaluating each group of
        sets runs: the stacking and one eval program per bucket length (shared where they agree)."""
        placed = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), tree)
        tasks = []
        for sets in set_groups:
            _, singles, ensembles = evaluate.set_parts(sets)
            singles, ensembles = placed(singles), placed(ensembles)
            members = placed(jax.eval_shape(evaluate.stack_members, singles, ensembles))
            tasks.append((self.stack, (singles, ensembles)))
            tasks += [(self.eval_fn, (members, abstract_batch(self.batch_size, n, self.mesh))) for n in self.bucket_lengths]
        return tasks

    def logits(self, sets: dict[str, averaging.Average], encoded: Any) -> dict[str, np.ndarray]:
        """{name: logits} of every set on every example of `encoded`, in file order."""
        stacked = evaluate.stack_param_sets(self.stack, sets)
        order = input_pipeline.eval_order(encoded)
        batches = input_pipeline.eval_batches(
            encoded, batch_size=self.batch_size, bucket_lengths=self.bucket_lengths, order=order
        )
        return evaluate.collect_logits(self.eval_fn, stacked, parallel.prefetch_to_mesh(batches, self.mesh), order)


def report_train(window: list[dict[str, np.ndarray]], step: int, schedule: optim.Schedule, progress, writer) -> None:
    """Logs the mean losses of the steps since the last report; stops a diverged run."""
    loss = float(np.mean([m["loss"] for m in window]))
    if not np.isfinite(loss) and "loss_scale" not in window[-1]:
        raise FloatingPointError(
            f"training diverged: the loss is {loss} in the steps up to {step}; the last checkpoint "
            "was saved before that and is what a restart resumes from"
        )
    record = {
        "loss": loss,
        "ce": float(np.mean([m["ce"] for m in window])),
        "kd": float(np.mean([m["kd"] for m in window])),
        "learning_rate": float(schedule(step - 1)),
        "skipped_steps": int(window[-1]["skipped_steps"]),
    }
    if "loss_scale" in window[-1]:
        record["loss_scale"] = float(window[-1]["loss_scale"])
    writer.write_train(step, record)
    progress.set_postfix_str(f"loss {loss:.4f}", refresh=False)
    progress.update(len(window))


def evaluate_and_keep_best(
    state: TrainState, step: int, settings: Settings, programs: _EvalPrograms, dev: Any, best, writer, progress
) -> None:
    """Scores the run's parameter sets on dev, logs them, and checkpoints the step if it is the best."""
    sets = _scored_sets(param_sets(state), settings, step)
    scored = next(iter(sets))
    logits = programs.logits(sets, dev)
    results = {name: evaluate.dev_metrics(logits[name], dev.labels) for name in sets}  # the scored set first
    for name, metrics in results.items():
        writer.write_dev(step, name, metrics)
    improved = best.offer(step, single_models(param_sets(state)), {**results[scored], "params": scored})
    progress.write(run_summary.dev_line(step, results[scored], scored, improved))


def save_train_state(checkpoints: TrainCheckpoints, state: TrainState, step: int, seed: int, steps_per_epoch: int) -> None:
    """A full train checkpoint, refused if any parameter is not finite (so none reaches disk)."""
    if not bool(_all_params_finite(state)):
        raise FloatingPointError(f"non-finite parameters at step {step}; the checkpoint was not saved")
    position = {"step": step, "seed": seed, "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch}
    checkpoints.save(step, state, position)


@jax.jit
def _all_params_finite(state: TrainState) -> jax.Array:
    return mixed_precision.all_finite((state.params, state.teacher, state.eval_ema))


if __name__ == "__main__":
    from sda_jax import main

    main.run_train()
