"""training_curves.png: the run's loss, learning rate and dev metrics drawn from metrics.jsonl (matplotlib)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from sda_jax.workdir import atomic_write
from sda_jax.workdir.layout import Workdir
from sda_jax.workdir.metrics_log import read_metrics

_PARAMS_COLORS = {"student": "tab:blue", "teacher": "tab:orange", "eval_ema": "tab:green"}


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
