"""Training metrics in the forms people look at: JSON lines, TensorBoard, and a PNG of the curves.

One schema whatever the number of models (N = 1 included): each record holds the mean over the
models at its top level, and the details beside it:

    metrics.jsonl        one JSON object per line, appended:
                         {"step", "split": "train", "loss", "ce", "kd", "learning_rate", "skipped_steps"[, "loss_scale"],
                          "models": [{"loss", "ce", "kd", "skipped_steps"[, "loss_scale"]}, ...]}
                         {"step", "split": "dev", "params": "student"|"teacher"|"eval_ema", "loss", "accuracy", "f1",
                          "std": {...}, "ensemble": {...}, "models": [{"loss", "accuracy", "f1"}, ...]}
    tensorboard/         event files (tensorboardX; no TensorFlow or PyTorch needed): every number of a
                         record under its path, `train/loss`, `train/model_0/loss`, `dev/eval_ema/accuracy`,
                         `dev/eval_ema/std/accuracy`, `dev/eval_ema/ensemble/accuracy`, `dev/eval_ema/model_1/f1`;
                         and `train/steps_per_second`
    training_curves.png  `plot_training_curves(workdir)`, from metrics.jsonl

metrics.jsonl holds exactly what the caller passes, so a resumed run reproduces it byte for byte.
Wall-clock figures (`steps_per_second`) go to TensorBoard only. The file names come from `Workdir`.

In a multi-process run only process 0 writes: pass `enabled=jax.process_index() == 0`; a
disabled writer accepts every call and touches no file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sda_jax.errors import InputError, no_space
from sda_jax.workdir.layout import Workdir

# Train scalars that depend on wall time: TensorBoard only, never metrics.jsonl.
TIMING_KEYS = ("steps_per_second",)
# Line colours of the dev panels, per parameter set.


class MetricsWriter:
    """Appends train/dev records to metrics.jsonl and writes the same scalars as TensorBoard events.

    `resume_step`: the step a resumed run restarts after (its checkpoint's step). TensorBoard then
    hides what an earlier attempt logged after that step, as `Workdir.truncate_metrics` drops
    it from metrics.jsonl. `steps_per_second` of a train record is measured from the previous
    train record (or dev record, so evaluation time is not counted) unless the caller passes it.
    """

    def __init__(self, workdir: Workdir, *, enabled: bool = True, resume_step: int = 0, flush_secs: int = 30):
        self.workdir = workdir
        self.enabled = enabled
        self._log = None
        self._events = None
        self._clock: tuple[int, float] | None = None  # (step, perf_counter) of the last record
        if not enabled:
            return
        workdir.path.mkdir(parents=True, exist_ok=True)
        self._log = workdir.metrics_file.open("a", encoding="utf-8")
        summary_writer = _summary_writer_class()
        self._events = summary_writer(
            logdir=str(workdir.tensorboard_dir),
            purge_step=resume_step + 1 if resume_step > 0 else None,
            flush_secs=flush_secs,
            # tensorboardX names event files by the second and opens them with "wb": without a
            # suffix a second writer started within the same second would overwrite the first's
            # file. Nanoseconds within the second keep the names in creation order.
            filename_suffix=f".{time.time_ns() % 1_000_000_000:09d}",
        )

    def write_train(self, step: int, scalars: Mapping[str, Any], models: Sequence[Mapping[str, Any]] = ()) -> None:
        """One train record: the mean losses of a logging window over the models, the learning
        rate, counters (`scalars`), and each model's own (`models`)."""
        if not self.enabled:
            return
        step = int(step)
        values = _numbers(scalars)
        timing = {name: values.pop(name) for name in TIMING_KEYS if name in values}
        now = time.perf_counter()
        if "steps_per_second" not in timing and self._clock is not None and step > self._clock[0]:
            timing["steps_per_second"] = (step - self._clock[0]) / max(now - self._clock[1], 1e-9)
        self._clock = (step, now)
        record = {**values, **({"models": [_numbers(m) for m in models]} if models else {})}
        self._append({"step": step, "split": "train", **record})
        self._add_scalars("train", {**record, **timing}, step)

    def write_dev(self, step: int, params_name: str, record: Mapping[str, Any]) -> None:
        """One dev evaluation of a parameter set ("student", "teacher", "eval_ema"): its metrics
        (the mean over the models) and their "std", "ensemble" and per-"models" details."""
        if not self.enabled:
            return
        if not isinstance(params_name, str) or not params_name or "/" in params_name:
            raise ValueError(f"params_name must be a non-empty name without '/', got {params_name!r}")
        step = int(step)
        values = _numbers(record)
        self._append({"step": step, "split": "dev", "params": params_name, **values})
        self._add_scalars(f"dev/{params_name}", values, step)
        self._events.flush()
        self._clock = (step, time.perf_counter())  # evaluation time is not training speed

    def _add_scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for name, value in values.items():
            if isinstance(value, Mapping):
                self._add_scalars(f"{prefix}/{name}", value, step)
            elif isinstance(value, list):  # "models": one group per model
                for i, item in enumerate(value):
                    self._add_scalars(f"{prefix}/{name.removesuffix('s')}_{i}", item, step)
            else:
                self._events.add_scalar(f"{prefix}/{name}", value, step)

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        """Writes out everything pending; further writes are an error. Safe to call twice."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> MetricsWriter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _append(self, record: dict[str, Any]) -> None:
        if self._log is None:
            raise ValueError("MetricsWriter is closed")
        try:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
        except OSError as err:
            raise no_space(err, self.workdir.path, self.workdir.metrics_file.name) or err from None


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """A record's values as Python numbers, nested mappings and lists of them kept as they are."""
    out = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            out[name] = _numbers(value)
        elif isinstance(value, (list, tuple)):
            out[name] = [_numbers(v) for v in value]
        else:
            out[name] = _number(name, value)
    return out


def _number(name: str, value: Any) -> int | float:
    """A Python int or float from a Python, numpy or (0-d) JAX number."""
    try:
        item = np.asarray(value).item()
    except ValueError:
        raise TypeError(f"metric {name!r} must be a single number, got shape {np.shape(value)}") from None
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    return item


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch, if it is installed, only to recognise torch tensors. That costs
    2+ seconds and, with a CUDA build of torch, loads torch's CUDA libraries into the JAX
    process. We log Python floats only, so torch is hidden from it while it is imported.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def read_metrics(workdir: Workdir) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; InputError names the file and line of a bad one."""
    path = workdir.metrics_file
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "split" not in record:
            raise InputError(f"{path}:{lineno}: not a metrics record (needs 'step' and 'split')")
        records.append(record)
    return records
