"""How the model's blocks are computed: the one value the model takes from the kernel choice.

The model (`models.bert`, `models.layers`, `models.masked_lm`) builds every block through a
`Forms`. `REFERENCE` is the recipe as torch autocast computes it, written with XLA's plain ops:
products in the compute dtype with their bias, LayerNorm and the residual stream in float32, no
barrier, no custom gradient, no weight copy. The other forms compute the same values with less
memory traffic on a GPU (written-out backward passes, fused products, barriers, per-element
dropout draws, hand-written kernels); they live in `sda_jax.kernels`, which `kernels.choose` picks
from once per run, and reach the model only as this value: the model package imports no kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from sda_jax.models import layers
from sda_jax.models.dropout import uint16_halves

# The residual stream between blocks: the float32 values, or (a form's) the float32 values and
# the 16-bit copy the next products read.
Stream = jax.Array | tuple[jax.Array, jax.Array]


def _unchanged(x: Stream, *_: Any) -> Stream:
    return x


@dataclasses.dataclass(frozen=True)
class Forms:
    """Each block's module class (same parameters as the reference block, so checkpoints and the
    Hugging Face conversion are the same whichever form runs), and how the stream travels."""

    name: str  # reference, xla, pallas or pallas_interpreted (model.kernels, as chosen)
    dense: type[nn.Module] = layers.Dense  # (features, dtype, kernel_init)
    layer_norm: type[nn.Module] = layers.LayerNorm  # (epsilon, rematerialised)
    dropout_draws: Callable[[jax.Array, Sequence[int], bool], jax.Array] = uint16_halves  # (key, shape, in_loop)
    self_attention: type[nn.Module] = layers.BertSelfAttention  # (config, forms, dtype, rematerialised)
    residual_output: type[nn.Module] = layers.BertResidualOutput
    intermediate: type[nn.Module] = layers.BertIntermediate
    after_attention: Callable[[Stream, bool], Stream] = _unchanged  # (stream, rematerialised) between the two blocks
    carry_in: Callable[[jax.Array, Any], Stream] = _unchanged  # (float32 input, dtype) -> the scan's carry
    float32: Callable[[Stream], jax.Array] = _unchanged  # the stream's float32 values (the residual)
    product_input: Callable[[Stream], jax.Array] = _unchanged  # what the next products read
    weight_copies: bool = False  # train, masked-LM and eval states keep 16-bit copies of the weight matrices


REFERENCE = Forms("reference")
