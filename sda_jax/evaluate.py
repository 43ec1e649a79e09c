"""Evaluation and prediction: the eval step, dev metrics (accuracy, F1) and the CLUE submission file.

Every example is scored exactly once: evaluation batches come in file order, padded to the bucket
lengths with zero-weight rows that are dropped again on the host.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from sda_jax.bucketed_jit import BucketedJit


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: Any) -> dict[str, jax.Array]:
    """Deterministic forward pass: float32 logits and per-row cross-entropy (0 on padding rows)."""
    logits = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["token_type_ids"],
        batch["attention_mask"],
        deterministic=True,
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]) * batch["weights"]
    return {"logits": logits, "losses": losses}


def collect_logits(
    step: BucketedJit, params: Any, batches: Iterable[tuple[dict[str, np.ndarray], Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """Runs `step` over (host, device) batch pairs; returns the real rows' logits and losses."""
    outputs = [(host["weights"] > 0, step(params, device)) for host, device in batches]
    logits, losses = [], []
    for real, out in outputs:  # fetched after all steps were dispatched, so the device never idles
        # Row-sharded outputs are gathered here rather than replicated inside the step: several
        # in-flight programs that each end in an all-gather can deadlock XLA's CPU runtime.
        out = multihost_utils.process_allgather(out, tiled=True)
        logits.append(out["logits"][real])
        losses.append(out["losses"][real])
    return np.concatenate(logits), np.concatenate(losses)


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


def dev_metrics(logits: np.ndarray, losses: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loss (mean over examples), accuracy and F1 of dev logits against the labels."""
    metrics = classification_metrics(labels, logits.argmax(-1), logits.shape[-1])
    metrics["loss"] = float(losses.mean())
    return metrics


def write_predictions(path: pathlib.Path, ids: Sequence[Any], labels: Sequence[str]) -> None:
    """Writes the CLUE submission (`{"id": ..., "label": ...}` per line) atomically."""
    lines = [json.dumps({"id": id_, "label": label}, ensure_ascii=False) for id_, label in zip(ids, labels)]
    write_text_atomically(path, "\n".join(lines) + "\n")


def write_text_atomically(path: pathlib.Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a prefix."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def argmax_labels(logits: np.ndarray, label_names: Sequence[str]) -> list[str]:
    return [label_names[i] for i in np.argmax(logits, -1)]
