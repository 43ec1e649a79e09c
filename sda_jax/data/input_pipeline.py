"""Host-side input pipeline: encoded examples -> padded, length-bucketed batches.

Reproduces the PyTorch reference's bucket sampler (random permutation, chunks of
`batch_size * bucket_multiplier` sorted by length, batches of a chunk shuffled) as a pure
function of (seed, epoch), so a resumed run sees exactly the batches it would have seen. Every
batch has a fixed row count and a width taken from a small set of bucket lengths, so the jitted
step compiles once per bucket; padding rows carry weight 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from sda_jax.data.tokenization import Encoded


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be partial (the reference keeps it)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}")
    return -(-num_examples // batch_size)


def epoch_order(
    lengths: np.ndarray, *, batch_size: int, bucket_multiplier: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The example indices of each batch of one epoch, as the reference's bucket sampler draws them.

    A random permutation is cut into chunks of batch_size * bucket_multiplier; each chunk is
    stably sorted by length and cut into batches (the last one possibly partial), and the batches
    of a chunk are emitted in random order.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    permutation = rng.permutation(len(lengths))
    chunk_size = batch_size * bucket_multiplier
    batches: list[np.ndarray] = []
    for begin in range(0, len(permutation), chunk_size):
        chunk = permutation[begin : begin + chunk_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        chunk_batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches.extend(chunk_batches[j] for j in rng.permutation(len(chunk_batches)))
    return batches


def fit_bucket_lengths(lengths: np.ndarray, num_buckets: int, max_len: int) -> tuple[int, ...]:
    """The at most `num_buckets` padded lengths, the largest `max_len`, that pad `lengths` least.

    Each batch of the bucket sampler comes from a length-sorted chunk, so its rows are nearly of
    one length, and padding every example to its bucket stands in well for padding every batch.
    Exact dynamic programme over the lengths 0..max_len: O(num_buckets * max_len^2), ~15 ms at 512.
    """
    counts = np.bincount(np.minimum(np.asarray(lengths, dtype=np.int64), max_len), minlength=max_len + 1)
    at_most = np.cumsum(counts)  # at_most[n]: examples of at most n tokens
    n = np.arange(max_len + 1)
    # cost[n]: padded tokens of all examples of <= n tokens, with buckets whose largest is n.
    cost = n * at_most
    # bucket_cost[m, n]: padded tokens of the examples in (m, n] padded to n.
    bucket_cost = n[None, :] * (at_most[None, :] - at_most[:, None])
    unreachable = np.iinfo(np.int64).max
    previous_bucket = []  # per added bucket: for each n, the bucket below n (-1: no gain from one more)
    for _ in range(num_buckets - 1):
        total = np.where(n[:, None] < n[None, :], cost[:, None] + bucket_cost, unreachable)
        below = np.argmin(total, axis=0)
        with_one_more = total[below, n]
        better = with_one_more < cost
        previous_bucket.append(np.where(better, below, -1))
        cost = np.where(better, with_one_more, cost)
    buckets = [max_len]
    for below in reversed(previous_bucket):
        if below[buckets[-1]] > 0:
            buckets.append(int(below[buckets[-1]]))
    return tuple(sorted(buckets))


def padded_fraction(lengths: np.ndarray, bucket_lengths: Sequence[int]) -> float:
    """Padding tokens over real tokens when every example is padded to its bucket."""
    lengths = np.asarray(lengths)
    padded = np.asarray(bucket_lengths)[np.searchsorted(bucket_lengths, lengths)]
    return float(padded.sum() / lengths.sum() - 1.0)


def make_batch(
    encoded: Encoded, indices: np.ndarray, *, batch_size: int, bucket_lengths: Sequence[int]
) -> dict[str, np.ndarray]:
    """Rows `indices`, padded to the smallest bucket length that fits and to batch_size rows.

    Padding rows have weight 0, label 0 and an all-zero attention mask.
    """
    indices = np.asarray(indices)
    count = len(indices)
    if not 1 <= count <= batch_size:
        raise ValueError(f"a batch needs 1 to {batch_size} examples, got {count}")
    lengths = encoded.lengths[indices]
    longest = int(lengths.max())
    bucket = int(np.searchsorted(bucket_lengths, longest))
    if bucket == len(bucket_lengths):
        raise ValueError(f"an example of {longest} tokens exceeds the largest bucket {bucket_lengths[-1]}")
    width = int(bucket_lengths[bucket])

    input_ids = np.full((batch_size, width), encoded.pad_id, dtype=np.int32)
    copied = min(width, encoded.token_ids.shape[1])
    input_ids[:count, :copied] = encoded.token_ids[indices, :copied]
    positions = np.arange(width, dtype=np.int32)
    attention_mask = np.zeros((batch_size, width), dtype=np.int32)
    attention_mask[:count] = positions < lengths[:, None]
    token_type_ids = np.zeros((batch_size, width), dtype=np.int32)
    token_type_ids[:count] = (positions >= encoded.type0_lengths[indices, None]) & (positions < lengths[:, None])
    labels = np.zeros(batch_size, dtype=np.int32)
    if encoded.labels is not None:
        labels[:count] = encoded.labels[indices]
    weights = np.zeros(batch_size, dtype=np.float32)
    weights[:count] = 1.0
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "weights": weights,
    }


def train_batches(
    encoded: Encoded,
    *,
    batch_size: int,
    bucket_multiplier: int,
    bucket_lengths: Sequence[int],
    seed: int,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches; global step s is batch s % steps_per_epoch of epoch
    s // steps_per_epoch, so starting at step k equals skipping k batches."""
    for _, indices in batch_indices(encoded.lengths, batch_size=batch_size, bucket_multiplier=bucket_multiplier, seed=seed,
                                    start_step=start_step):  # fmt: skip
        yield make_batch(encoded, indices, batch_size=batch_size, bucket_lengths=bucket_lengths)


def batch_indices(
    lengths: np.ndarray, *, batch_size: int, bucket_multiplier: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, example indices) of every training batch from `start_step` on, endlessly: the
    `epoch_order` of each epoch in turn."""
    per_epoch = steps_per_epoch(len(lengths), batch_size)
    order: list[np.ndarray] = []
    order_epoch = -1
    for step in itertools.count(start_step):
        epoch, index = divmod(step, per_epoch)
        if epoch != order_epoch:
            order = epoch_order(lengths, batch_size=batch_size, bucket_multiplier=bucket_multiplier, seed=seed, epoch=epoch)
            order_epoch = epoch
        yield epoch, order[index]


def eval_order(encoded: Encoded) -> np.ndarray:
    """The order in which evaluation visits the examples: by length (stable), so that each batch
    pads to the smallest bucket that fits it rather than, in file order, nearly always the largest."""
    return np.argsort(encoded.lengths, kind="stable")


def eval_batches(
    encoded: Encoded, *, batch_size: int, bucket_lengths: Sequence[int], order: np.ndarray | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in `order` (default: file order); the last batch is filled up with
    zero-weight rows. Results come back in `order`: `out[order] = results` restores file order."""
    order = np.arange(len(encoded)) if order is None else np.asarray(order)
    for begin in range(0, len(encoded), batch_size):
        yield make_batch(encoded, order[begin : begin + batch_size], batch_size=batch_size, bucket_lengths=bucket_lengths)
