"""Checkpoints with orbax: what a step's folder holds, written, checked and read back (folders from `Workdir`).

    checkpoints/train/<step>/state            the whole train state, every model of the model axis
    checkpoints/train/<step>/position         JSON: step, seed, epoch, batch in epoch, the models' seeds
    checkpoints/best/model_<i>/<step>/params  {name: params} of model i's best dev step's parameter sets
    checkpoints/best/model_<i>/<step>/metrics JSON: its dev metrics, step and which sets it holds
    <step>/sda_jax_manifest.json              every file of the step with its size and CRC-32

Train checkpoints hold the whole `TrainState` (student, teacher, eval EMA, optimizer and
Lookahead state, schedule, loss scale, step; in 16 bits also the weight copies the products
read); the dropout keys and the input position are functions of the seeds and the step, which
the JSON records alongside. A best checkpoint holds
every parameter set of its model that is one model (the vote teacher is not: see `averaging`).

Orbax writes each step into a temporary folder and renames it when complete, so a write cut short
by a kill is never picked up. Once a step's write has finished (orbax writes in the background; it
is waited for at the next save and at the end), process 0 records a manifest of its files: a file
cut short, missing or with a flipped byte is found before the step is read (`damage`). A restart
then sets a damaged train checkpoint aside in checkpoints/damaged/ (never deletes it) and resumes
from the newest intact one; a damaged best checkpoint is a one-line error naming its folder. A
write that fails for lack of space is a `NoSpaceError` naming the folder; the steps written before
stay intact. Training, export and the tests read checkpoints through this module.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sda_jax.errors import InputError, no_space
from sda_jax.workdir import atomic_write

MANIFEST = "sda_jax_manifest.json"
_CHUNK = 16 << 20


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings to restore into: the current run's, whatever the saved ones."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _crc(path: pathlib.Path) -> int:
    crc = 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: pathlib.Path) -> None:
    """Records every file of a finished step with its size and CRC-32 (process 0 only)."""
    if jax.process_index() != 0 or not step_dir.is_dir():
        return
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc(p)] for p in _files(step_dir)}
    atomic_write.write_text(step_dir / MANIFEST, json.dumps(files, indent=1) + "\n")


def damage(step_dir: pathlib.Path) -> str | None:
    """Why a step's folder is not what its manifest says (a file missing, cut short, changed), or
    None if it is (or it has no manifest: a run killed before it wrote one; orbax's rename still
    guarantees the write finished)."""
    manifest = step_dir / MANIFEST
    if not step_dir.is_dir():
        return "its folder is gone"
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"unreadable manifest: {err}"
    for name, (size, crc) in recorded.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of its {size} bytes"
        if _crc(path) != crc:
            return f"{name} does not match its checksum"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _barriers_of(folder: pathlib.Path) -> ocp.options.MultiprocessingOptions:
    """Barrier names of their own for the manager of `folder`, the same on every host.

    Orbax names a save's cross-process barriers by the step alone (`_async_write_complete.12`), so
    two managers saving the same step at once (the train checkpoint and a best checkpoint at an
    evaluation step) met in each other's barriers when several processes ran: a hang or a timeout
    at the end of the run. The folder's last two names (`checkpoints.train`, `best.model_0`) tell
    the managers of a run apart and, unlike the full path, do not depend on where a host mounts
    the workdir.
    """
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"{folder.parent.name}.{folder.name}")


class _Checkpoints:
    """An orbax manager of one folder whose writes end in a manifest and a clear no-space error."""

    def __init__(self, folder: pathlib.Path, keep: int):
        self.folder = folder.resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, multiprocessing_options=_barriers_of(self.folder))
        self._manager = ocp.CheckpointManager(self.folder, options=options)
        self._unrecorded: list[int] = []  # steps saved whose manifest is not written yet

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _save(self, step: int, args: ocp.args.Composite) -> None:
        self.finish()
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as err:
            raise no_space(err, self.folder, f"its step {step}") or err from None
        self._unrecorded.append(step)

    def finish(self) -> None:
        """Waits for the write in the background; records the manifests of the steps it finished."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            steps = ", ".join(map(str, self._unrecorded)) or "a step"
            raise no_space(err, self.folder, f"its step {steps}") or err from None
        for step in self._unrecorded:
            write_manifest(self.folder / str(step))
        self._unrecorded = []

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self._manager.close()


class TrainCheckpoints(_Checkpoints):
    """The last `keep` train states; a restart in the same workdir resumes from the newest intact one."""

    def save(self, step: int, state: Any, position: dict[str, Any]) -> None:
        """Saves in the background; returns once the arrays are copied off the device."""
        self._save(step, ocp.args.Composite(state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position)))

    def restore(self, step: int, like: Any) -> Any:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like)), position=ocp.args.JsonRestore()),
        )
        return restored["state"]

    def restore_newest_intact(self, like: Any, damaged_folder: pathlib.Path, name) -> tuple[int, Any] | None:
        """(step, state) of the newest train checkpoint that is whole, or None when there is none.

        Each damaged one (its manifest says so, or orbax cannot read it) is moved into
        `damaged_folder` and named in one line (`name(path)` is how a message names a path):
        `checkpoints/train/30: damaged (...); resuming from 20`. InputError if there were
        checkpoints and all of them are damaged.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            reason = damage(self.folder / str(step))
            if reason is None:
                try:
                    state = self.restore(step, like)
                except Exception as err:  # TensorStore, orbax: the files do not read as a checkpoint
                    reason = _first_line(err)
                else:
                    self._report(damaged, f"resuming from {step}", name)
                    return step, state
            damaged.append((step, self._set_aside(step, reason, damaged_folder)))
        if damaged:
            self._report(damaged, "no intact train checkpoint is left", name)
            raise InputError(
                f"{name(self.folder)}: every train checkpoint is damaged (moved to {name(damaged_folder)}); "
                "rerun with --fresh to start from step 0"
            )
        return None

    def _set_aside(self, step: int, reason: str, damaged_folder: pathlib.Path) -> str:
        if jax.process_index() == 0:
            damaged_folder.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.folder / str(step)), damaged_folder / f"train-{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        self._manager.reload()
        return reason

    def _report(self, damaged: list[tuple[int, str]], outcome: str, name) -> None:
        if jax.process_index() == 0:
            for step, reason in damaged:
                print(f"{name(self.folder / str(step))}: damaged ({reason}); {outcome}")


class BestCheckpoint(_Checkpoints):
    """Saves a step only when its dev accuracy beats every earlier one; keeps that one step."""

    def __init__(self, folder: pathlib.Path):
        super().__init__(folder, keep=1)
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
        self._save(step, ocp.args.Composite(params=ocp.args.StandardSave(param_sets), metrics=ocp.args.JsonSave(self.best_metrics)))
        return True

    def restore(self, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Loads the best step's parameter sets with the shapes, dtypes and shardings of `like`;
        InputError naming the folder if it is damaged."""
        self.finish()
        step = self._manager.latest_step()
        reason = damage(self.folder / str(step))
        if reason is None:
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like)), metrics=ocp.args.JsonRestore()),
                )
                return restored["params"], restored["metrics"]
            except Exception as err:  # noqa: BLE001 (whatever orbax or TensorStore raise on a broken checkpoint)
                reason = _first_line(err)
        raise InputError(f"{self.folder / str(step)}: the best checkpoint is damaged ({reason})")


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
        reason = damage(folder / str(step))
        if reason is not None:
            raise InputError(f"{folder / str(step)}: the best checkpoint is damaged ({reason})")
        try:
            metrics = {"step": step, **_read_metrics(manager, step)}
        except (OSError, ValueError) as err:
            raise InputError(f"{folder / str(step)}: the best checkpoint is damaged ({_first_line(err)})") from None
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
    except (ValueError, KeyError, OSError) as err:  # another architecture than the run's, or broken files
        raise InputError(f"{folder / str(step)}: cannot restore its {name} parameters: {_first_line(err)}") from None
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
    metadata = checkpointer.metadata(path)
    # orbax-checkpoint 0.12 wraps the tree's metadata in the step's (`item_metadata`), 0.11 returns it
    # itself; its `tree` is the nested dict.
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    # jax 0.12 deprecates SingleDeviceSharding: a replicated NamedSharding over one device instead.
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("one",))
    sharding = jax.sharding.NamedSharding(one_device, jax.sharding.PartitionSpec())
    state = checkpointer.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree))
    return jax.tree.map(np.asarray, state)
