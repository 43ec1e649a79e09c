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
import functools
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sda_jax import atomic_write, input_pipeline, parallel
from sda_jax.averaging import Average
from sda_jax.bucketed_jit import BucketedJit


@dataclasses.dataclass(frozen=True)
class StackedSets:
    """Named parameter averages as one stack on the device: set `name` of seed i owns members
    spans[name][i] (one seed, and one span per set, when the state has no seed axis)."""

    members: Any  # params with a leading axis: every distinct member once
    spans: dict[str, list[tuple[int, int]]]


def stack_members(singles: Sequence[Any], ensembles: Sequence[Any], *, seeded: bool = False) -> Any:
    """Parameter sets concatenated along a leading member axis (jit it: it copies each set once).

    `singles` are one model's params each ([seeds, ...] when `seeded`), `ensembles` members
    already stacked ([m, ...]; [seeds, m, ...] when `seeded`). Singles come first, seed-major
    within a set.
    """
    lead = (lambda p: p) if seeded else (lambda p: p[None])
    flat = (lambda p: p.reshape(-1, *p.shape[2:])) if seeded else (lambda p: p)
    leading = [jax.tree.map(lead, single) for single in singles] + [jax.tree.map(flat, e) for e in ensembles]
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *leading)


def set_parts(sets: Mapping[str, Average], num_seeds: int = 0) -> tuple[dict[str, list[tuple[int, int]]], list[Any], list[Any]]:
    """(spans, singles, ensembles) of `sets` as `stack_members` takes them; `num_seeds` > 0 when
    every leaf has a leading seed axis of that size.

    One model per set goes in as plain params, so the stacking program depends on the parameter
    shapes and on how many sets of each kind there are, not on the kind of average: a restored
    best checkpoint stacks with the same program as the live state. Sets that are the very same
    parameters (the student, and an eval EMA that has not started) share their members.
    """
    seeds = max(num_seeds, 1)
    spans: dict[str, list[tuple[int, int]]] = {}
    singles: list[Any] = []
    slot_of: dict[int, int] = {}
    for name in sorted(sets):
        if not sets[name].is_ensemble:
            params = sets[name].single_params()
            slot = slot_of.setdefault(id(params), len(singles))
            if slot == len(singles):
                singles.append(params)
            spans[name] = [(slot * seeds + i, slot * seeds + i + 1) for i in range(seeds)]
    ensembles, start = [], len(singles) * seeds
    for name in sorted(sets):
        if sets[name].is_ensemble:
            ensembles.append(sets[name].members())
            size = jax.tree.leaves(ensembles[-1])[0].shape[1 if num_seeds else 0]
            spans[name] = [(start + i * size, start + (i + 1) * size) for i in range(seeds)]
            start += seeds * size
    return spans, singles, ensembles


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

    Returns {set name: logits [seeds, examples, classes]} in file order (seeds = 1 for a state
    without a seed axis); a set's logits are the mean of its members' (`Average.combine`).
    """
    outputs = [(host["weights"] > 0, step(sets.members, device)) for host, device in batches]
    rows = []
    for real, out in outputs:  # fetched after all steps were dispatched, so the device never idles
        # Row-sharded outputs are gathered here rather than replicated inside the step: several
        # in-flight programs that each end in an all-gather can deadlock XLA's CPU runtime.
        rows.append(multihost_utils.process_allgather(out, tiled=True)[real])
    member_logits = np.empty_like(np.concatenate(rows))
    member_logits[order] = np.concatenate(rows)
    return {
        name: np.stack([Average.combine(member_logits[:, a:b].swapaxes(0, 1)) for a, b in seed_spans])
        for name, seed_spans in sets.spans.items()
    }


def jit_eval_step(model: Any, mesh: Any) -> Any:
    """`eval_step` jitted for the mesh: outputs sharded like the batch rows."""
    return jax.jit(functools.partial(eval_step, model=model), out_shardings=parallel.batch_sharding(mesh))


class EvalPrograms:
    """Dev and test evaluation of a run's parameter sets: a stacking program, and an eval program
    per bucket length and member count, all compiled through `BucketedJit`s."""

    def __init__(self, model: Any, mesh: Any, bucket_lengths: tuple[int, ...], batch_size: int, num_seeds: int, clock):
        self.mesh, self.bucket_lengths, self.batch_size, self.num_seeds = mesh, bucket_lengths, batch_size, num_seeds
        self.replicated = parallel.replicated(mesh)
        stack = functools.partial(stack_members, seeded=num_seeds > 0)
        self.stack = BucketedJit(
            jax.jit(stack, out_shardings=self.replicated),
            lambda singles, ensembles: (len(singles), *(jax.tree.leaves(e)[0].shape for e in ensembles)),
            clock,
        )
        # One program per (member count, batch shape): dev evaluation and prediction may differ in the former.
        member_count = lambda members, batch: (jax.tree.leaves(members)[0].shape[0], *batch["input_ids"].shape)
        self.eval_fn = BucketedJit(jit_eval_step(model, mesh), member_count, clock)

    def compile_tasks(self, *set_groups: Mapping[str, Average]) -> list[tuple[BucketedJit, tuple]]:
        """What `compile_concurrently` needs to build every program that evaluating each group of
        sets runs: the stacking and one eval program per bucket length (shared where they agree)."""
        abstract = lambda tree, sharding=None: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree
        )
        seeded = functools.partial(stack_members, seeded=self.num_seeds > 0)
        tasks = []
        for sets in set_groups:  # concrete sets: their arrays' shardings are the ones the runs will see
            _, singles, ensembles = set_parts(sets, self.num_seeds)
            singles, ensembles = abstract(singles), abstract(ensembles)
            members = abstract(jax.eval_shape(seeded, singles, ensembles), self.replicated)
            tasks.append((self.stack, (singles, ensembles)))
            batches = [parallel.abstract_batch(self.batch_size, n, self.mesh) for n in self.bucket_lengths]
            tasks += [(self.eval_fn, (members, batch)) for batch in batches]
        return tasks

    def logits(self, sets: Mapping[str, Average], encoded: Any) -> dict[str, np.ndarray]:
        """{name: logits [seeds, examples, classes]} of every set on every example of `encoded`,
        in file order."""
        spans, singles, ensembles = set_parts(sets, self.num_seeds)
        stacked = StackedSets(members=self.stack(singles, ensembles), spans=spans)
        order = input_pipeline.eval_order(encoded)
        batches = input_pipeline.eval_batches(
            encoded, batch_size=self.batch_size, bucket_lengths=self.bucket_lengths, order=order
        )
        return collect_logits(self.eval_fn, stacked, parallel.prefetch_to_mesh(batches, self.mesh), order)


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


def seed_summary(per_seed: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) standard deviation over seeds of each metric."""
    keys = per_seed[0].keys()
    values = {key: np.asarray([m[key] for m in per_seed], np.float64) for key in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: float(v.std()) for k, v in values.items()}


def write_predictions(path: pathlib.Path, ids: Sequence[Any], labels: Sequence[str]) -> None:
    """Writes the CLUE submission (`{"id": ..., "label": ...}` per line) atomically."""
    lines = [json.dumps({"id": id_, "label": label}, ensure_ascii=False) for id_, label in zip(ids, labels)]
    atomic_write.write_text(path, "\n".join(lines) + "\n")


def argmax_labels(logits: np.ndarray, label_names: Sequence[str]) -> list[str]:
    return [label_names[i] for i in np.argmax(logits, -1)]
