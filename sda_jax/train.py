"""Training with self-distillation averaging: the train state, the jitted train step, the loop.

    python -m sda_jax.train --config configs/afqmc_small.py --workdir runs/afqmc_small

Data flow: input_pipeline (host bucketing) → parallel (sharded device batches) → `train_step`
(one jitted, donated program per bucket length) → evaluate (dev metrics, best checkpoint) →
prediction file. The state is a plain pytree; the teacher and the eval EMA are parameter pytrees
that only ever receive EMA updates, never gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from sda_jax import (
    adversarial,
    distill,
    evaluate,
    input_pipeline,
    mixed_precision,
    optim,
    parallel,
    run_summary,
    splits,
)
from sda_jax.bucketed_jit import BucketedJit, batch_shape_key
from sda_jax.checkpoints import BestCheckpoint, TrainCheckpoints
from sda_jax.errors import InputError
from sda_jax.metrics_writer import MetricsWriter, plot_training_curves
from sda_jax.model_loading import load_model
from sda_jax.preemption import Preempted, PreemptionGuard
from sda_jax.run_record import prepare_workdir, truncate_metrics, write_run_record
from sda_jax.settings import Settings

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: train steps taken, skipped fp16 overflow steps included
    params: Params  # the student, the only parameters that receive gradients
    opt_state: optax.OptState
    slow_params: Params | None  # Lookahead's slow weights (None when Lookahead is off)
    teacher_params: Params  # SDA teacher: EMA of the student, or the mean of its snapshots
    teacher_snapshots: Params | None  # window/vote teachers: the last K students, stacked
    eval_ema_params: Params  # evaluation EMA: a copy of the student until its start step
    loss_scale: mixed_precision.LossScale | None  # float16 only
    skipped_steps: jax.Array  # int32: fp16 steps skipped for non-finite gradients


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The train step's static hyper-parameters (hashable, so jit specialises on them)."""

    kd_coeff: float
    teacher_decay: float
    eval_ema_decay: float
    eval_ema_start_step: int
    lookahead_k: int
    lookahead_alpha: float
    loss_scaling: bool  # float16 compute: dynamic loss scaling, overflow steps skipped
    initial_loss_scale: float = 2.0**16
    loss_scale_growth_interval: int = 2000
    teacher: str = "ema"  # ema | window | vote
    teacher_window: int = 5
    adversarial_method: str = "none"  # none | fgm | pgd
    adversarial_epsilon: float = 1.0
    adversarial_alpha: float = 0.3
    adversarial_steps: int = 3

    @classmethod
    def from_settings(cls, settings: Settings, dtype: jnp.dtype) -> StepConfig:
        return cls(
            kd_coeff=settings.sda.kd_coeff,
            teacher_decay=settings.sda.teacher_decay,
            eval_ema_decay=settings.sda.eval_ema_decay,
            eval_ema_start_step=settings.sda.eval_ema_start_step,
            lookahead_k=settings.optim.lookahead_k,
            lookahead_alpha=settings.optim.lookahead_alpha,
            loss_scaling=jnp.dtype(dtype) == jnp.float16,
            initial_loss_scale=settings.fp16.initial_loss_scale,
            loss_scale_growth_interval=settings.fp16.growth_interval,
            teacher=settings.sda.teacher,
            teacher_window=settings.sda.teacher_window,
            adversarial_method=settings.adversarial.method,
            adversarial_epsilon=settings.adversarial.epsilon,
            adversarial_alpha=settings.adversarial.alpha,
            adversarial_steps=settings.adversarial.steps,
        )


def create_train_state(params: Params, tx: optax.GradientTransformation, config: StepConfig) -> TrainState:
    """The state before step 1: teacher, eval EMA (and Lookahead's slow weights) equal the student."""
    copy = functools.partial(jax.tree.map, jnp.copy)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=tx.init(params),
        slow_params=copy(params) if config.lookahead_k else None,
        teacher_params=copy(params),
        teacher_snapshots=distill.init_snapshots(params, config.teacher_window) if config.teacher != "ema" else None,
        eval_ema_params=copy(params),
        loss_scale=(
            mixed_precision.LossScale.create(config.initial_loss_scale, config.loss_scale_growth_interval)
            if config.loss_scaling
            else None
        ),
        skipped_steps=jnp.zeros([], jnp.int32),
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    config: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SDA step: student update on CE + kd·MSE(teacher), then the teacher and eval EMA. Pure."""
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    # The teacher runs like the reference's kd_model.eval(): no dropout, no gradient.
    if config.teacher == "vote":
        teacher_logits = jax.vmap(lambda p: model.apply({"params": p}, *inputs, deterministic=True))(
            state.teacher_snapshots
        ).mean(axis=0)
    else:
        teacher_logits = model.apply({"params": state.teacher_params}, *inputs, deterministic=True)
    dropout_rng = jax.random.fold_in(rng, state.step)
    scale = state.loss_scale.scale if config.loss_scaling else 1.0

    def grad_fn(params, attack: int = 0):
        """Gradients of the scaled loss; attack > 0 marks an adversarial pass (own dropout)."""

        def loss_fn(params):
            rngs = {"dropout": jax.random.fold_in(dropout_rng, attack) if attack else dropout_rng}
            logits = model.apply({"params": params}, *inputs, deterministic=False, rngs=rngs)
            loss, (ce, kd) = distill.sda_loss(logits, teacher_logits, batch["labels"], batch["weights"], config.kd_coeff)
            return loss * scale, (loss, ce, kd)

        return jax.grad(loss_fn, has_aux=True)(params)

    grads, (loss, ce, kd) = grad_fn(state.params)
    if config.adversarial_method != "none":
        grads = adversarial.adversarial_gradients(
            grad_fn, state.params, grads, method=config.adversarial_method, epsilon=config.adversarial_epsilon,
            alpha=config.adversarial_alpha, steps=config.adversarial_steps,
        )  # fmt: skip
    grads = jax.tree.map(lambda g: g / scale, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step)
    params = optax.apply_updates(state.params, updates)
    slow_params = state.slow_params
    if config.lookahead_k:
        applied_updates = state.step + 1 - state.skipped_steps
        params, slow_params = optim.lookahead_sync(
            params, slow_params, applied_updates, config.lookahead_k, config.lookahead_alpha
        )

    loss_scale, skipped_steps = state.loss_scale, state.skipped_steps
    if config.loss_scaling:
        # An overflowed fp16 step changes nothing but the scale, as torch's GradScaler.step does;
        # the learning-rate schedule still moves on, since it follows the train step.
        finite = mixed_precision.all_finite(grads)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state, slow_params = keep((params, opt_state, slow_params), (state.params, state.opt_state, state.slow_params))
        loss_scale = loss_scale.adjust(finite)
        skipped_steps = skipped_steps + (~finite).astype(jnp.int32)

    step = state.step + 1
    snapshots = state.teacher_snapshots
    if config.teacher == "ema":
        teacher = distill.ema_update(params, state.teacher_params, distill.teacher_decay(step, config.teacher_decay))
    else:
        snapshots = distill.push_snapshot(snapshots, params, step)
        teacher = distill.snapshot_average(snapshots)
    eval_ema = distill.ema_update(
        params,
        state.eval_ema_params,
        distill.eval_ema_decay(step, config.eval_ema_decay, config.eval_ema_start_step),
    )
    new_state = state.replace(
        step=step,
        params=params,
        opt_state=opt_state,
        slow_params=slow_params,
        teacher_params=teacher,
        teacher_snapshots=snapshots,
        eval_ema_params=eval_ema,
        loss_scale=loss_scale,
        skipped_steps=skipped_steps,
    )
    metrics = {"loss": loss, "ce": ce, "kd": kd, "skipped_steps": skipped_steps}
    if config.loss_scaling:
        metrics["loss_scale"] = loss_scale.scale
    return new_state, metrics


def place_state_and_step(
    params: Params, model: Any, tx: optax.GradientTransformation, config: StepConfig, mesh: jax.sharding.Mesh
) -> tuple[TrainState, BucketedJit]:
    """The initial state, replicated on the mesh, and the train step compiled once per batch shape.

    Shardings come from `jax.eval_shape` of the state, so nothing is allocated to derive them.
    """
    replicated = parallel.replicated(mesh)
    create = functools.partial(create_train_state, tx=tx, config=config)
    state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(create, params))
    state = jax.jit(create, out_shardings=state_sharding)(params)
    train_fn = BucketedJit(
        jax.jit(
            functools.partial(train_step, model=model, tx=tx, config=config),
            in_shardings=(state_sharding, parallel.batch_sharding(mesh), replicated),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        ),
        batch_shape_key,
    )
    return state, train_fn


def train_and_evaluate(settings: Settings, workdir: pathlib.Path, *, fresh: bool = False) -> dict[str, Any]:
    """Trains (resuming from the workdir's latest checkpoint), evaluates, predicts the test set.

    Every input is read and checked before the workdir is touched, so bad input leaves nothing.
    Dev evaluation every `eval_every` steps keeps the best checkpoint; a full train checkpoint
    every `checkpoint_every` steps, and on SIGTERM/SIGINT, makes a restart resume exactly.
    Returns the run summary (also written to workdir/summary.json by process 0).
    """
    wall_start = time.perf_counter()
    data = splits.load_splits(settings.data, settings.model.dir)
    init_rng, dropout_rng = jax.random.split(jax.random.key(settings.seed))
    dtype = mixed_precision.compute_dtype(settings.model.dtype, jax.devices()[0].platform)
    model, params, load_note = load_model(settings, len(data.tokenizer), init_rng, dtype)
    bucket_lengths = splits.bucket_lengths(settings.data, data.train)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(settings.train.batch_size, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        prepare_workdir(workdir, settings, settings.train.predict_file, fresh=fresh)
        write_run_record(workdir, settings, model.config, settings.data.label_names, data.tokenizer)
        print(load_note)
        if not settings.data.bucket_lengths:
            padding = input_pipeline.padded_fraction(data.train.lengths, bucket_lengths)
            print(f"Bucket lengths fitted to the train set: {list(bucket_lengths)} ({padding:.1%} padding tokens).")
    multihost_utils.sync_global_devices("workdir ready")

    batch_size = settings.train.batch_size
    steps_per_epoch = input_pipeline.steps_per_epoch(len(data.train), batch_size)
    total_steps = settings.train.num_epochs * steps_per_epoch
    if settings.train.max_steps:
        total_steps = min(total_steps, settings.train.max_steps)
    tx = optim.make_optimizer(settings.optim, total_steps)
    schedule = optim.learning_rate_schedule(settings.optim, total_steps)
    step_config = StepConfig.from_settings(settings, dtype)

    state, train_fn = place_state_and_step(params, model, tx, step_config, mesh)
    del params
    batch_sharding = parallel.batch_sharding(mesh)
    eval_fn = BucketedJit(
        jax.jit(functools.partial(evaluate.eval_step, model=model), out_shardings=batch_sharding), batch_shape_key
    )
    state_is_finite = jax.jit(lambda s: mixed_precision.all_finite((s.params, s.teacher_params, s.eval_ema_params)))
    bucket_args = {"batch_size": batch_size, "bucket_lengths": bucket_lengths}

    def run_dev(params) -> dict[str, float]:
        batches = parallel.prefetch_to_mesh(input_pipeline.eval_batches(data.dev, **bucket_args), mesh)
        logits, losses = evaluate.collect_logits(eval_fn, params, batches)
        return evaluate.dev_metrics(logits, losses, data.dev.labels)

    with contextlib.ExitStack() as stack:
        checkpoints = TrainCheckpoints(workdir, settings.train.keep_checkpoints)
        stack.callback(checkpoints.close)  # lets a pending write finish, whatever ends the run
        start_step = checkpoints.latest_step() or 0
        if start_step:
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
            data.train, bucket_multiplier=settings.data.bucket_multiplier, seed=settings.seed,
            start_step=start_step, **bucket_args,
        )  # fmt: skip
        device_batches = parallel.prefetch_to_mesh(itertools.islice(train_batches, total_steps - start_step), mesh)
        pending: list[dict[str, jax.Array]] = []
        examples_seen, eval_seconds, loop_start = 0, 0.0, time.perf_counter()
        for step, (host_batch, batch) in enumerate(device_batches, start=start_step + 1):
            state, step_metrics = train_fn(state, batch, dropout_rng)
            pending.append(step_metrics)
            examples_seen += int(host_batch["weights"].sum())
            evaluate_now = step % settings.train.eval_every == 0 or step == total_steps
            checkpoint_now = step % settings.train.checkpoint_every == 0 or step == total_steps
            # Log boundaries depend on the step alone, so a resumed run logs the same windows.
            if not (evaluate_now or checkpoint_now or step % settings.train.log_every == 0):
                continue
            _log_train(jax.device_get(pending), step, schedule, progress, writer)
            pending = []
            if evaluate_now:
                eval_start = time.perf_counter()
                param_sets = {"eval_ema": state.eval_ema_params, "student": state.params, "teacher": state.teacher_params}
                # As the reference: the eval EMA once started, else the student, is what counts.
                scored = "eval_ema" if step > settings.sda.eval_ema_start_step else "student"
                dev = run_dev(param_sets[scored])
                writer.write_dev(step, scored, dev)
                if settings.train.eval_all_params:
                    for name in sorted(set(param_sets) - {scored}):
                        writer.write_dev(step, name, run_dev(param_sets[name]))
                improved = best.offer(step, param_sets, {**dev, "params": scored})
                progress.write(run_summary.dev_line(step, dev, scored, improved))
                eval_seconds += time.perf_counter() - eval_start
            stop = guard.should_stop(multi_process=jax.process_count() > 1)
            if checkpoint_now or stop:
                if not bool(state_is_finite(state)):
                    raise FloatingPointError(f"non-finite parameters at step {step}; the checkpoint was not saved")
                position = {"step": step, "seed": settings.seed, "epoch": step // steps_per_epoch,
                            "batch_in_epoch": step % steps_per_epoch}  # fmt: skip
                checkpoints.save(step, state, position)
            if stop:
                raise Preempted(guard.received or signal.SIGTERM, step)
        train_seconds = time.perf_counter() - loop_start - eval_seconds

        best_params, best_metrics = best.restore(
            {"student": state.params, "teacher": state.teacher_params, "eval_ema": state.eval_ema_params}
        )
    test_batches = parallel.prefetch_to_mesh(input_pipeline.eval_batches(data.test, **bucket_args), mesh)
    test_logits, _ = evaluate.collect_logits(eval_fn, best_params["eval_ema"], test_batches)
    predict_path = workdir / settings.train.predict_file
    summary = {
        "best_dev_accuracy": best_metrics["accuracy"],
        "best_dev_f1": best_metrics["f1"],
        "best_step": best_metrics["step"],
        "best_params": best_metrics["params"],
        "steps": int(state.step),
        "resumed_from_step": start_step,
        "skipped_steps": int(state.skipped_steps),
        "train_examples": examples_seen,
        "train_seconds": train_seconds,
        "train_samples_per_second": examples_seen / max(train_seconds, 1e-9),
        "train_step_compilations": train_fn.num_compilations,
        "train_step_compile_seconds": train_fn.compile_seconds,
        "num_buckets": len(bucket_lengths),
        "bucket_lengths": list(bucket_lengths),
        "wall_seconds": time.perf_counter() - wall_start,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} processes)",
        "compute_dtype": jnp.dtype(dtype).name,
        "predictions": str(predict_path),
        "test_rows": len(data.test),
    }
    if is_main:
        labels = evaluate.argmax_labels(test_logits, settings.data.label_names)
        evaluate.write_predictions(predict_path, data.test.ids, labels)
        evaluate.write_text_atomically(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_training_curves(workdir)
        print(run_summary.format_summary(summary))
    return summary


def _log_train(window: list[dict[str, np.ndarray]], step: int, schedule, progress, writer: MetricsWriter) -> None:
    """Reports the mean losses of the steps since the last report; stops a diverged run."""
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


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/afqmc.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard the run in --workdir and start from step 0.")
flags.DEFINE_alias("overwrite", "fresh")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag or config override as a one-line error and exit 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, OSError, KeyError, AttributeError, TypeError, ValueError) as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Resumed and repeated runs load their compiled train steps instead of compiling again.
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path.home() / ".cache" / "sda_jax" / "xla"))
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config_file = flags.FLAGS["config"].config_filename
    if not config_file:
        raise app.UsageError("--config is required, e.g. --config configs/afqmc.py")
    workdir = pathlib.Path(_WORKDIR.value or f"runs/{pathlib.Path(config_file).stem}")
    try:
        if not pathlib.Path(config_file.split(":")[0]).is_file():  # "file.py:arg" passes arg to get_config
            raise InputError(f"{config_file}: no such config file")
        parallel.initialize_distributed()
        train_and_evaluate(Settings.from_config(_CONFIG.value), workdir, fresh=_FRESH.value)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except Preempted as err:
        print(str(err), file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
