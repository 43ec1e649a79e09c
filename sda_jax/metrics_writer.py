"""Training metrics in the forms people look at: JSON lines, TensorBoard, and a PNG of the curves.

    workdir/metrics.jsonl        one JSON object per line, appended:
                                 {"step", "split": "train", "loss", "ce", "kd", "learning_rate", "skipped_steps"[, "loss_scale"]}
                                 {"step", "split": "dev", "params": "student"|"teacher"|"eval_ema", "loss", "accuracy", "f1"}
    workdir/tensorboard/         event files (tensorboardX; no TensorFlow or PyTorch needed):
                                 train/<name> for every train scalar, train/steps_per_second,
                                 dev/<params>/<name> for every dev scalar
    workdir/training_curves.png  `plot_training_curves(workdir)`, from metrics.jsonl

metrics.jsonl holds exactly what the caller passes, so a resumed run reproduces it byte for byte.
Wall-clock figures (`steps_per_second`) go to TensorBoard only.

In a multi-process run only process 0 writes: pass `enabled=jax.process_index() == 0`; a
disabled writer accepts every call and touches no file.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sda_jax import atomic_write
from sda_jax.errors import InputError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "training_curves.png"
# Train scalars that depend on wall time: TensorBoard only, never metrics.jsonl.
TIMING_KEYS = ("steps_per_second",)
# Line colours of the dev panels, per parameter set.
_PARAMS_COLORS = {"student": "tab:blue", "teacher": "tab:orange", "eval_ema": "tab:green", "ensemble": "black"}


class MetricsWriter:
    """Appends train/dev records to metrics.jsonl and writes the same scalars as TensorBoard events.

    `resume_step`: the step a resumed run restarts after (its checkpoint's step). TensorBoard then
    hides what an earlier attempt logged after that step, as `run_record.truncate_metrics` drops
    it from metrics.jsonl. `steps_per_second` of a train record is measured from the previous
    train record (or dev record, so evaluation time is not counted) unless the caller passes it.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True, resume_step: int = 0, flush_secs: int = 30):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._log = None
        self._events = None
        self._clock: tuple[int, float] | None = None  # (step, perf_counter) of the last record
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = (self.workdir / METRICS_FILE).open("a", encoding="utf-8")
        summary_writer = _summary_writer_class()
        self._events = summary_writer(
            logdir=str(self.workdir / TENSORBOARD_DIR),
            purge_step=resume_step + 1 if resume_step > 0 else None,
            flush_secs=flush_secs,
            # tensorboardX names event files by the second and opens them with "wb": without a
            # suffix a second writer started within the same second would overwrite the first's
            # file. Nanoseconds within the second keep the names in creation order.
            filename_suffix=f".{time.time_ns() % 1_000_000_000:09d}",
        )

    def write_train(self, step: int, scalars: Mapping[str, Any], seed: int | None = None) -> None:
        """One train record: the mean losses of a logging window, learning rate, counters; of one
        seed of a run of several when `seed` is given (the record without one is their mean)."""
        if not self.enabled:
            return
        step = int(step)
        values = {name: _number(name, value) for name, value in scalars.items()}
        if seed is not None:
            self._append({"step": step, "split": "train", "seed": seed, **values})
            for name, value in values.items():
                self._events.add_scalar(f"train/seed_{seed}/{name}", value, step)
            return
        timing = {name: values.pop(name) for name in TIMING_KEYS if name in values}
        now = time.perf_counter()
        if "steps_per_second" not in timing and self._clock is not None and step > self._clock[0]:
            timing["steps_per_second"] = (step - self._clock[0]) / max(now - self._clock[1], 1e-9)
        self._clock = (step, now)
        self._append({"step": step, "split": "train", **values})
        for name, value in {**values, **timing}.items():
            self._events.add_scalar(f"train/{name}", value, step)

    def write_dev(self, step: int, params_name: str, scalars: Mapping[str, Any], seed: int | str | None = None) -> None:
        """One dev evaluation of a parameter set ("student", "teacher", "eval_ema"; "ensemble" for
        the seeds' mean logits), of one seed (or their "mean" / "std") in a run of several."""
        if not self.enabled:
            return
        if not isinstance(params_name, str) or not params_name or "/" in params_name:
            raise ValueError(f"params_name must be a non-empty name without '/', got {params_name!r}")
        step = int(step)
        values = {name: _number(name, value) for name, value in scalars.items()}
        where = {} if seed is None else {"seed": seed}
        self._append({"step": step, "split": "dev", "params": params_name, **where, **values})
        tag = params_name if seed is None else f"{params_name}/seed_{seed}"
        for name, value in values.items():
            self._events.add_scalar(f"dev/{tag}/{name}", value, step)
        self._events.flush()
        self._clock = (step, time.perf_counter())  # evaluation time is not training speed

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
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()


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


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of workdir/metrics.jsonl; InputError names the file and line of a bad one."""
    path = Path(workdir) / METRICS_FILE
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


def plot_training_curves(workdir: str | Path) -> Path:
    """Draws workdir/training_curves.png from metrics.jsonl and returns its path.

    Six panels: train loss and CE; KD (the MSE to the teacher); learning rate (and the fp16 loss
    scale when there is one); dev accuracy, F1 and loss, a line per parameter set, with the best
    accuracy marked. A run of several seeds draws each seed's scored set faintly, their mean
    boldly and the ensemble's line; train panels show the mean over seeds. Panels without data
    say so.
    """
    from matplotlib.figure import Figure  # a figure without pyplot: no global state, no GUI backend

    workdir = Path(workdir)
    records = read_metrics(workdir)
    train = _series(r for r in records if r["split"] == "train" and "seed" not in r)
    dev = [r for r in records if r["split"] == "dev"]
    dev_by_params: dict[str, dict[str, np.ndarray]] = {}  # the lines of the dev panels
    for name in dict.fromkeys(r.get("params", "?") for r in dev if "seed" not in r):
        dev_by_params[name] = _series(r for r in dev if r.get("params", "?") == name and "seed" not in r)
    for name in dict.fromkeys(r["params"] for r in dev if r.get("seed") == "mean"):
        dev_by_params[f"{name} (mean of seeds)"] = _series(r for r in dev if r["params"] == name and r.get("seed") == "mean")
    per_seed = {
        f"{r['params']} seed {r['seed']}": _series(x for x in dev if x["params"] == r["params"] and x.get("seed") == r["seed"])
        for r in dev
        if isinstance(r.get("seed"), int) and any(m.get("seed") == "mean" and m["params"] == r["params"] for m in dev)
    }

    fig = Figure(figsize=(15, 8.4), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3)
    steps = train.get("step")
    last_step = int(
        max([*(steps if steps is not None else []), *(s for d in dev_by_params.values() for s in d["step"])], default=0)
    )
    fig.suptitle(f"{workdir.name or workdir}: training curves ({last_step} steps)", fontsize=14)

    ax = axes[0, 0]
    _lines(ax, train, [("loss", "total loss", "black"), ("ce", "CE", "tab:blue")])
    _decorate(ax, "Train loss (window means)", "loss", has_data="loss" in train or "ce" in train)

    ax = axes[0, 1]
    _lines(ax, train, [("kd", "KD = MSE(student, teacher logits)", "tab:purple")])
    _decorate(ax, "Train distillation term", "KD", has_data="kd" in train)

    ax = axes[0, 2]
    # No legend here (it would hide the curves): the axis labels carry the line colours.
    _lines(ax, train, [("learning_rate", "learning rate", "tab:red")])
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    title = "Learning rate"
    if "loss_scale" in train:
        scale_ax = ax.twinx()
        _lines(scale_ax, train, [("loss_scale", "fp16 loss scale", "tab:gray")], linestyle="--")
        scale_ax.set_yscale("log", base=2)
        scale_ax.set_ylabel("fp16 loss scale (dashed)", color="tab:gray")
        title = "Learning rate and fp16 loss scale"
    _decorate(ax, title, "learning rate", has_data="learning_rate" in train, legend=False)
    ax.yaxis.label.set_color("tab:red")

    for ax, key, title in zip(axes[1], ("accuracy", "f1", "loss"), ("Dev accuracy", "Dev F1", "Dev loss"), strict=True):
        for series in per_seed.values():
            if key in series:
                ax.plot(series["step"], series[key], color="tab:gray", alpha=0.35, linewidth=0.8)
        for name, series in dev_by_params.items():
            if key in series:
                color = _PARAMS_COLORS.get(name)
                ax.plot(series["step"], series[key], marker="o", markersize=4, label=name, color=color)
        if key == "accuracy":
            _mark_best(ax, dev_by_params)
        _decorate(ax, title, key, has_data=any(key in s for s in dev_by_params.values()), empty="no dev evaluation yet")

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.set_xlim(left=0, right=max(last_step, 1) * 1.03)

    path = workdir / CURVES_FILE
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write.write_bytes(path, png.getvalue())
    return path


def _series(records) -> dict[str, np.ndarray]:
    """Columns of records sorted by step; for a repeated step the last record wins. NaN where a
    record lacks a key that others have."""
    by_step = {r["step"]: r for r in records}
    rows = [by_step[step] for step in sorted(by_step)]
    if not rows:
        return {}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("split", "params")]
    columns = {}
    for key in keys:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None):
            columns[key] = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    return columns


def _lines(ax, series: dict[str, np.ndarray], specs, linestyle: str = "-") -> None:
    for key, label, color in specs:
        if key in series:
            marker = "o" if len(series["step"]) < 3 else None
            ax.plot(
                series["step"], series[key], label=label, color=color, linestyle=linestyle, marker=marker, linewidth=1.4
            )


def _mark_best(ax, dev_by_params: dict[str, dict[str, np.ndarray]]) -> None:
    best = None
    for name, series in dev_by_params.items():
        if "accuracy" in series and np.any(np.isfinite(series["accuracy"])):
            i = int(np.nanargmax(series["accuracy"]))
            if best is None or series["accuracy"][i] > best[1]:
                best = (series["step"][i], series["accuracy"][i], name)
    if best is not None:
        step, accuracy, name = best
        label = f"best {accuracy:.4f} @ {int(step)} ({name})"
        ax.plot([step], [accuracy], marker="*", markersize=16, color="gold", markeredgecolor="black", linestyle="none",
                label=label, clip_on=False, zorder=5)  # fmt: skip


def _decorate(ax, title: str, ylabel: str, *, has_data: bool, empty: str = "no data", legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if has_data and legend:
        ax.legend(loc="best", fontsize=8)
    elif not has_data:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="gray", fontsize=12)
