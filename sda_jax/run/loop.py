"""The train loop and its periodic actions: reporting, dev evaluation with each model's best
checkpoint, train checkpoints, and stopping on a signal, each a small hook that `Cadence` drives.

A `Session` holds what a run keeps open while it trains (train checkpoints, each model's best
checkpoint, the metrics writer, the signal guard, the progress bar) and knows where it resumes.
Hooks run only on steps `Cadence` names, and those depend on the step alone, so a resumed run logs,
evaluates and checkpoints at the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from sda_jax.config import TrainSettings
from sda_jax.data import input_pipeline
from sda_jax.evaluation import selection
from sda_jax.evaluation.evaluate import EvalPrograms, Scores
from sda_jax.parallel import distributed
from sda_jax.run import allocation
from sda_jax.run.preemption import Preempted, PreemptionGuard
from sda_jax.step import optim, precision
from sda_jax.stopwatch import Stopwatch, format_phases
from sda_jax.workdir import run_summary
from sda_jax.workdir.checkpoints import TrainCheckpoints
from sda_jax.workdir.metrics_log import MetricsWriter


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Which periodic actions fall on a step."""

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


class Session(contextlib.ExitStack):
    """What a run keeps open while it trains; on entering it resumes: `state` is the newest intact
    train checkpoint's (or the initial state) and `start_step` its step (0: from the start)."""

    def __init__(self, run: Any, clock: Stopwatch, state: Any):
        super().__init__()
        self.run, self.clock, self.state = run, clock, state

    def __enter__(self) -> Session:
        super().__enter__()
        run = self.run
        self.checkpoints = TrainCheckpoints(run.workdir.train_checkpoints, run.settings.train.keep_checkpoints)
        self.callback(self.checkpoints.close)  # lets a pending write finish, whatever ends the run
        with self.clock.phase("checkpointing"):
            resumed = self.checkpoints.restore_newest_intact(self.state, run.workdir.damaged_checkpoints, run.workdir.relative)
        self.start_step = 0 if resumed is None else resumed[0]
        if resumed is not None:
            self.state = resumed[1]
            if run.is_main:
                # Before the writer opens the file: a resumed run logs the steps after its checkpoint again.
                run.workdir.truncate_metrics(self.start_step)
                print(f"Resuming from the checkpoint of step {self.start_step}.")
                other = allocation.note(run.workdir.train_checkpoints / str(self.start_step), jax.device_count(), jax.process_count())
                if other:
                    print(other)
        self.selection = selection.Selection(run.workdir, run.models)
        self.callback(self.selection.close)
        self.writer = self.enter_context(MetricsWriter(run.workdir, enabled=run.is_main, resume_step=self.start_step))
        self.guard = self.enter_context(PreemptionGuard())
        self.progress = self.enter_context(tqdm.tqdm(
            total=run.total_steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
            disable=not run.is_main,
        ))  # fmt: skip
        self.examples_seen = 0
        self.to_first_step: dict[str, float] | None = None  # seconds by phase until the first new step ran
        return self


def restart_line(to_first_step: dict[str, float]) -> str:
    """'Restarted: first new step after 12.3 s (startup 2.3, data 0.7, ...)', phases of 0.05 s or more."""
    return f"Restarted: first new step after {to_first_step['wall']:.1f} s ({format_phases(to_first_step)})."


Hook = Callable[[int, Any, Cadence], None]  # (step, state, cadence) on every step Cadence names


def train(run: Any, train_fn: Callable, session: Session, hooks: Sequence[Hook], report: Report) -> Any:
    """Steps from the session's start to the run's end; returns the final state."""
    settings = run.settings
    batches = input_pipeline.train_batches(
        run.data.train, batch_size=settings.train.batch_size, bucket_lengths=run.buckets.lengths,
        bucket_multiplier=settings.data.bucket_multiplier, seed=settings.seed, start_step=session.start_step,
    )  # fmt: skip
    return run_steps(run, train_fn, session, hooks, report, batches)


def run_steps(run: Any, train_fn: Callable, session: Session, hooks: Sequence[Hook], report: Report, batches) -> Any:
    """`train_fn(state, batch, dropout keys)` on each host batch of `batches` (those of the steps from
    the session's start on), the hooks on the steps `Cadence` names; returns the final state."""
    state = session.state
    settings = run.settings
    device_batches = distributed.prefetch_to_mesh(itertools.islice(batches, run.total_steps - session.start_step), run.mesh)
    with session.clock.phase("train loop"):
        for step, (host_batch, batch) in enumerate(device_batches, start=session.start_step + 1):
            state, metrics = train_fn(state, batch, run.dropout_keys)
            if session.to_first_step is None:  # what a (re)start costs before it trains: by phase, in the summary
                jax.block_until_ready(metrics)
                session.to_first_step = session.clock.breakdown()
                if session.start_step and run.is_main:  # said at once: a run killed again leaves no summary
                    session.progress.write(restart_line(session.to_first_step))
            session.examples_seen += int(host_batch["weights"].sum())
            report.add(metrics)
            due = Cadence.at(step, run.total_steps, settings.train)
            if due.any():
                for hook in (report, *hooks):
                    hook(step, state, due)
    return state


class Report:
    """Logs the mean losses (`keys` of the step's metrics) of the steps since the last report, over
    the models and per model; stops a diverged run."""

    def __init__(self, session: Session, schedule: optim.Schedule, keys: Sequence[str] = ("loss", "ce", "kd")):
        self.session, self.schedule, self.window, self.keys = session, schedule, [], tuple(keys)  # the schedules on the axis
        self.models = session.run.models

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.window.append(metrics)

    def __call__(self, step: int, state: Any, due: Cadence) -> None:
        window, self.window = self.models.expand(distributed.fetch(self.window)), []
        stacked = {key: np.stack([np.asarray(m[key]) for m in window]) for key in window[0]}  # [steps, models]
        if not np.all(np.isfinite(stacked["loss"])) and "loss_scale" not in stacked:
            raise FloatingPointError(
                f"training diverged: the loss is {float(stacked['loss'].mean())} in the steps up to {step}; the last "
                "checkpoint was saved before that and is what a restart resumes from"
            )
        rates = np.ravel(self.models.expand(self.schedule(step - 1)))  # each model's (a sweep's may differ)
        means = {key: float(stacked[key].mean()) for key in self.keys}
        means["learning_rate"] = float(rates.mean())
        if "skipped_steps" in stacked:  # fine-tuning's (masked-LM pretraining skips none)
            means["skipped_steps"] = int(stacked["skipped_steps"][-1].max())
        if "loss_scale" in stacked:
            means["loss_scale"] = float(stacked["loss_scale"][-1].mean())
        per_model = []
        for i in range(stacked["loss"].shape[1]):
            model = {key: float(stacked[key][:, i].mean()) for key in self.keys}
            model["learning_rate"] = float(rates[i])
            if "skipped_steps" in stacked:
                model["skipped_steps"] = int(stacked["skipped_steps"][-1, i])
            if "loss_scale" in stacked:
                model["loss_scale"] = float(stacked["loss_scale"][-1, i])
            per_model.append(model)
        self.session.writer.write_train(step, means, per_model)
        self.session.progress.set_postfix_str(f"loss {means['loss']:.4f}", refresh=False)
        self.session.progress.update(len(window))


class Evaluate:
    """Dev evaluation of the scored sets, each model's best step checkpointed, the dev line printed."""

    def __init__(self, run: Any, session: Session, programs: EvalPrograms):
        self.run, self.session, self.programs = run, session, programs

    def __call__(self, step: int, state: Any, due: Cadence) -> None:
        if not due.evaluate:
            return
        with self.session.clock.phase("evaluation"):
            scores = score(self.programs, state, selection.scored_names(self.run.settings, step), self.run.data.dev)
            scored = next(iter(scores))
            improved = self.session.selection.keep(step, scored, scores[scored], state)
            for name, set_scores in scores.items():  # the scored set first
                self.session.writer.write_dev(step, name, set_scores.record())
            if self.run.is_main:
                self.session.progress.write(run_summary.dev_line(step, scored, scores[scored], improved))


def score(programs: EvalPrograms, state: Any, names: list[str], encoded: Any) -> dict[str, Scores]:
    """The named parameter sets of `state` scored on a labelled split, in the order of `names`."""
    computed, averages, same_as = selection.scored_averages(state, names)
    logits = programs.logits(averages, encoded)
    by_name = {name: Scores.of(set_logits, encoded.labels) for name, set_logits in zip(computed, logits, strict=True)}
    return {name: by_name[same_as.get(name, name)] for name in names}


class Checkpoint:
    """A full train checkpoint on its cadence (every `train.checkpoint_every` steps, and at the first
    log step `train.checkpoint_every_seconds` after the last one), and on a signal (then the run
    stops, resumable)."""

    def __init__(self, run: Any, session: Session):
        self.run, self.session = run, session
        self.every_seconds = run.settings.train.checkpoint_every_seconds
        self.last_save = time.monotonic()

    def __call__(self, step: int, state: Any, due: Cadence) -> None:
        # Every process asks at the same steps, so that all of them stop at the same one.
        stop = self.session.guard.should_stop(multi_process=jax.process_count() > 1)
        if due.checkpoint or stop or self._time_is_up():
            with self.session.clock.phase("checkpointing"):
                save_train_state(self.session.checkpoints, state, step, self.run)
            self.last_save = time.monotonic()
        if stop:
            raise Preempted(self.session.guard.received or signal.SIGTERM, step)

    def _time_is_up(self) -> bool:
        """Process 0's clock decides, and every process follows, so that all save the same step."""
        if self.every_seconds is None:
            return False
        up = time.monotonic() - self.last_save >= self.every_seconds
        return distributed.agree("save" if up else None) is not None


def save_train_state(checkpoints: TrainCheckpoints, state: Any, step: int, run: Any) -> None:
    """A full train checkpoint, refused if any parameter is not finite (so none reaches disk)."""
    if not bool(_all_params_finite(state)):
        raise FloatingPointError(f"non-finite parameters at step {step}; the checkpoint was not saved")
    settings, per_epoch = run.settings, run.steps_per_epoch
    position = {
        "step": step, "seed": settings.seed, "epoch": step // per_epoch, "batch_in_epoch": step % per_epoch,
        "model_seeds": list(run.models.seeds), **allocation.written_by(jax.device_count(), jax.process_count()),
    }  # fmt: skip
    checkpoints.save(step, state, position)


@jax.jit
def _all_params_finite(state: Any) -> jax.Array:
    return precision.all_finite(state.parameter_sets())
