"""The GPU memory forms of the model's blocks, and the one place a run chooses them: `choose`.

`models.forms.REFERENCE` is the recipe's plain computation. The forms here compute the same
values and move less memory on a GPU (`blocks16`: written-out backward passes, the fused
query/key/value product, barriers; `dropout_counters`: per-element dropout draws; `weight_copies`:
16-bit weight matrices kept in the state; `fused_attention`, `fused_layer_norm`: Pallas kernels).
No GPU has measured them yet (benchmarks/RESULTS.md has the deviceless estimates), so `auto`
takes them on a GPU, where they were designed, and the reference elsewhere.

`model.kernels`:

| setting | float32 | 16-bit on a GPU | 16-bit on a TPU or CPU |
|---|---|---|---|
| auto (default) | reference | xla | reference |
| reference | reference | reference | reference |
| xla | reference | xla | xla |
| pallas | refused | pallas | pallas_interpreted (Pallas' interpreter: slow, for tests) |

A float32 model has no memory forms: it always computes the reference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sda_jax.errors import InputError
from sda_jax.kernels import blocks16
from sda_jax.kernels.dropout_counters import per_element_halves
from sda_jax.kernels.fused_attention import MAX_LENGTH as MAX_PALLAS_LENGTH
from sda_jax.models.config import BertConfig
from sda_jax.models.forms import REFERENCE, Forms

XLA = Forms(
    "xla", dense=blocks16.Dense16, layer_norm=blocks16.LayerNorm16, dropout_draws=per_element_halves,
    self_attention=blocks16.SelfAttention16, intermediate=blocks16.Intermediate16,
    after_attention=blocks16.barrier_when_rematerialised, weight_copies=True,
)  # fmt: skip
# xla's forms, with self-attention and the residual blocks' ends as Pallas kernels, the stream a pair.
PALLAS = dataclasses.replace(
    XLA, name="pallas", self_attention=blocks16.PallasSelfAttention, residual_output=blocks16.PallasResidualOutput,
    carry_in=blocks16.pair_stream_in, float32=blocks16.float32_of, product_input=blocks16.product_input_of,
)  # fmt: skip
PALLAS_INTERPRETED = dataclasses.replace(
    PALLAS, name="pallas_interpreted", self_attention=blocks16.InterpretedPallasSelfAttention,
    residual_output=blocks16.InterpretedPallasResidualOutput,
)  # fmt: skip


def choose(setting: str, dtype, platform: str, config: BertConfig, max_length: int) -> Forms:
    """The run's forms for `model.kernels` (see the table above): an InputError naming the key
    where Pallas cannot run (a kernel is one custom call, which XLA does not partition: it would
    gather the sharded batch onto every device; a head dimension that is not a power of two; rows
    longer than a program holds)."""
    sixteen_bit = jnp.dtype(dtype) != jnp.float32
    if setting == "pallas":
        if not sixteen_bit:
            raise InputError("config key model.kernels: pallas needs a 16-bit compute dtype (model.dtype bfloat16 or float16)")
        fits = config.head_dim & (config.head_dim - 1) == 0 and jax.device_count() == 1 and max_length <= MAX_PALLAS_LENGTH
        if not fits:
            raise InputError(
                f"config key model.kernels: pallas needs one device ({jax.device_count()} here), a head dimension that "
                f"is a power of two ({config.head_dim} here) and data.max_seq_len <= {MAX_PALLAS_LENGTH} ({max_length}); "
                "use auto, xla or reference"
            )
        return PALLAS if platform == "gpu" else PALLAS_INTERPRETED
    if not sixteen_bit or setting == "reference" or (setting == "auto" and platform != "gpu"):
        return REFERENCE
    return XLA
