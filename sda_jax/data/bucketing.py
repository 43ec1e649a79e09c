"""How many padded lengths (buckets) a run gets: the fewest that cost least, by a stated cost model.

Every bucket length is a train program and an eval program to compile; every padded token is
work the step does for nothing. With `data.num_buckets = None` (the default) the run takes the k
that minimises

    epochs × models × (padded tokens of the train set with k fitted lengths) × seconds per padded token
    + k × seconds to compile one length's programs

(`models`: the seeds trained side by side, each of which pays for every padded token)

and prints the choice. Seconds per padded token are the model's training FLOPs per token over an
effective rate for the platform: on a CPU the step is compute-bound (the marginal rate measured
on the 2-core machine, 4-layer model, between 8 and 4 fitted lengths: 62 ms more per step for 170
more padded tokens, ~57 GFLOP/s; a length's train and eval programs compile in ~9 s); on a GPU
the step at these lengths is bound by memory traffic and kernel launches, so padding is cheap
(the marginal rate of the deviceless H100 estimates between 16 and 64 tokens: ~300 TFLOP/s) and
programs are dear (BERT-base's train and eval programs: ~18 CPU-s to compile). So AFQMC gets
five or six lengths on a CPU and one on a GPU.
`data.num_buckets` fits that many lengths; `data.bucket_lengths` names them outright.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sda_jax.config import DataSettings
from sda_jax.data import input_pipeline

# Effective training rates (FLOP/s of the model's matmul FLOPs per padded token) and seconds to
# compile one bucket length's train + eval programs, per platform; see the module docstring.
_RATES = {"cpu": 57e9, "gpu": 300e12, "tpu": 300e12}
_COMPILE_SECONDS = {"cpu": 9.0, "gpu": 18.0, "tpu": 18.0}
MAX_BUCKETS = 16


@dataclasses.dataclass(frozen=True)
class BucketChoice:
    lengths: tuple[int, ...]
    how: str  # "configured", "fitted" (data.num_buckets) or "cost model"
    padded_fraction: float  # padding tokens over real tokens on the train set
    note: str  # one line for the log


@dataclasses.dataclass(frozen=True)
class CostModel:
    seconds_per_token: float  # a training step's time per padded token
    seconds_per_bucket: float  # compiling one bucket length's train and eval programs

    @classmethod
    def for_platform(cls, platform: str, train_flops_per_token: float) -> CostModel:
        # The student's forward and backward (6 per weight per token) and the teacher's forward (2).
        flops = train_flops_per_token * 8 / 6
        return cls(flops / _RATES.get(platform, _RATES["gpu"]), _COMPILE_SECONDS.get(platform, _COMPILE_SECONDS["gpu"]))

    def cost(self, padded_tokens: float, epochs: float, buckets: int) -> tuple[float, float]:
        """(seconds of padded-token work, seconds of compiling)."""
        return epochs * padded_tokens * self.seconds_per_token, buckets * self.seconds_per_bucket


def padded_tokens(lengths: np.ndarray, bucket_lengths: tuple[int, ...]) -> int:
    """Tokens of the examples padded to their bucket (what the bucket sampler's batches come to)."""
    return int(np.asarray(bucket_lengths)[np.searchsorted(bucket_lengths, lengths)].sum())


def choose(
    data: DataSettings, train_lengths: np.ndarray, train_flops_per_token: float, platform: str, epochs: float, models: int = 1
) -> BucketChoice:
    """The run's bucket lengths: as configured, fitted to a configured count, or by the cost model,
    given the model's training FLOPs per token at `data.max_seq_len` (`models.bert.flops_per_token`:
    the data stage asks no model)."""
    if data.bucket_lengths is not None:
        lengths = data.bucket_lengths
        return BucketChoice(lengths, "configured", input_pipeline.padded_fraction(train_lengths, lengths), "")
    if data.num_buckets is not None:
        lengths = input_pipeline.fit_bucket_lengths(train_lengths, data.num_buckets, data.max_seq_len)
        padding = input_pipeline.padded_fraction(train_lengths, lengths)
        note = f"Bucket lengths fitted to the train set: {list(lengths)} ({padding:.1%} padding tokens)."
        return BucketChoice(lengths, "fitted", padding, note)
    model = CostModel.for_platform(platform, train_flops_per_token)
    options = []
    for k in range(1, MAX_BUCKETS + 1):
        lengths = input_pipeline.fit_bucket_lengths(train_lengths, k, data.max_seq_len)
        if options and len(lengths) == len(options[-1][0]):
            break  # no more distinct lengths to fit
        options.append((lengths, *model.cost(padded_tokens(train_lengths, lengths), epochs * models, len(lengths))))
    best = min(range(len(options)), key=lambda i: sum(options[i][1:]))
    lengths, work, compile_ = options[best]
    padding = input_pipeline.padded_fraction(train_lengths, lengths)
    shown = ", ".join(f"{len(o[0])}: {o[1] + o[2]:.0f} s" for o in options[: max(best + 2, 4)])
    note = (
        f"Bucket lengths for {platform} by the cost model ({model.seconds_per_token * 1e6:.2g} µs per padded token, "
        f"{model.seconds_per_bucket:.0f} s to compile a length's programs, {epochs:.3g} epochs"
        f"{f' × {models} models' if models > 1 else ''}): {list(lengths)} "
        f"({padding:.1%} padding tokens; est. {work:.1f} s of padded work + {compile_:.0f} s compiling; "
        f"by number of lengths: {shown})."
    )
    return BucketChoice(lengths, "cost model", padding, note)
