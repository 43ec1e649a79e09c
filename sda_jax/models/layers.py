"""One encoder layer of the BERT model and its parts, as the recipe computes them: `transformers`' (PyTorch) numerics.

`models.bert` assembles them (embeddings, the layer stack, pooler, heads). Parameters are float32;
`dtype` only sets the compute dtype, as torch autocast does: the products run in that dtype
(accumulating in float32) and add their bias in float32; LayerNorm, the residual stream it feeds
and the attention softmax stay float32. These are the reference blocks; each block is built
through the model's `Forms` (`models.forms`), which may put a form of the same block computing the
same values with less memory traffic in its place (`sda_jax.kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sda_jax.models.config import ACTIVATION_NAMES, BertConfig
from sda_jax.models.dropout import Dropout

Forms = Any  # a `models.forms.Forms`: how each block is computed (that module builds on this one)
Stream = Any  # `models.forms.Stream`: the residual stream between blocks

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF "gelu" is the exact erf form. jax.nn.gelu evaluates it as x/2 * erfc(-x/sqrt(2)); torch's
    # x/2 * (1 + erf(x/sqrt(2))) is faster on CPU in XLA but lands further from torch's updates
    # (XLA's and torch's erf round 1 + erf differently for negative x).
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
    the bias to bf16 and adds it there; here the product is widened to float32, the bias added,
    and the sum rounded once to the compute dtype (as cuBLAS adds torch's bias in its float32
    epilogue). In float32 this is exactly `nn.Dense`.
    """

    features: int
    dtype: Any
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.parameters(x.shape[-1])
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        return (y.astype(jnp.float32) + bias).astype(self.dtype)

    def parameters(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        """The float32 `kernel` [in, out] and `bias` (also for a form that takes the product itself)."""
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


def make_dense(config: BertConfig, features: int, dtype: Any, forms: Forms, name: str) -> nn.Module:
    return forms.dense(features, dtype, hf_normal_init(config), name=name)


def make_dropout(rate: float, forms: Forms, in_loop: bool = False) -> Dropout:
    """Dropout drawing its uniforms as `forms` says (`in_loop`: in the scan over layers)."""
    return Dropout(rate, forms.dropout_draws, in_loop)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """torch's LayerNorm of float32 `x`, two-pass variance: `LayerNorm`'s expression."""
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    normalised = centered * jax.lax.rsqrt(variance + epsilon)
    return normalised * scale + bias


class LayerNorm(nn.Module):
    """torch's LayerNorm, (x - mean) * rsqrt(var + eps) * scale + bias, in float32 (as under autocast).

    Params `scale`/`bias` as in `nn.LayerNorm`. Flax folds the scale into the normaliser,
    (x - mean) * (rsqrt(var + eps) * scale), a [batch, length, hidden] product that its backward
    pass keeps; scaling the normalised rows afterwards does not need it, and lands closer to
    torch's updates in the parity tests. The variance is two-pass, mean((x - mean)^2), as in torch.
    """

    epsilon: float
    rematerialised: bool = False  # in the scan over layers (a form may compute its backward pass there differently)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self.parameters(x.shape[-1])
        return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)

    def parameters(self, features: int) -> tuple[jax.Array, jax.Array]:
        return (
            self.param("scale", nn.initializers.ones, (features,), jnp.float32),
            self.param("bias", nn.initializers.zeros, (features,), jnp.float32),
        )


def layer_norm_for(config: BertConfig, forms: Forms, rematerialised: bool = False) -> nn.Module:
    # Its float32 output is the residual stream, as autocast keeps it: the next product casts.
    return forms.layer_norm(config.layer_norm_eps, rematerialised, name="LayerNorm")


class BertSelfAttention(nn.Module):
    config: BertConfig
    forms: Forms
    dtype: Any = jnp.float32
    rematerialised: bool = False  # the body of the scan over layers

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        """Attention of every row of `x` ([batch, 1, hidden] of the [CLS] row alone if `cls_only`)."""
        q, k, v = self.projections(x, cls_only)
        return self.attend(q, k, v, key_mask, deterministic)

    def projections(self, x: jax.Array, cls_only: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Query (of the [CLS] row alone if `cls_only`), key and value, [batch, rows, heads, head_dim]."""
        cfg = self.config

        def project(name: str, inputs: jax.Array) -> jax.Array:
            y = make_dense(cfg, cfg.hidden_size, self.dtype, self.forms, name)(inputs)
            return y.reshape(*inputs.shape[:2], cfg.num_attention_heads, cfg.head_dim)

        q = project("query", x[:, :1] if cls_only else x)
        return q, project("key", x), project("value", x)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        if jnp.dtype(self.dtype) == jnp.float32:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (cfg.head_dim**-0.5)
        else:
            # torch autocast's q @ kᵀ / √d: a 16-bit product divided in 16 bits, then float32 (mask, softmax).
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=self.dtype) / math.sqrt(cfg.head_dim)
            scores = scores.astype(jnp.float32)
        # Equal to HF's additive finfo.min mask after rounding, but cannot overflow to -inf, so a
        # row with every key masked (an all-padding example) gets a uniform softmax, not NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = make_dropout(cfg.attention_probs_dropout_prob, self.forms, self.rematerialised)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return context.reshape(*q.shape[:2], cfg.hidden_size)


class BertResidualOutput(nn.Module):
    """HF's BertSelfOutput / BertOutput: dense, dropout, then LayerNorm of the residual sum."""

    config: BertConfig
    forms: Forms
    dtype: Any = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> Stream:
        cfg = self.config
        x = make_dense(cfg, cfg.hidden_size, self.dtype, self.forms, "dense")(x)
        x = make_dropout(cfg.hidden_dropout_prob, self.forms, self.rematerialised)(x, deterministic=deterministic)
        # A compute-dtype branch plus the float32 stream: float32.
        return layer_norm_for(cfg, self.forms, self.rematerialised)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    forms: Forms
    dtype: Any = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: Stream, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False) -> Stream:
        forms = self.forms
        context = forms.self_attention(self.config, forms, self.dtype, self.rematerialised, name="self")(
            forms.product_input(x), key_mask, deterministic=deterministic, cls_only=cls_only
        )
        residual = forms.float32(x)
        return forms.residual_output(self.config, forms, self.dtype, self.rematerialised, name="output")(
            context, residual[:, :1] if cls_only else residual, deterministic=deterministic
        )


class BertIntermediate(nn.Module):
    """The feed-forward block's first half: dense, then the activation."""

    config: BertConfig
    forms: Forms
    dtype: Any = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = make_dense(cfg, cfg.intermediate_size, self.dtype, self.forms, "dense")(x)
        # Evaluated in float32 and rounded once, as torch's GELU kernel does for bf16/fp16 input.
        return ACTIVATIONS[cfg.hidden_act](x.astype(jnp.float32)).astype(self.dtype)


def encoder_layer(
    config: BertConfig, forms: Forms, dtype: Any, x: Stream, key_mask: jax.Array, deterministic: bool, cls_only: bool,
    rematerialised: bool = False,
) -> Stream:  # fmt: skip
    """One transformer layer's submodules, created in the calling module (BertLayer or a scanned one)."""
    x = BertAttention(config, forms, dtype, rematerialised, name="attention")(
        x, key_mask, deterministic=deterministic, cls_only=cls_only
    )
    x = forms.after_attention(x, rematerialised)
    h = forms.intermediate(config, forms, dtype, rematerialised, name="intermediate")(forms.product_input(x))
    return forms.residual_output(config, forms, dtype, rematerialised, name="output")(
        h, forms.float32(x), deterministic=deterministic
    )


class BertLayer(nn.Module):
    """One transformer layer; with `cls_only`, only the [CLS] row's output ([batch, 1, hidden])."""

    config: BertConfig
    forms: Forms
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Stream, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False) -> Stream:
        return encoder_layer(self.config, self.forms, self.dtype, x, key_mask, deterministic, cls_only)
