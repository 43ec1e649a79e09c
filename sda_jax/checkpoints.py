"""Checkpoints with orbax: the last few full train states (for resume) and the best by dev accuracy.

Train checkpoints hold the whole `TrainState` (student, teacher, eval EMA, optimizer and
Lookahead state, loss scale, step); the dropout key and the input position are functions of
(seed, step), which the JSON metadata records alongside. The best checkpoint holds the three
parameter sets and the dev metrics that made it best. Orbax writes each step into a temporary
directory and renames it when complete, so a write cut short by a kill is never picked up.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

TRAIN_DIR = "checkpoints/train"
BEST_DIR = "checkpoints/best"


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings to restore into: the current run's, whatever the saved ones."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class TrainCheckpoints:
    """The last `keep` train states; a restart in the same workdir resumes from the latest."""

    def __init__(self, workdir: pathlib.Path, keep: int):
        self._manager = ocp.CheckpointManager(
            (workdir / TRAIN_DIR).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, position: dict[str, int]) -> None:
        """Saves asynchronously; returns once the arrays are copied off the device."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position)),
            force=True,
        )

    def restore(self, step: int, like: Any) -> Any:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like)), position=ocp.args.JsonRestore()),
        )
        return restored["state"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class BestCheckpoint:
    """Saves a step only when its dev accuracy beats every earlier one; keeps that one step."""

    def __init__(self, workdir: pathlib.Path):
        self._manager = ocp.CheckpointManager(
            (workdir / BEST_DIR).resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )
        step = self._manager.latest_step()
        # A resumed run competes with the best its earlier part already saved.
        self.best_metrics: dict[str, Any] | None = (
            None if step is None else self._manager.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))["metrics"]
        )

    def offer(self, step: int, params: dict[str, Any], metrics: dict[str, Any]) -> bool:
        """Saves `params` (student, teacher, eval_ema) if `metrics["accuracy"]` is a new best."""
        if self.best_metrics is not None and metrics["accuracy"] <= self.best_metrics["accuracy"]:
            return False
        self.best_metrics = {"step": step, **metrics}
        self._manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params), metrics=ocp.args.JsonSave(self.best_metrics)),
            force=True,
        )
        return True

    def restore(self, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Loads the best step's params with the shapes, dtypes and shardings of `like`."""
        self._manager.wait_until_finished()
        restored = self._manager.restore(
            self._manager.latest_step(),
            args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like)), metrics=ocp.args.JsonRestore()),
        )
        return restored["params"], restored["metrics"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
