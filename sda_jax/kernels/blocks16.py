"""The encoder's blocks in 16-bit forms that move less memory on a GPU, each in place of a reference block.

Every class here has the parameters of the `models.layers` block it replaces and computes the
same values (the same roundings; the gradients autodiff's, or the same values summed in float32
in another order): only what XLA writes to memory and reads back changes. The forms:

* `Dense16`: the bias added by `sixteen_bit.add_bias16`, whose bias gradient is a float32 sum read once;
* `LayerNorm16`: in the scan over layers, `sixteen_bit.layer_norm16`, its input gradient written once;
* `SelfAttention16`: the query, key and value products as one [hidden, 3 · hidden] product;
* `Intermediate16`: outside the scan, the activation's backward recomputed from the product
  (`sixteen_bit.activation16`);
* `barrier_when_rematerialised`: in the scan, the attention block's output written out once;
* `PallasSelfAttention`, `PallasResidualOutput`: self-attention and a residual block's end as one
  hand-written kernel per pass (`fused_attention`, `fused_layer_norm`), the residual stream then a
  `(float32, 16-bit copy)` pair (`pair_stream_in`, `float32_of`, `product_input_of`).

What each moves on BERT-base's train step for an H100: benchmarks/RESULTS.md, the deviceless rows.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sda_jax.kernels.fused_attention import attention16
from sda_jax.kernels.fused_layer_norm import residual_layer_norm16
from sda_jax.kernels.sixteen_bit import activation16, add_bias16, layer_norm16
from sda_jax.models import layers
from sda_jax.models.forms import Stream
from sda_jax.models.layers import hf_normal_init, layer_norm


def _product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x · kernel in the kernel's (16-bit) dtype, accumulated in float32."""
    return jax.lax.dot_general(x.astype(kernel.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))


class Dense16(layers.Dense):
    """`layers.Dense` whose bias gradient is a float32 sum of the 16-bit gradient read once:
    autodiff's sums a float32 copy of it, which XLA writes out and reads back."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.parameters(x.shape[-1])
        return add_bias16(_product(x, kernel.astype(self.dtype)), bias)


def _kernel16(module: nn.Module, name: str, features: int, in_features: int) -> tuple[jax.Array, jax.Array]:
    """A `Dense`'s parameters under `name` for a caller that takes the product itself: the kernel
    in the compute dtype and the float32 bias."""
    kernel, bias = _DenseParameters(features, module.dtype, hf_normal_init(module.config), name=name)(in_features)
    return kernel.astype(module.dtype), bias


class _DenseParameters(layers.Dense):
    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return self.parameters(in_features)


class LayerNorm16(layers.LayerNorm):
    """`layers.LayerNorm`; in the scan over layers, `layer_norm16`, whose input gradient is written
    once (XLA would otherwise copy its recomputation into each kernel that reads it)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self.parameters(x.shape[-1])
        norm = layer_norm16 if self.rematerialised else layer_norm
        return norm(x.astype(jnp.float32), scale, bias, self.epsilon)


class SelfAttention16(layers.BertSelfAttention):
    """`layers.BertSelfAttention` with the query, key and value products as one.

    XLA merges the three forward products itself, but not their input gradients: three products,
    each rounded to 16 bits, and a float32 sum of them. One product's input gradient sums all three
    in its float32 accumulator. The [CLS]-row layer projects its query row apart, as the reference.
    """

    def projections(self, x: jax.Array, cls_only: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        if cls_only:
            return super().projections(x, cls_only)
        cfg = self.config
        y, bias = self.fused_product(x)
        y = add_bias16(y, bias).reshape(*x.shape[:2], 3, cfg.num_attention_heads, cfg.head_dim)
        return y[:, :, 0], y[:, :, 1], y[:, :, 2]

    def fused_product(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x times the [hidden, 3 · hidden] query/key/value kernel (16-bit), and the float32 bias."""
        cfg = self.config
        parts = [_kernel16(self, name, cfg.hidden_size, x.shape[-1]) for name in ("query", "key", "value")]
        return _product(x, jnp.concatenate([k for k, _ in parts], axis=1)), jnp.concatenate([b for _, b in parts])


class _DropoutKey(nn.Module):
    """The key a `Dropout` module of this name draws its mask with (Flax derives it from the name)."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("dropout")


def _dropout_key(rate: float, deterministic: bool) -> jax.Array | None:
    # Created where the reference creates its first Dropout, so the kernel draws that module's mask.
    return None if deterministic or rate == 0.0 else _DropoutKey(name="Dropout_0")()


class PallasSelfAttention(SelfAttention16):
    """What `SelfAttention16` computes, in `attention16`'s kernels (the same values, bit for bit, in
    Pallas' interpreter; the same dropout masks)."""

    interpret: bool = False  # Pallas' interpreter, on any platform (the tests')

    def attend_all(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        y, bias = self.fused_product(x)
        rate = cfg.attention_probs_dropout_prob
        heads = 3 * cfg.num_attention_heads
        context = attention16(
            y.reshape(*x.shape[:2], heads, cfg.head_dim), bias.reshape(heads, cfg.head_dim), key_mask,
            _dropout_key(rate, deterministic), rate, interpret=self.interpret,
        )  # fmt: skip
        return context.reshape(*x.shape[:2], cfg.hidden_size)

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False) -> jax.Array:
        if cls_only:
            q, k, v = self.projections(x, cls_only)
            return self.attend(q, k, v, key_mask, deterministic)
        return self.attend_all(x, key_mask, deterministic)


class PallasResidualOutput(layers.BertResidualOutput):
    """`layers.BertResidualOutput` with all but the product in `residual_layer_norm16`'s kernel,
    which returns the float32 result and its 16-bit copy: the pair the next block reads."""

    interpret: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> Stream:
        cfg = self.config
        kernel, dense_bias = _kernel16(self, "dense", cfg.hidden_size, x.shape[-1])
        y = _product(x, kernel)
        rate = cfg.hidden_dropout_prob
        key = _dropout_key(rate, deterministic)
        scale, bias = _LayerNormParameters(cfg.layer_norm_eps, name="LayerNorm")(cfg.hidden_size)
        return residual_layer_norm16(y, dense_bias, residual, scale, bias, key, rate, cfg.layer_norm_eps, interpret=self.interpret)


class InterpretedPallasSelfAttention(PallasSelfAttention):
    interpret: bool = True


class InterpretedPallasResidualOutput(PallasResidualOutput):
    interpret: bool = True


class _LayerNormParameters(layers.LayerNorm):
    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        return self.parameters(features)


class Intermediate16(layers.BertIntermediate):
    """`layers.BertIntermediate`; outside the scan, the activation of the 16-bit product plus its
    bias in float32, rounded once, whose backward recomputes it from the product (`activation16`).
    In the scan the backward recomputes the activation anyway, and a barrier would only keep XLA
    from fusing the recomputation: there the reference's."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rematerialised:
            return super().__call__(x)
        cfg = self.config
        kernel, bias = _kernel16(self, "dense", cfg.intermediate_size, x.shape[-1])
        return activation16(layers.ACTIVATIONS[cfg.hidden_act], _product(x, kernel), bias)


def barrier_when_rematerialised(x: Stream, rematerialised: bool) -> Stream:
    """In the scan, the attention block's output written out once: otherwise XLA recomputes its
    LayerNorm inside the output block's, which then reads the layer's input (the scan's carry)
    while writing the layer's output, and the new carry is copied."""
    return jax.lax.optimization_barrier(x) if rematerialised else x


def pair_stream_in(x: jax.Array, dtype: Any) -> Stream:
    """The scan's carry with the Pallas blocks: the float32 values and their 16-bit copy."""
    return x, x.astype(dtype)


def float32_of(x: Stream) -> jax.Array:
    """The residual stream's float32 values."""
    return x[0] if isinstance(x, tuple) else x


def product_input_of(x: Stream) -> jax.Array:
    """What the next products read: the 16-bit copy a fused block wrote, else the float32 values
    (which the products cast where XLA fuses the cast, e.g. with the [CLS] row's slice)."""
    return x[1] if isinstance(x, tuple) else x
