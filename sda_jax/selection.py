"""Model selection: what a run scores on dev, which step's parameters it keeps, what it predicts with.

* Dev evaluation scores the run's parameter sets (`param_sets`): the evaluation EMA once it has
  started, else the student (as the reference), and with `train.eval_all_params` the other
  sets too, all in one pass (`evaluate.EvalPrograms`).
* The best step by dev accuracy of the scored set is checkpointed (`checkpoints.BestCheckpoint`).
* A run of several seeds (`train.seeds`) has a leading seed axis on every state leaf: each seed
  is scored and keeps its own best step by its own accuracy; the log also gets the mean and
  standard deviation over seeds, and the ensemble (the mean of the seeds' logits).
* Test predictions come from the best eval EMA, of every seed averaged into an ensemble when
  there are several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sda_jax import averaging, evaluate, run_summary
from sda_jax.checkpoints import BestCheckpoint
from sda_jax.settings import Settings

Params = Any
ENSEMBLE = "ensemble"  # the `params` name of the seeds' ensemble in logs


def param_sets(state: Any) -> dict[str, averaging.Average]:
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


def scored_sets(sets: dict[str, averaging.Average], settings: Settings, step: int) -> dict[str, averaging.Average]:
    """The sets dev evaluation scores, the one that counts for "best" first: the eval EMA once it
    has started, else the student (as the reference); all three with `train.eval_all_params`."""
    scored = "eval_ema" if step > settings.sda.eval_ema_start_step else "student"
    others = sorted(set(sets) - {scored}) if settings.train.eval_all_params else []
    return {name: sets[name] for name in (scored, *others)}


def prediction_sets(eval_ema: Params) -> dict[str, averaging.Average]:
    """What test prediction runs: the best eval EMA alone (seed-stacked with several seeds)."""
    return {"eval_ema": averaging.Current(eval_ema)}


def take_seed(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda x: x[index], tree)


@dataclasses.dataclass
class Selection:
    """The best checkpoints of a run: one, or one per seed (`seeds` non-empty: a seed-stacked state)."""

    workdir: pathlib.Path
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        self.best = [BestCheckpoint(self.workdir, seed) for seed in self.seeds] or [BestCheckpoint(self.workdir)]

    def close(self) -> None:
        for best in self.best:
            best.close()

    def evaluate(self, state: Any, step: int, settings: Settings, programs: evaluate.EvalPrograms, dev: Any, writer, progress) -> None:
        """Scores the run's parameter sets on dev, logs them, and checkpoints each seed's best step."""
        sets = scored_sets(param_sets(state), settings, step)
        scored = next(iter(sets))
        logits = programs.logits(sets, dev)  # {name: [seeds, examples, classes]}
        per_seed = [{name: evaluate.dev_metrics(logits[name][i], dev.labels) for name in sets} for i in range(len(self.best))]
        models = None  # the parameter sets to checkpoint: gathered (and sliced per seed) only when kept
        improved = []
        for i, results in enumerate(per_seed):
            seed = self.seeds[i] if self.seeds else None
            for name, metrics in results.items():  # the scored set first
                writer.write_dev(step, name, metrics, seed=seed)
            improved.append(self.best[i].improves(results[scored]["accuracy"]))
            if improved[-1]:
                models = single_models(param_sets(state)) if models is None else models
                kept = models if seed is None else take_seed(models, i)
                self.best[i].offer(step, kept, {**results[scored], "params": scored})
        if not writer.enabled:
            return  # only process 0 writes and prints
        if not self.seeds:
            progress.write(run_summary.dev_line(step, per_seed[0][scored], scored, improved[0]))
            return
        mean, std = evaluate.seed_summary([results[scored] for results in per_seed])
        ensemble = evaluate.dev_metrics(logits[scored].mean(axis=0), dev.labels)
        writer.write_dev(step, scored, mean, seed="mean")
        writer.write_dev(step, scored, std, seed="std")
        writer.write_dev(step, ENSEMBLE, ensemble)
        progress.write(run_summary.seeds_dev_line(step, mean, std, ensemble, scored, sum(improved)))

    def restore_best(self, state: Any) -> tuple[dict[str, Params], list[dict[str, Any]]]:
        """The best parameter sets (seed-stacked with several seeds) and each seed's best metrics."""
        like = single_models(param_sets(state))
        if not self.seeds:
            params, metrics = self.best[0].restore(like)
            return params, [metrics]
        restored = [best.restore(take_seed(like, i)) for i, best in enumerate(self.best)]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(params for params, _ in restored))
        # Placed as the live state's sets are, so that prediction runs the programs compiled for them.
        stacked = jax.tree.map(lambda x, live: jax.device_put(x, live.sharding), stacked, like)
        return stacked, [metrics for _, metrics in restored]

    def predict(self, best_params: dict[str, Params], programs: evaluate.EvalPrograms, encoded: Any) -> np.ndarray:
        """Logits [seeds, examples, classes] of each seed's best eval EMA on `encoded`."""
        return programs.logits(prediction_sets(best_params["eval_ema"]), encoded)["eval_ema"]


def write_predictions(path: pathlib.Path, test_logits: np.ndarray, seeds: tuple[int, ...], settings: Settings, test: Any) -> None:
    """The submission: from the ensemble of the seeds' best (the mean of their logits) when there
    are several, and, with `train.per_seed_predictions`, each seed's beside it."""
    label = lambda logits: evaluate.argmax_labels(logits, settings.data.label_names)
    evaluate.write_predictions(path, test.ids, label(test_logits.mean(axis=0)))
    if seeds and settings.train.per_seed_predictions:
        for seed, logits in zip(seeds, test_logits, strict=True):
            evaluate.write_predictions(path.with_name(f"{path.stem}.seed{seed}{path.suffix}"), test.ids, label(logits))
