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

import io
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sda_jax import atomic_write
from sda_jax.errors import InputError, no_space
from sda_jax.workdir import Workdir

# Train scalars that depend on wall time: TensorBoard only, never metrics.jsonl.
TIMING_KEYS = ("steps_per_second",)
# Line colours of the dev panels, per parameter set.
_PARAMS_COLORS = {"student": "tab:blue", "teacher": "tab:orange", "eval_ema": "tab:green"}


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


def plot_training_curves(workdir: Workdir) -> Path:
    """Draws training_curves.png from metrics.jsonl and returns its path.

    Six panels: train loss and CE; KD (the MSE to the teacher); learning rate (and the fp16 loss
    scale when there is one); dev accuracy, F1 and loss, a line per parameter set, with the best
    accuracy marked. The lines are means over the models; a run of several models also draws each
    model faintly and each set's ensemble dashed. Panels without data say so.
    """
    from matplotlib.figure import Figure  # a figure without pyplot: no global state, no GUI backend

    records = read_metrics(workdir)
    train = _series(r for r in records if r["split"] == "train")
    dev = [r for r in records if r["split"] == "dev"]
    dev_by_params = {name: _series(r for r in dev if r["params"] == name) for name in dict.fromkeys(r["params"] for r in dev)}
    several = any(len(r.get("models", ())) > 1 for r in dev)
    per_model = {
        (name, i): _series({"step": r["step"], **m} for r in dev if r["params"] == name for m in r["models"][i : i + 1])
        for name in dev_by_params for i in range(max(len(r.get("models", ())) for r in dev)) if several
    }  # fmt: skip
    ensembles = {name: _series({"step": r["step"], **r["ensemble"]} for r in dev if r["params"] == name and "ensemble" in r)
                 for name in dev_by_params} if several else {}  # fmt: skip

    fig = Figure(figsize=(15, 8.4), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3)
    steps = train.get("step")
    last_step = int(
        max([*(steps if steps is not None else []), *(s for d in dev_by_params.values() for s in d["step"])], default=0)
    )
    fig.suptitle(f"{workdir.path.name or workdir.path}: training curves ({last_step} steps)", fontsize=14)

    ax = axes[0, 0]
    _lines(ax, train, [("loss", "total loss", "black"), ("ce", "CE", "tab:blue")])
    _decorate(ax, "Train loss (window means)", "loss", has_data="loss" in train or "ce" in train)

    ax = axes[0, 1]
    # A masked-LM pretraining run (sda_jax.pretrain) has no distillation and no F1: its masked-token
    # accuracy and held-out perplexity take those panels.
    masked_lm = any("perplexity" in r for r in dev) or ("kd" not in train and "accuracy" in train)
    if masked_lm:
        _lines(ax, train, [("accuracy", "masked-token accuracy", "tab:purple")])
        _decorate(ax, "Train masked-token accuracy", "accuracy", has_data="accuracy" in train)
    else:
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

    panels = (("accuracy", "perplexity", "loss"), ("Held-out masked-LM accuracy", "Held-out perplexity", "Held-out masked-LM loss")) \
        if masked_lm else (("accuracy", "f1", "loss"), ("Dev accuracy", "Dev F1", "Dev loss"))  # fmt: skip
    for ax, key, title in zip(axes[1], *panels, strict=True):
        for (name, _), series in per_model.items():
            if key in series:
                ax.plot(series["step"], series[key], color=_PARAMS_COLORS.get(name), alpha=0.3, linewidth=0.8)
        for name, series in dev_by_params.items():
            if key in series:
                color = _PARAMS_COLORS.get(name)
                label = f"{name} (mean of models)" if several else name
                ax.plot(series["step"], series[key], marker="o", markersize=4, label=label, color=color)
        for name, series in ensembles.items():
            if key in series:
                ax.plot(series["step"], series[key], linestyle="--", color=_PARAMS_COLORS.get(name), label=f"{name} ensemble")
        if key == "accuracy":
            _mark_best(ax, dev_by_params)
        _decorate(ax, title, key, has_data=any(key in s for s in dev_by_params.values()), empty="no dev evaluation yet")

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.set_xlim(left=0, right=max(last_step, 1) * 1.03)

    path = workdir.curves_file
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
