"""Evaluation and prediction: parameter averages scored on every example, dev metrics, the submission file.

`eval_step(averages, batch)` asks each average for its logits through `Average.logits(forward)`,
the very call the train step makes of its teacher, for one model; `model_axis.over_models` lifts
it to the model axis. Evaluation passes plain averages (`averaging.plain`): the parameters of a
one-model average, or a vote teacher's snapshots, so that a program depends on how many sets are
scored and whether one is a vote, not on their kinds: dev evaluation and test prediction compile
at most two programs per bucket length. Examples are visited by length, in the train step's batch
shapes, and every example is scored exactly once: batches are padded with zero-weight rows that are
dropped again on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sda_jax.data import input_pipeline
from sda_jax.kernels import weight_copies
from sda_jax.parallel import distributed
from sda_jax.parallel.bucketed_jit import BucketedJit
from sda_jax.step.sda import Average


def eval_step(averages: tuple[Average, ...], batch: dict[str, jax.Array], *, model: Any) -> tuple[jax.Array, ...]:
    """Float32 logits [batch, classes] of each average of one model: its `logits` of the deterministic forward."""

    def forward(params):
        return model.apply(
            {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], deterministic=True
        )

    return tuple(average.logits(forward) for average in averages)


class EvalPrograms:
    """The compiled eval programs of a run: one per bucket length and structure of the averages scored."""

    def __init__(self, model: Any, mesh: Any, models: Any, bucket_lengths: tuple[int, ...], batch_size: int, clock):
        self.mesh, self.models, self.bucket_lengths, self.batch_size = mesh, models, bucket_lengths, batch_size
        step = models.lift(functools.partial(eval_step, model=model), in_axes=(0, None))
        # Logits [models, batch, classes]: split like the models and the batch rows.
        out = models.sharding(mesh, distributed.DATA_AXIS)
        key = lambda averages, batch: (jax.tree.structure(averages), *batch["input_ids"].shape)
        self.eval_fn = BucketedJit(jax.jit(step, out_shardings=out), key, clock)
        # Where the model's forms read 16-bit weight copies, each set's weight matrices are cast once
        # per evaluation, not in every batch.
        dtype = jnp.dtype(model.dtype)
        if not model.forms.weight_copies:
            self.cast = self.cast_fn = lambda tree: tree
        else:  # the copies placed as their sets are, as the programs compiled ahead expect
            self.cast = functools.partial(weight_copies.cast, dtype=dtype)
            self.cast_fn = lambda tree: jax.jit(self.cast, out_shardings=jax.tree.map(lambda x: x.sharding, tree))(tree)

    def compile_tasks(self, *groups: tuple[Average, ...]) -> list[tuple[BucketedJit, tuple]]:
        """What `compile_concurrently` needs to build the programs that scoring each group of plain
        averages runs, at every bucket length (shared where groups agree in structure)."""
        abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        batches = [distributed.abstract_batch(self.batch_size, n, self.mesh) for n in self.bucket_lengths]
        return [(self.eval_fn, (self.cast(abstract(group)), batch)) for group in groups for batch in batches]

    def logits(self, averages: tuple[Average, ...], encoded: Any) -> list[np.ndarray]:
        """Logits [models, examples, classes] of each plain average on every example, in file order."""
        order = input_pipeline.eval_order(encoded)
        averages = self.cast_fn(averages)
        batches = input_pipeline.eval_batches(encoded, batch_size=self.batch_size, bucket_lengths=self.bucket_lengths, order=order)
        # Every step is dispatched before any result is fetched, so the device never idles.
        outputs = [(host["weights"] > 0, self.eval_fn(averages, device)) for host, device in distributed.prefetch_to_mesh(batches, self.mesh)]
        per_set: list[list[np.ndarray]] = [[] for _ in averages]
        for real, out in outputs:
            # Sharded outputs are gathered here rather than replicated inside the step: several
            # in-flight programs that each end in an all-gather can deadlock XLA's CPU runtime.
            for rows, logits in zip(per_set, self.models.expand(multihost_utils.process_allgather(out, tiled=True)), strict=True):
                rows.append(logits[:, real])
        result = []
        for rows in per_set:
            stacked = np.concatenate(rows, axis=1)
            in_file_order = np.empty_like(stacked)
            in_file_order[:, order] = stacked
            result.append(in_file_order)
        return result


@dataclasses.dataclass(frozen=True)
class Scores:
    """Dev metrics of one parameter set: each model's, their mean and standard deviation, and the
    ensemble's (the mean of the models' logits)."""

    models: list[dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    ensemble: dict[str, float]

    @classmethod
    def of(cls, logits: np.ndarray, labels: np.ndarray) -> Scores:
        """From logits [models, examples, classes]."""
        models = [dev_metrics(model_logits, labels) for model_logits in logits]
        values = {key: np.asarray([m[key] for m in models], np.float64) for key in models[0]}
        mean = {key: float(v.mean()) for key, v in values.items()}
        std = {key: float(v.std()) for key, v in values.items()}  # population std over the models
        return cls(models, mean, std, dev_metrics(logits.mean(axis=0), labels))

    def record(self) -> dict[str, Any]:
        """As metrics.jsonl holds it: the mean at the top, the details beside it."""
        return {**self.mean, "std": self.std, "ensemble": self.ensemble, "models": self.models}


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


def submission(ids: Sequence[Any], labels: Iterable[str]) -> str:
    """The CLUE submission: `{"id": ..., "label": ...}` per line."""
    return "".join(json.dumps({"id": id_, "label": label}, ensure_ascii=False) + "\n" for id_, label in zip(ids, labels))


def argmax_labels(logits: np.ndarray, label_names: Sequence[str]) -> list[str]:
    return [label_names[i] for i in np.argmax(logits, -1)]
