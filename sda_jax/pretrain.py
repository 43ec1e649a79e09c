"""Task-adaptive pretraining: masked-LM training on the task's own sentences, before fine-tuning.

    python -m sda_jax.pretrain --config configs/afqmc_tapt.py --workdir runs/tapt
    python -m sda_jax.export --workdir runs/tapt --out exported/tapt      # a BertForMaskedLM folder
    python -m sda_jax.train --config configs/afqmc.py --config.model.dir=exported/tapt

Gururangan et al. 2020 ("Don't Stop Pretraining") continue the masked-LM objective on the task's
unlabelled text; `run_mlm.py` is Hugging Face's form of it. Here it is a run like fine-tuning's,
on the same machinery: `run.prepare` (the inputs checked before the workdir is touched, the mesh,
the dtype, the bucket lengths, the records), `loop.Session` (exact resume from the newest intact
train checkpoint, the metrics writer, SIGTERM) and `loop.run_steps` with its hooks, the steps
jitted once per bucket length. What differs: the data (`pretrain_data`: every split's sentences,
labels never read, masked per epoch by `masking`), the model (`masked_lm.BertForMaskedLM`, whose
head the checkpoint gives when it has one), the step (`mlm_train_step`: AdamW on the mean
cross-entropy of the predicted tokens, computed for those positions alone), and the evaluation:
masked-LM loss, accuracy and perplexity on the held-out slice every `train.eval_every` steps,
whose best step by accuracy is the checkpoint export writes.

A pretraining run trains one model in float32 or bfloat16 (no sweep, no float16 loss scaling, no
Lookahead): each is refused with a one-line error naming its key.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sda_jax.config import Settings
from sda_jax.data import mlm_corpus
from sda_jax.errors import InputError
from sda_jax.parallel import distributed
from sda_jax.parallel.bucketed_jit import BucketedJit, batch_shape_key, compile_concurrently
from sda_jax.run import loop
from sda_jax.run.prepare import Run, prepare
from sda_jax.step import optim
from sda_jax.step.mlm_step import MlmState, abstract_batch, abstract_state, create_state, mlm_eval_step, mlm_train_step
from sda_jax.stopwatch import Stopwatch
from sda_jax.workdir.layout import RunOutputs, Workdir
from sda_jax.workdir.plots import plot_training_curves

Params = Any
PARAMS_NAME = "student"  # the one parameter set (what the gradient trains), as fine-tuning's records name it


def check(settings: Settings) -> None:
    """What a pretraining run refuses, each with its key."""
    if settings.sweep:
        raise InputError(f"config key sweep.{settings.sweep[0][0]}: masked-LM pretraining trains one model; sweep when fine-tuning")
    if settings.model.dtype == "float16":
        raise InputError("config key model.dtype: masked-LM pretraining runs in float32 or bfloat16 (auto), not float16")
    if optim.uses_lookahead(settings.optim):
        raise InputError("config key optim.lookahead_alpha: masked-LM pretraining takes no Lookahead; leave it at 1")


def pretrain(settings: Settings, workdir: Any, *, fresh: bool = False, stopwatch: Stopwatch | None = None) -> dict[str, Any]:
    """Pretrains (resuming from the workdir's newest intact checkpoint), scoring the held-out slice
    every `eval_every` steps and keeping its best step; returns the summary (summary.json)."""
    clock = stopwatch or Stopwatch()
    check(settings)
    workdir = Workdir(workdir)
    with workdir.lock() as lock:
        run = prepare(settings, workdir, fresh=fresh, clock=clock, abstract_state=abstract_state, lock=lock,
                      read_data=mlm_corpus.read_corpus, masked_lm=True)  # fmt: skip
        state, train_fn, eval_fn, compile_wall = compile_programs(run, clock)
        heldout = mlm_corpus.heldout_batches(run.data, settings, run.buckets.lengths)
        with loop.Session(run, clock, state) as session:  # resumed from the newest intact checkpoint
            schedule = run.models.hyperparameters(settings, run.total_steps).schedule  # the state's own is donated
            report = loop.Report(session, schedule, keys=("loss", "accuracy"))
            hooks = [HeldOut(run, session, eval_fn, heldout), loop.Checkpoint(run, session)]
            batches = mlm_corpus.mlm_batches(run.data, settings, run.buckets.lengths, session.start_step)
            loop.run_steps(run, train_fn, session, hooks, report, batches)
            best = session.selection.best[0].best_metrics
        summary = _summary(run, session, best, train_fn, eval_fn, compile_wall, clock)
        if run.is_main:
            run.workdir.write_outputs(settings, RunOutputs(submission=None, summary=summary))
            if settings.train.plot_curves:
                plot_training_curves(run.workdir)
            print(format_summary(summary))
        return summary


def compile_programs(run: Run, clock: Stopwatch) -> tuple[MlmState, BucketedJit, BucketedJit, float]:
    """The initial state on the mesh, the train step (donated) and the held-out step, each compiled
    up front for every bucket length, side by side; and the compiles' wall seconds."""
    settings, mesh = run.settings, run.mesh
    copies = run.model.forms.weight_copies
    abstract = abstract_state(run.params, settings, run.total_steps, run.dtype, mesh, run.models, copies)
    state_sharding = jax.tree.map(lambda x: x.sharding, abstract)
    create = functools.partial(create_state, settings=settings, compute_dtype=run.dtype, copies=copies)
    create = jax.jit(create, out_shardings=state_sharding)
    state = create(run.params, run.models.hyperparameters(settings, run.total_steps))
    per_model = run.models.sharding(mesh)
    step = jax.jit(
        functools.partial(mlm_train_step, model=run.model, settings=settings),
        in_shardings=(state_sharding, distributed.batch_sharding(mesh), per_model), out_shardings=(state_sharding, per_model),
        donate_argnums=0,
    )  # fmt: skip
    train_fn = BucketedJit(step, batch_shape_key, clock)
    eval_fn = BucketedJit(jax.jit(functools.partial(mlm_eval_step, model=run.model)), batch_shape_key, clock)
    with clock.phase("compile"):
        batches = [abstract_batch(settings, n, mesh) for n in run.buckets.lengths]
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
        tasks = [(train_fn, (state, b, run.dropout_keys)) for b in batches] + [(eval_fn, (params, b)) for b in batches]
        wall = compile_concurrently(tasks)
    return state, train_fn, eval_fn, wall


class HeldOut:
    """Masked-LM loss, accuracy and perplexity of the held-out slice (the same masking at every
    evaluation), logged as the dev record of the run's one parameter set; the best step by accuracy
    checkpointed for export."""

    def __init__(self, run: Run, session: loop.Session, eval_fn: BucketedJit, batches: list[dict[str, np.ndarray]]):
        self.run, self.session, self.eval_fn, self.batches = run, session, eval_fn, batches

    def __call__(self, step: int, state: MlmState, due: loop.Cadence) -> None:
        if not due.evaluate:
            return
        with self.session.clock.phase("evaluation"):
            sums = [self.eval_fn(state.params, device) for _, device in distributed.prefetch_to_mesh(iter(self.batches), self.run.mesh)]
            totals = {key: float(sum(np.asarray(s[key], np.float64) for s in distributed.fetch(sums))) for key in ("nll", "correct", "count")}
            loss = totals["nll"] / max(totals["count"], 1.0)
            record = {"loss": loss, "accuracy": totals["correct"] / max(totals["count"], 1.0), "perplexity": math.exp(min(loss, 700.0)),
                      "predicted_tokens": int(totals["count"])}  # fmt: skip
            improved = self.session.selection.best[0].offer(step, {PARAMS_NAME: state.params}, {**record, "params": PARAMS_NAME})
            self.session.writer.write_dev(step, PARAMS_NAME, record)
            if self.run.is_main:
                self.session.progress.write(
                    f"step {step}: held-out masked-LM loss {loss:.4f} accuracy {record['accuracy']:.4f} perplexity "
                    f"{record['perplexity']:.1f}{' *best*' if improved else ''}"
                )


def _summary(run: Run, session: loop.Session, best: dict[str, Any] | None, train_fn, eval_fn, compile_wall: float, clock) -> dict[str, Any]:
    times = clock.breakdown()
    train_seconds = times.get("train loop", 0.0)
    steps = run.total_steps - session.start_step
    return {
        "task": "masked-LM pretraining",
        "best_heldout_accuracy": None if best is None else best["accuracy"],
        "best_heldout_loss": None if best is None else best["loss"],
        "best_heldout_perplexity": None if best is None else best["perplexity"],
        "best_step": None if best is None else best["step"],
        "heldout_split": run.settings.pretrain.heldout_split, "heldout_inputs": len(run.data.heldout),
        "train_inputs": len(run.data.train), "steps": run.total_steps, "resumed_from_step": session.start_step,
        "train_samples_per_second": session.examples_seen / train_seconds if train_seconds else None,
        "train_steps_per_second": steps / train_seconds if train_seconds else None,
        "bucket_lengths": list(run.buckets.lengths), "train_step_compilations": train_fn.num_compilations,
        "eval_step_compilations": eval_fn.num_compilations, "compile_wall_seconds": compile_wall,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "compute_dtype": str(jnp.dtype(run.dtype)),
        "wall_seconds": times["wall"], "seconds_by_phase": {k: v for k, v in times.items() if k != "wall"},
    }  # fmt: skip


def format_summary(summary: dict[str, Any]) -> str:
    best = summary["best_heldout_accuracy"]
    rows = [
        ("held-out", "no evaluation" if best is None else (
            f"best masked-LM accuracy {best:.4f}, loss {summary['best_heldout_loss']:.4f}, perplexity "
            f"{summary['best_heldout_perplexity']:.1f} at step {summary['best_step']} ({summary['heldout_inputs']} "
            f"{summary['heldout_split']} inputs)")),
        ("steps run", f"{summary['steps']} on {summary['train_inputs']} inputs"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("compiled programs", f"{summary['train_step_compilations']} train + {summary['eval_step_compilations']} eval for "
                              f"buckets {summary['bucket_lengths']} ({summary['compile_wall_seconds']:.1f} s wall)"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(["", "=" * 72, *(f"{name:<{width}}  {value}" for name, value in rows), "=" * 72])


if __name__ == "__main__":
    from sda_jax import commands

    commands.run_train(pretrain, command="python -m sda_jax.pretrain", summary=commands.PRETRAIN_SUMMARY, config_example="configs/afqmc_tapt.py")
