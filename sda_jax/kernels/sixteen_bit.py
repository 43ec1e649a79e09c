"""Backward passes written out for 16-bit models, so that XLA moves less memory on a GPU.

Each function computes what the plain expression in `sda_jax.models.layers` computes, forward op
for op, and the same gradients: autodiff's own, or the same values summed in float32 in another
order. Only what the backward pass reads and writes changes. Float32 models (the CPU path, the
reference the parity tests measure) use none of them. What each saves on BERT-base's train step
for an H100: benchmarks/RESULTS.md, the deviceless rows of the 16-bit forms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sda_jax.models.layers import layer_norm


@jax.custom_vjp
def add_bias16(y: jax.Array, bias: jax.Array) -> jax.Array:
    """(y + bias) in float32, rounded once to y's 16-bit dtype; its bias gradient is a float32 sum.

    Autodiff of the same expression sums the bias gradient over a float32 copy of the incoming
    bf16 gradient, which XLA writes out and reads back ([tokens, 3072] for the feed-forward
    layer). Here the sum is a product with a row of ones that accumulates in float32: the same
    bf16 values summed in float32, read once.
    """
    return (y.astype(jnp.float32) + bias).astype(y.dtype)


def _add_bias16_fwd(y: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    return add_bias16(y, bias), None


def _add_bias16_bwd(_: None, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return g, float32_column_sums(g)


def float32_column_sums(g: jax.Array) -> jax.Array:
    """The sum of 16-bit `g` over every axis but the last, in float32: a product with a row of
    ones that accumulates in float32, reading `g` once (a bias gradient)."""
    rows = list(range(g.ndim - 1))
    ones = jnp.ones(g.shape[:-1], g.dtype)
    return jnp.einsum(ones, rows, g, [*rows, g.ndim - 1], [g.ndim - 1], preferred_element_type=jnp.float32)


add_bias16.defvjp(_add_bias16_fwd, _add_bias16_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def activation16(fn: Callable[[jax.Array], jax.Array], y: jax.Array, bias: jax.Array) -> jax.Array:
    """`fn` of `add_bias16(y, bias)` (16-bit `y`, a product before its bias), evaluated in float32
    and rounded once, whose backward pass recomputes it from `y`.

    Autodiff of the same function keeps its float32 intermediates (GELU's input and erfc, 2 ×
    [tokens, 3072] float32 per layer) from the forward pass to the backward; recomputing them
    from the bf16 input, which the backward reads anyway, moves less. The product `y`, not the
    biased value, is what is kept: the product's kernel writes it anyway, the biased value would
    be one more [tokens, 3072] array written per layer. The gradients are autodiff's, op for op, and the bias
    gradient is `add_bias16`'s.
    """
    return fn(add_bias16(y, bias).astype(jnp.float32)).astype(y.dtype)


def _activation16_fwd(fn, y, bias):
    return activation16(fn, y, bias), (y, bias)


def _activation16_bwd(fn, residuals, g):
    # Without the barrier XLA merges the recomputation with the forward pass's, and keeps its
    # float32 results alive until here again.
    y, bias = jax.lax.optimization_barrier(residuals)
    u = add_bias16(y, bias)
    _, vjp = jax.vjp(fn, u.astype(jnp.float32))
    du = vjp(g.astype(jnp.float32))[0].astype(u.dtype)
    return du, float32_column_sums(du)


activation16.defvjp(_activation16_fwd, _activation16_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm16(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """`models.layers.layer_norm` (float32 `x`, the residual stream of a 16-bit model) whose input gradient is
    written to memory once, for a rematerialised layer.

    Under `nn.remat` the backward pass recomputes the LayerNorm's input from the saved products
    (a dropout, a residual sum and the previous LayerNorm), and XLA copies that recomputation,
    with the row sums of the backward, into each of the four kernels that read the input
    gradient. Behind a barrier the gradient is computed once and read. Without remat the barrier only
    blocks fusion, so unrolled layers do not use this. The gradients are autodiff's, op for op.
    A closed-form backward (two row sums in one pass, then dx) moves exactly as much as
    autodiff's without the barrier: XLA simplifies autodiff's to the same kernels.
    """
    return layer_norm(x, scale, bias, epsilon)


def _layer_norm16_fwd(x, scale, bias, epsilon):
    return layer_norm(x, scale, bias, epsilon), (x, scale, bias)


def _layer_norm16_bwd(epsilon, residuals, g):
    _, vjp = jax.vjp(lambda x, scale, bias: layer_norm(x, scale, bias, epsilon), *residuals)
    dx, dscale, dbias = vjp(g)
    return jax.lax.optimization_barrier(dx), dscale, dbias


layer_norm16.defvjp(_layer_norm16_fwd, _layer_norm16_bwd)
