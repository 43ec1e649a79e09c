"""Evaluation and prediction: every parameter set of a run scored in one pass, dev metrics, the submission file.

The parameter sets (eval EMA, student, teacher; see `averaging`) are stacked along a leading
axis once per evaluation (`stack_param_sets`), and `eval_step` runs the model over that axis in
one program, so an evaluation is one pass over the dev set however many sets it scores; a vote
teacher contributes its K snapshots, whose mean logits are its logits. Examples are visited by
length, in the train step's batch shapes, and every example is scored exactly once: batches are
padded with zero-weight rows that are dropped again on the host.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sda_jax import atomic_write
from sda_jax.averaging import Average
from sda_jax.bucketed_jit import BucketedJit


@dataclasses.dataclass(frozen=True)
class StackedSets:
    """Named parameter averages as one stack on the device: set `name` owns members spans[name]."""

    members: Any  # params with a leading axis: every distinct member once
    spans: dict[str, tuple[int, int]]  # name -> [start, stop) along that axis


def stack_members(singles: Sequence[Any], ensembles: Sequence[Any]) -> Any:
    """Parameter sets concatenated along a new leading axis (jit it: it copies each set once).

    `singles` are one model's params each; `ensembles` are members already stacked [m, ...]
    (a vote teacher's snapshots). Singles come first.
    """
    leading = [jax.tree.map(lambda p: p[None], single) for single in singles] + list(ensembles)
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *leading)


def set_parts(sets: Mapping[str, Average]) -> tuple[dict[str, tuple[int, int]], list[Any], list[Any]]:
    """(spans, singles, ensembles) of `sets` as `stack_members` takes them.

    One model per set goes in as plain params, so the stacking program depends on the parameter
    shapes and on how many sets of each kind there are, not on the kind of average: a restored
    best checkpoint stacks with the same program as the live state. Sets that are the very same
    parameters (the student, and an eval EMA that has not started) share one member.
    """
    spans: dict[str, tuple[int, int]] = {}
    singles: list[Any] = []
    slot_of: dict[int, int] = {}
    for name in sorted(sets):
        if not sets[name].is_ensemble:
            params = sets[name].single_params()
            slot = slot_of.setdefault(id(params), len(singles))
            if slot == len(singles):
                singles.append(params)
            spans[name] = (slot, slot + 1)
    ensembles, start = [], len(singles)
    for name in sorted(sets):
        if sets[name].is_ensemble:
            ensembles.append(sets[name].members())
            stop = start + jax.tree.leaves(ensembles[-1])[0].shape[0]
            spans[name], start = (start, stop), stop
    return spans, singles, ensembles


def stack_param_sets(stack: Callable[..., Any], sets: Mapping[str, Average]) -> StackedSets:
    """`sets` stacked by `stack` (a jitted `stack_members`)."""
    spans, singles, ensembles = set_parts(sets)
    return StackedSets(members=stack(singles, ensembles), spans=spans)


def eval_step(members: Any, batch: dict[str, jax.Array], *, model: Any) -> jax.Array:
    """Deterministic forward passes of every member: float32 logits [batch, members, classes].

    Batch-major, so the output shards like the batch. The program depends on the number of
    members and the batch shape only, not on which sets they belong to.
    """

    def forward(params):
        return model.apply(
            {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], deterministic=True
        )

    return jnp.moveaxis(jax.vmap(forward)(members), 0, 1)


def collect_logits(
    step: BucketedJit, sets: StackedSets, batches: Iterable[tuple[dict[str, np.ndarray], Any]], order: np.ndarray
) -> dict[str, np.ndarray]:
    """Runs `step` over (host, device) batch pairs that visit the examples in `order`.

    Returns {set name: logits [examples, classes]} in file order; a set's logits are the mean of
    its members' (`Average.combine`).
    """
    outputs = [(host["weights"] > 0, step(sets.members, device)) for host, device in batches]
    rows = []
    for real, out in outputs:  # fetched after all steps were dispatched, so the device never idles
        # Row-sharded outputs are gathered here rather than replicated inside the step: several
        # in-flight programs that each end in an all-gather can deadlock XLA's CPU runtime.
        rows.append(multihost_utils.process_allgather(out, tiled=True)[real])
    member_logits = np.empty_like(np.concatenate(rows))
    member_logits[order] = np.concatenate(rows)
    return {name: Average.combine(member_logits[:, a:b].swapaxes(0, 1)) for name, (a, b) in sets.spans.items()}


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy of float32 logits, computed in float64 on the host."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, and F1: of class 1 for two classes (sklearn's binary default), else macro-F1."""
    accuracy = float(np.mean(labels == predictions))
    f1_per_class = []
    for cls in range(num_classes):
        true_pos = np.sum((predictions == cls) & (labels == cls))
        predicted = np.sum(predictions == cls)
        actual = np.sum(labels == cls)
        f1_per_class.append(0.0 if predicted + actual == 0 else 2.0 * true_pos / (predicted + actual))
    f1 = f1_per_class[1] if num_classes == 2 else float(np.mean(f1_per_class))
    return {"accuracy": accuracy, "f1": float(f1)}


def dev_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loss (mean cross-entropy over examples), accuracy and F1 of dev logits against the labels."""
    metrics = classification_metrics(labels, logits.argmax(-1), logits.shape[-1])
    metrics["loss"] = float(cross_entropy(logits, labels).mean())
    return metrics


def write_predictions(path: pathlib.Path, ids: Sequence[Any], labels: Sequence[str]) -> None:
    """Writes the CLUE submission (`{"id": ..., "label": ...}` per line) atomically."""
    lines = [json.dumps({"id": id_, "label": label}, ensure_ascii=False) for id_, label in zip(ids, labels)]
    atomic_write.write_text(path, "\n".join(lines) + "\n")


def argmax_labels(logits: np.ndarray, label_names: Sequence[str]) -> list[str]:
    return [label_names[i] for i in np.argmax(logits, -1)]
