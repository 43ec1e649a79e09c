"""One encoder layer of the BERT model and its parts, numerically matching `transformers` (PyTorch).

`models` assembles them (embeddings, the layer stack, pooler, heads). Parameters are float32;
`dtype` only sets the compute dtype, as torch autocast does: the matmuls run in that dtype
(accumulating in float32) and add their bias in float32; LayerNorm, the residual stream it
feeds and the attention softmax stay float32. In 16 bits some backward passes are written out
(`sda_jax.sixteen_bit`) and the query, key and value products are one product, so that XLA
moves less memory on a GPU; with `kernels="pallas"` self-attention and each residual block's
end (bias, dropout, residual sum, LayerNorm) are hand-written kernels (`sda_jax.fused_attention`,
`sda_jax.fused_layer_norm`), and the residual stream between blocks is a `Stream`: the float32
values and the 16-bit copy the next products read. The float32 model runs none of that code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sda_jax.bert_config import ACTIVATION_NAMES, BertConfig
from sda_jax.dropout import Dropout
from sda_jax.fused_attention import attention16
from sda_jax.fused_layer_norm import residual_layer_norm16
from sda_jax.sixteen_bit import activation16, layer_norm, layer_norm16
from sda_jax.sixteen_bit import add_bias16 as _add_bias16

Stream = jax.Array | tuple[jax.Array, jax.Array]  # the residual stream: float32, or float32 and its 16-bit copy
KERNELS = ("xla", "pallas", "pallas_interpreted")  # XLA's ops or the hand-written GPU kernels (BertForSequenceClassification)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF "gelu" is the exact erf form. jax.nn.gelu evaluates it as x/2 * erfc(-x/sqrt(2)); torch's
    # x/2 * (1 + erf(x/sqrt(2))) is 3% faster on CPU in XLA but lands 4x further from torch's
    # updates after 20 steps (XLA's and torch's erf round 1 + erf differently for negative x).
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)



def hf_normal_init(config: BertConfig) -> nn.initializers.Initializer:
    """HF's init for Linear and Embedding weights."""
    # HF initialises with an untruncated normal, unlike the truncated one some JAX BERTs use.
    return nn.initializers.normal(stddev=config.initializer_range)


class Dense(nn.Module):
    """torch's Linear under autocast: a product in the compute dtype whose bias is added in float32.

    Params `kernel` [in, out] and `bias` as in `nn.Dense`, float32. `nn.Dense(dtype=bf16)` casts
    the bias to bf16 and adds it there, so the bias gradient becomes a bf16 sum over batch ×
    length rows (XLA keeps such sums in 16 bits on Hopper). Here the product is widened to
    float32, the bias added, and the sum rounded once to the compute dtype (as cuBLAS adds
    torch's bias in its float32 epilogue), so the bias gradient is a float32 sum (`_add_bias16`).
    In float32 this is exactly `nn.Dense`.
    """

    features: int
    dtype: Any
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        if not is_16_bit(self.dtype):
            return (y.astype(jnp.float32) + bias).astype(self.dtype)
        return _add_bias16(y, bias)


class _DenseKernel(nn.Module):
    """`Dense`'s parameters for a caller that takes the product itself; returns the kernel in the
    compute dtype (the caller reads the float32 bias from its variables)."""

    features: int
    dtype: Any
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel.astype(self.dtype)


def is_16_bit(dtype: Any) -> bool:
    # The accelerators' compute dtypes (mixed_precision.compute_dtype), where what moves through
    # memory is the cost: they take the written-out forms (sda_jax.sixteen_bit, fused products,
    # barriers, per-element dropout draws that XLA fuses into the kernel applying them).
    return jnp.dtype(dtype) != jnp.float32


def dropout(rate: float, dtype: Any, in_loop: bool = False) -> Dropout:
    return Dropout(rate, per_element_draws=is_16_bit(dtype), in_loop=in_loop)


def dense(config: BertConfig, features: int, dtype: Any, name: str) -> Dense:
    return Dense(features, dtype, hf_normal_init(config), name=name)


class LayerNorm(nn.Module):
    """torch's LayerNorm, (x - mean) * rsqrt(var + eps) * scale + bias, in float32 (as under autocast).

    Params `scale`/`bias` as in `nn.LayerNorm`. Flax folds the scale into the normaliser,
    (x - mean) * (rsqrt(var + eps) * scale), a [batch, length, hidden] product that its backward
    pass keeps; scaling the normalised rows afterwards does not need it (the small model's CPU
    train step: 2.5% faster) and lands closer to torch's updates in the parity tests. The variance
    is two-pass, mean((x - mean)^2), as in torch.
    """

    epsilon: float
    dtype: Any = jnp.float32  # the model's compute dtype
    rematerialised: bool = False  # under `nn.remat`, where 16 bits take `sixteen_bit.layer_norm16`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x = x.astype(jnp.float32)
        if is_16_bit(self.dtype) and self.rematerialised:
            return layer_norm16(x, scale, bias, self.epsilon)
        return layer_norm(x, scale, bias, self.epsilon)


def named_layer_norm(config: BertConfig, dtype: Any, rematerialised: bool = False) -> LayerNorm:
    # Its float32 output is the residual stream, as autocast keeps it: the next matmul casts.
    return LayerNorm(config.layer_norm_eps, dtype, rematerialised, name="LayerNorm")


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False  # the body of the scan over layers
    kernels: str = "xla"  # KERNELS: 16-bit models may take `fused_attention.attention16`'s kernel

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        """Attention of every row of `x` ([batch, 1, hidden] of the [CLS] row alone if `cls_only`)."""
        cfg = self.config

        def project(name: str, inputs: jax.Array) -> jax.Array:
            y = dense(cfg, cfg.hidden_size, self.dtype, name)(inputs)
            return y.reshape(*inputs.shape[:2], cfg.num_attention_heads, cfg.head_dim)

        if is_16_bit(self.dtype) and not cls_only and self.kernels != "xla":
            return self._fused_attention(x, key_mask, deterministic)
        if is_16_bit(self.dtype) and not cls_only:
            q, k, v = self._fused_projections(x)
        else:
            q = project("query", x[:, :1] if cls_only else x)
            k, v = project("key", x), project("value", x)
        if not is_16_bit(self.dtype):
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (cfg.head_dim**-0.5)
        else:
            # torch autocast's q @ kᵀ / √d: a 16-bit product divided in 16 bits, then float32 (mask, softmax);
            # float32 scores move 0.9 GB more per BERT-base step on an H100, and their backward is float32.
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=self.dtype) / math.sqrt(cfg.head_dim)
            scores = scores.astype(jnp.float32)
        # Equal to HF's additive finfo.min mask after rounding, but cannot overflow to -inf, so a
        # row with every key masked (an all-padding example) gets a uniform softmax, not NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(cfg.attention_probs_dropout_prob, self.dtype, self.rematerialised)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return context.reshape(*q.shape[:2], cfg.hidden_size)

    def _fused_projections(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The query, key and value products as one, [hidden, 3 * hidden] (16-bit compute).

        XLA merges the three forward products itself, but not their input gradients: three
        products, each rounded to 16 bits, and a float32 sum of them. One product's input gradient
        sums all three in its float32 accumulator (BERT-base's step: 176 kernels fewer scanned, 110
        unrolled, for 0.15 / 0.09 GB more, XLA writing that gradient in two layouts).
        """
        cfg = self.config
        y, bias = self._fused_product(x)
        y = _add_bias16(y, bias)
        y = y.reshape(*x.shape[:2], 3, cfg.num_attention_heads, cfg.head_dim)
        return y[:, :, 0], y[:, :, 1], y[:, :, 2]

    def _fused_product(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x times the [hidden, 3 * hidden] query/key/value kernel (16-bit), and the float32 bias."""
        cfg, names = self.config, ("query", "key", "value")
        kernels = [_DenseKernel(cfg.hidden_size, self.dtype, hf_normal_init(cfg), name=n)(x.shape[-1]) for n in names]
        bias = jnp.concatenate([self.variables["params"][n]["bias"] for n in names])
        return jax.lax.dot_general(x.astype(self.dtype), jnp.concatenate(kernels, axis=1), (((x.ndim - 1,), (0,)), ((), ()))), bias

    def _fused_attention(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
        """What the 16-bit path computes, in `attention16`'s kernels (the same values, bit for bit,
        in Pallas' interpreter; the same dropout masks, drawn with the key `Dropout` would draw)."""
        cfg = self.config
        y, bias = self._fused_product(x)
        rate = cfg.attention_probs_dropout_prob
        key = None if deterministic or rate == 0.0 else _DropoutKey(name="Dropout_0")()
        heads = 3 * cfg.num_attention_heads
        context = attention16(
            y.reshape(*x.shape[:2], heads, cfg.head_dim), bias.reshape(heads, cfg.head_dim), key_mask, key, rate,
            interpret=self.kernels == "pallas_interpreted",
        )  # fmt: skip
        return context.reshape(*x.shape[:2], cfg.hidden_size)


class _DropoutKey(nn.Module):
    """The key a `Dropout` module of this name draws its mask with (Flax derives it from the name)."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("dropout")


class _LayerNormParams(nn.Module):
    """`LayerNorm`'s parameters, for a caller that computes it itself."""

    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        return (
            self.param("scale", nn.initializers.ones, (features,), jnp.float32),
            self.param("bias", nn.initializers.zeros, (features,), jnp.float32),
        )


def float32_stream(x: Stream) -> jax.Array:
    """The residual stream's float32 values."""
    return x[0] if isinstance(x, tuple) else x


def _product_input(x: Stream) -> jax.Array:
    """What the next products read: the 16-bit copy a fused block wrote, else the float32 values
    (which the products cast where XLA fuses the cast, e.g. with the [CLS] row's slice)."""
    return x[1] if isinstance(x, tuple) else x


class BertResidualOutput(nn.Module):
    """HF's BertSelfOutput / BertOutput: dense, dropout, then LayerNorm of the residual sum.

    With the Pallas kernels (16 bits) all but the product is `residual_layer_norm16`'s kernel, which
    returns the float32 result and its 16-bit copy, the pair (a `Stream`) the next block reads.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> Stream:
        cfg = self.config
        if is_16_bit(self.dtype) and self.kernels != "xla":
            kernel = _DenseKernel(cfg.hidden_size, self.dtype, hf_normal_init(cfg), name="dense")(x.shape[-1])
            y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
            rate = cfg.hidden_dropout_prob
            key = None if deterministic or rate == 0.0 else _DropoutKey(name="Dropout_0")()
            scale, bias = _LayerNormParams(name="LayerNorm")(cfg.hidden_size)
            return residual_layer_norm16(
                y, self.variables["params"]["dense"]["bias"], residual, scale, bias, key, rate, cfg.layer_norm_eps,
                interpret=self.kernels == "pallas_interpreted",
            )  # fmt: skip
        x = dense(cfg, cfg.hidden_size, self.dtype, "dense")(x)
        x = dropout(cfg.hidden_dropout_prob, self.dtype, self.rematerialised)(x, deterministic=deterministic)
        # A compute-dtype branch plus the float32 stream: float32.
        return named_layer_norm(cfg, self.dtype, self.rematerialised)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: Stream, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False) -> Stream:
        context = BertSelfAttention(self.config, self.dtype, self.rematerialised, self.kernels, name="self")(
            _product_input(x), key_mask, deterministic=deterministic, cls_only=cls_only
        )
        residual = float32_stream(x)
        return BertResidualOutput(self.config, self.dtype, self.rematerialised, self.kernels, name="output")(
            context, residual[:, :1] if cls_only else residual, deterministic=deterministic
        )


def _activation16(name: str, y: jax.Array, bias: jax.Array) -> jax.Array:
    """The activation of 16-bit `y` + `bias` in float32, rounded once; its backward recomputes it from `y`."""
    return activation16(ACTIVATIONS[name], y, bias)


class BertIntermediate(nn.Module):
    """The feed-forward block's first half: dense, then the activation.

    `rematerialised`: the layer runs under `nn.remat`, whose backward pass recomputes the
    activation anyway; there the plain autodiff is used (`_activation16`'s barrier would only
    keep XLA from fusing the recomputation: +0.5 GB per scanned step).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if is_16_bit(self.dtype) and not self.rematerialised:
            kernel = _DenseKernel(cfg.intermediate_size, self.dtype, hf_normal_init(cfg), name="dense")(x.shape[-1])
            y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
            return _activation16(cfg.hidden_act, y, self.variables["params"]["dense"]["bias"])
        x = dense(cfg, cfg.intermediate_size, self.dtype, "dense")(x)
        # Evaluated in float32 and rounded once, as torch's GELU kernel does for bf16/fp16 input.
        return ACTIVATIONS[self.config.hidden_act](x.astype(jnp.float32)).astype(self.dtype)


def encoder_layer(
    config: BertConfig, dtype: Any, x: Stream, key_mask: jax.Array, deterministic: bool, cls_only: bool,
    rematerialised: bool = False, kernels: str = "xla",
) -> Stream:  # fmt: skip
    """One transformer layer's submodules, created in the calling module (BertLayer or a scanned one)."""
    x = BertAttention(config, dtype, rematerialised, kernels, name="attention")(x, key_mask, deterministic=deterministic, cls_only=cls_only)
    if rematerialised and is_16_bit(dtype):
        # Written out once: otherwise XLA recomputes the attention block's LayerNorm inside the
        # output block's, which then reads the layer's input (the scan's carry) while writing the
        # layer's output, and the new carry is copied (BERT-base's scanned step: 22 kernels fewer;
        # the copies' 0.55 GB go, most of it spent again on this array; eval: 36 copies -> 3).
        x = jax.lax.optimization_barrier(x)
    h = BertIntermediate(config, dtype, rematerialised, name="intermediate")(_product_input(x))
    return BertResidualOutput(config, dtype, rematerialised, kernels, name="output")(h, float32_stream(x), deterministic=deterministic)


class BertLayer(nn.Module):
    """One transformer layer; with `cls_only`, only the [CLS] row's output ([batch, 1, hidden])."""

    config: BertConfig
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: Stream, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False) -> Stream:
        return encoder_layer(self.config, self.dtype, x, key_mask, deterministic, cls_only, kernels=self.kernels)
