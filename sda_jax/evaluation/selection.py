"""Model selection: which parameter sets a run scores on dev, and which step of each model it keeps.

* The run's parameter sets (`param_sets`): the evaluation EMA (the student itself while the run
  keeps none), the student and the teacher. Dev evaluation scores the eval EMA once it has
  started, else the student (as the reference), and with `train.eval_all_params` the others too.
* Each model keeps its own best step, by the dev accuracy of its scored set, in its own best
  checkpoint (`checkpoints.BestCheckpoint`), holding its sets that are one model each.
* Test predictions come from the models' best eval EMAs: their ensemble (the mean of their logits),
  which for one model is that model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sda_jax.config import Settings
from sda_jax.evaluation.evaluate import Scores
from sda_jax.step import sda
from sda_jax.step.model_axis import Models
from sda_jax.workdir.checkpoints import BestCheckpoint
from sda_jax.workdir.layout import Workdir

Params = Any


def param_sets(state: Any) -> dict[str, sda.Average]:
    """The run's parameter sets by the names logs, checkpoints and export use."""
    eval_ema = sda.Current(state.params) if state.eval_ema is None else state.eval_ema
    return {"eval_ema": eval_ema, "student": sda.Current(state.params), "teacher": state.teacher}


def scored_names(settings: Settings, step: int) -> list[str]:
    """The sets dev evaluation scores, the one that counts for "best" first: the eval EMA once it
    has started, else the student; all three with `train.eval_all_params`."""
    scored = "eval_ema" if step > settings.sda.eval_ema_start_step else "student"
    others = sorted({"eval_ema", "student", "teacher"} - {scored}) if settings.train.eval_all_params else []
    return [scored, *others]


def scored_averages(state: Any, names: list[str]) -> tuple[list[str], tuple[sda.Average, ...], dict[str, str]]:
    """What scoring the named sets of `state` computes: (the sets computed, as plain averages for
    the eval programs, {set: the computed set whose scores it takes}). An eval EMA the run does not
    keep is the student itself, scored once."""
    same_as = {"eval_ema": "student"} if state.eval_ema is None else {}
    computed = list(dict.fromkeys(same_as.get(name, name) for name in names))
    sets = param_sets(state)
    return computed, tuple(sda.plain(sets[name]) for name in computed), same_as


def compiled_groups(state: Any, settings: Settings) -> tuple[tuple[sda.Average, ...], tuple[sda.Average, ...]]:
    """The plain averages whose structure the run's eval programs are compiled for, up front: what
    dev evaluation scores (as at step 1) and what prediction scores (the best eval EMA)."""
    _, dev, _ = scored_averages(state, scored_names(settings, step=1))
    return dev, (sda.plain(param_sets(state)["eval_ema"]),)


def one_model_sets(state: Any) -> dict[str, Params]:
    """The sets that are one model each (all but a vote teacher), stacked over the models."""
    sets = {name: average.one_model() for name, average in param_sets(state).items()}
    return {name: params for name, params in sets.items() if params is not None}


@dataclasses.dataclass
class Selection:
    """The best checkpoint of each model of the run."""

    workdir: Workdir
    models: Models

    def __post_init__(self) -> None:
        self.best = [BestCheckpoint(self.workdir.best_checkpoint(i)) for i in range(self.models.count)]

    def close(self) -> None:
        for best in self.best:
            best.close()

    def keep(self, step: int, scored: str, scores: Scores, state: Any) -> list[bool]:
        """Checkpoints each model whose scored set's dev accuracy is a new best; returns which did."""
        improved = [best.improves(metrics["accuracy"]) for best, metrics in zip(self.best, scores.models, strict=True)]
        if any(improved):
            sets = one_model_sets(state)  # formed only when a step is kept (a window teacher's mean costs a pass)
            for i, best in enumerate(self.best):
                if improved[i]:
                    best.offer(step, self.models.take(sets, i), {**scores.models[i], "params": scored})
        return improved

    def restore(self, state: Any) -> tuple[dict[str, Params], list[dict[str, Any]]]:
        """Each model's best parameter sets stacked over the models, placed as the live state's
        sets are (so that prediction runs the programs compiled for them), and each model's best
        metrics."""
        like = one_model_sets(state)
        restored = [best.restore(self.models.take(like, i)) for i, best in enumerate(self.best)]
        stacked = self.models.stack([params for params, _ in restored])
        placed = jax.tree.map(lambda x, live: jax.device_put(x, live.sharding), stacked, like)
        return placed, [metrics for _, metrics in restored]
