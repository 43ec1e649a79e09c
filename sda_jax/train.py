"""`python -m sda_jax.train`: fine-tune with self-distillation averaging, evaluate, predict (`train_and_evaluate`).

Data flow: `data.splits` (read + encode the files) → `data.input_pipeline` (host bucketing) →
`parallel.distributed` (sharded device batches) → `step.train_step` (one jitted, donated program
per bucket length, over the model axis of `step.model_axis`) → `evaluation.evaluate` (the
parameter sets of every model scored on dev) → `evaluation.selection` (each model's best
checkpoint) → the prediction file. `train_and_evaluate` is `run.prepare` → `compile_programs` →
`run.loop.train` (its hooks) → `finish`. The command line is `sda_jax.commands`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sda_jax.config import Settings
from sda_jax.evaluation import evaluate, selection, sweep_results
from sda_jax.parallel import distributed
from sda_jax.parallel.bucketed_jit import BucketedJit, compile_concurrently
from sda_jax.run import loop
from sda_jax.run.prepare import Run, prepare
from sda_jax.step import sda
from sda_jax.step.train_step import abstract_train_state, place_state_and_step
from sda_jax.stopwatch import Stopwatch
from sda_jax.workdir import run_summary
from sda_jax.workdir.layout import RunOutputs, Workdir
from sda_jax.workdir.plots import plot_training_curves

Params = Any


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
        batch = lambda n: distributed.abstract_batch(settings.train.batch_size, n, run.mesh)
        tasks = [(train_fn, (state, batch(n), run.dropout_keys)) for n in lengths]
        tasks += programs.compile_tasks(*selection.compiled_groups(state, settings))
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
        best = (sda.Current(best_params["eval_ema"]),)
        (test_logits,) = programs.eval.logits(best, data.test)  # [models, examples, classes]
        (dev_logits,) = programs.eval.logits(best, data.dev)
    table = sweep_results.summary(run.models.describe(), best_metrics)
    chosen = table["best_combination"]["models"] if settings.train.predict_with == "best_combination" else [table["best_model"]["model"]]
    prediction = {
        "with": settings.train.predict_with, "models": chosen,
        **{f"dev_{k}": v for k, v in evaluate.dev_metrics(dev_logits[chosen].mean(axis=0), data.dev.labels).items()},
    }  # fmt: skip
    counts = distributed.fetch({"step": state.step, "skipped_steps": state.skipped_steps})
    summary = run_summary.build(
        run, programs, counts=counts, best_metrics=best_metrics, table=table, prediction=prediction,
        ensemble_dev=evaluate.dev_metrics(dev_logits.mean(axis=0), data.dev.labels), test_logits=test_logits[chosen],
        start_step=session.start_step, examples_seen=session.examples_seen, stopwatch=clock,
        to_first_step=session.to_first_step,
    )  # fmt: skip
    if run.is_main:
        submission = lambda logits: evaluate.submission(data.test.ids, evaluate.argmax_labels(logits, settings.data.label_names))
        run.workdir.write_outputs(settings, RunOutputs(
            submission=submission(test_logits[chosen].mean(axis=0)), summary=summary,
            per_model=tuple(map(submission, test_logits)) if settings.train.per_model_predictions else (),
            sweep_tables=(sweep_results.to_csv(table), sweep_results.to_markdown(table)) if settings.sweep else None,
        ))  # fmt: skip
        if settings.train.plot_curves:
            plot_training_curves(run.workdir)
        print(run_summary.format_summary(summary))
    return summary


if __name__ == "__main__":
    from sda_jax import commands

    commands.run_train(train_and_evaluate)
