"""The best checkpoint by dev accuracy, kept with orbax-checkpoint.

It holds the three parameter sets of a run (student, SDA teacher, eval EMA) and the dev metrics
that made it the best, so prediction and export can pick any of the three later. Orbax writes to
a temporary directory and renames it when complete, so a half-written checkpoint is never found.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

BEST_DIR = "checkpoints/best"


class BestCheckpoint:
    """Saves a step only when its dev accuracy beats every earlier one; keeps that one step."""

    def __init__(self, workdir: pathlib.Path):
        self._manager = ocp.CheckpointManager(
            (workdir / BEST_DIR).resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )
        self.best_metrics: dict[str, Any] | None = None

    def offer(self, step: int, params: dict[str, Any], metrics: dict[str, Any]) -> bool:
        """Saves `params` (student, teacher, eval_ema) if `metrics["accuracy"]` is a new best."""
        if self.best_metrics is not None and metrics["accuracy"] <= self.best_metrics["accuracy"]:
            return False
        self.best_metrics = {"step": step, **metrics}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), metrics=ocp.args.JsonSave(self.best_metrics)
            ),
        )
        return True

    def restore(self, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Loads the best step's params with the shapes, dtypes and shardings of `like`."""
        self._manager.wait_until_finished()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        restored = self._manager.restore(
            self._manager.latest_step(),
            args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract), metrics=ocp.args.JsonRestore()),
        )
        return restored["params"], restored["metrics"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
