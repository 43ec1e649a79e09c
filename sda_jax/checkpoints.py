"""Checkpoints with orbax: what a step's folder holds, written and read back (folders from `Workdir`).

    checkpoints/train/<step>/state            the whole train state, every model of the model axis
    checkpoints/train/<step>/position         JSON: step, seed, epoch, batch in epoch, the models' seeds
    checkpoints/best/model_<i>/<step>/params  {name: params} of model i's best dev step's parameter sets
    checkpoints/best/model_<i>/<step>/metrics JSON: its dev metrics, step and which sets it holds

Train checkpoints hold the whole `TrainState` (student, teacher, eval EMA, optimizer and
Lookahead state, schedule, loss scale, step); the dropout keys and the input position are
functions of the seeds and the step, which the JSON records alongside. A best checkpoint holds
every parameter set of its model that is one model (the vote teacher is not: see `averaging`).
Orbax writes each step into a temporary folder and renames it when complete, so a write cut short
by a kill is never picked up. Training, export and the tests all read checkpoints through here.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sda_jax.errors import InputError


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings to restore into: the current run's, whatever the saved ones."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class TrainCheckpoints:
    """The last `keep` train states; a restart in the same workdir resumes from the latest."""

    def __init__(self, folder: pathlib.Path, keep: int):
        self._manager = ocp.CheckpointManager(
            folder.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, position: dict[str, Any]) -> None:
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

    def __init__(self, folder: pathlib.Path):
        self._manager = ocp.CheckpointManager(
            folder.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )
        step = self._manager.latest_step()
        # A resumed run competes with the best its earlier part already saved.
        self.best_metrics: dict[str, Any] | None = None if step is None else _read_metrics(self._manager, step)

    def improves(self, accuracy: float) -> bool:
        return self.best_metrics is None or accuracy > self.best_metrics["accuracy"]

    def offer(self, step: int, param_sets: dict[str, Any], metrics: dict[str, Any]) -> bool:
        """Saves `param_sets` ({name: params}) if `metrics["accuracy"]` is a new best."""
        if not self.improves(metrics["accuracy"]):
            return False
        self.best_metrics = {"step": step, **metrics, "param_sets": sorted(param_sets)}
        self._manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(param_sets), metrics=ocp.args.JsonSave(self.best_metrics)),
            force=True,
        )
        return True

    def restore(self, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Loads the best step's parameter sets with the shapes, dtypes and shardings of `like`."""
        self._manager.wait_until_finished()
        restored = self._manager.restore(
            self._manager.latest_step(),
            args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like)), metrics=ocp.args.JsonRestore()),
        )
        return restored["params"], restored["metrics"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _read_metrics(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return dict(manager.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))["metrics"])


def has_best(folder: pathlib.Path) -> bool:
    """Whether `folder` holds a complete best checkpoint (a cheap look at folder names only).

    Orbax names a finished step's folder by its number; unfinished writes carry a tmp suffix.
    """
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def restore_best_params(folder: pathlib.Path, name: str, like: Any) -> tuple[Any, dict[str, Any]]:
    """One parameter set of the best checkpoint in `folder`, as host numpy arrays shaped as
    `like`, and its metrics.

    Only that set is read from disk, whatever devices the run used. InputError if there is no
    complete best checkpoint, it lacks the set, or the set does not fit `like`.
    """
    folder = folder.resolve()
    manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = manager.latest_step()
        if step is None:
            raise InputError(f"{folder}: no complete best checkpoint")
        metrics = {"step": step, **_read_metrics(manager, step)}
    finally:
        manager.close()
    if name not in metrics.get("param_sets", (name,)):
        raise InputError(f"{folder / str(step)}: holds no {name} parameters (it has {', '.join(metrics['param_sets'])})")
    # The params item was written by StandardSave, a PyTree checkpoint: reading it with the PyTree
    # handler allows a partial restore, and RestoreArgs(np.ndarray) gives host arrays.
    request = {name: like}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), request)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                folder / str(step) / "params",
                args=ocp.args.PyTreeRestore(item=request, restore_args=restore_args, partial_restore=True),
            )
    except (ValueError, KeyError, FileNotFoundError) as err:  # e.g. another architecture than the run's
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{folder / str(step)}: cannot restore its {name} parameters: {first}") from None
    params = restored[name]
    # A key missing on disk stays a ShapeDtypeStruct under partial_restore.
    if not all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params)) or (
        jax.tree.map(np.shape, params) != jax.tree.map(np.shape, like)
    ):
        raise InputError(f"{folder / str(step)}: its {name} parameters do not fit the run's architecture")
    return params, metrics


def read_train_state(folder: pathlib.Path, step: int) -> dict[str, Any]:
    """A train checkpoint of `folder` (`Workdir.train_checkpoints`) as nested dicts of numpy arrays
    (the state's fields by name), whatever process or device count saved it; needs no train state
    to restore into."""
    path = (folder / str(step) / "state").resolve()
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path).item_metadata
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = checkpointer.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree))
    return jax.tree.map(np.asarray, state)
