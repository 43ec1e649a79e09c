"""The fused attention kernels (`sda_jax/kernels/fused_attention.py`), in Pallas' interpreter on the CPU,
against the 16-bit model's XLA expression: the same values and gradients bit for bit, with the
same dropout masks. The model with them: tests/kernels/test_pallas_kernels.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax.kernels import fused_attention
from sda_jax.kernels.dropout_counters import per_element_halves
from sda_jax.kernels.sixteen_bit import add_bias16


def xla_attention(y, bias, key_mask, key, rate):
    """`layers.BertSelfAttention`'s 16-bit expression, from the fused product on."""
    batch, length, three_heads, head_dim = y.shape
    qkv = add_bias16(y.reshape(batch, length, -1), bias.reshape(-1)).reshape(batch, length, 3, three_heads // 3, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=y.dtype) / math.sqrt(head_dim)
    scores = jnp.where(key_mask[:, None, None, :], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if key is not None:
        keep = per_element_halves(key, probs.shape) >= np.uint32(round(rate * 65536))
        probs = jnp.where(keep, probs / (1.0 - rate), jnp.zeros_like(probs))
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(y.dtype), v)


def _xla_values_and_gradients(y, bias, key_mask, key, upstream):
    """`xla_attention` and its vjp of `upstream`, compiled as one program whose 16-bit products
    accumulate in float32 and are rounded once, as the expression means (torch autocast, XLA:GPU).

    XLA:CPU of jaxlib 0.11 does not widen to float32 some bf16 × bf16 → bf16 products that it
    would hand to YNNPACK (the default xla_cpu_experimental_ynn_fusion_type includes individual
    dots), and computes them with every product and partial sum rounded to bf16: here autodiff's
    g · vᵀ and dsᵀ · q, 40% of the input gradients a few bf16 ulps away from the expression's
    (jaxlib 0.10 computes the same dots in float32). Without YNNPACK's dots XLA:CPU computes
    them in float32 in both versions.
    """

    def values_and_gradients(y, b, upstream):
        want, vjp = jax.vjp(lambda y, b: xla_attention(y, b, key_mask, key, 0.1), y, b)
        return want, vjp(upstream)

    options = {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else None
    return jax.jit(values_and_gradients, compiler_options=options)(y, bias, upstream)


def _inputs(length: int, dtype=jnp.bfloat16, batch: int = 3, heads: int = 2, head_dim: int = 16):
    rng = np.random.default_rng(length)
    y = jnp.asarray(rng.normal(size=(batch, length, 3 * heads, head_dim)), dtype)
    bias = jnp.asarray(0.1 * rng.normal(size=(3 * heads, head_dim)), jnp.float32)
    # Full, partly padded, and every key masked (an all-padding example: a uniform softmax).
    key_mask = jnp.asarray(np.arange(length)[None, :] < np.array([[length], [length - 3], [0]]))
    upstream = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
    return y, bias, key_mask, upstream


@pytest.mark.parametrize("length", [8, 12])  # 12: padded to 16 inside the kernels
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernels_compute_the_xla_expression_bit_for_bit(length, dropout, dtype):
    y, bias, key_mask, upstream = _inputs(length, dtype)
    key = jax.random.key(3) if dropout else None
    want, want_grads = _xla_values_and_gradients(y, bias, key_mask, key, upstream)
    got, got_vjp = jax.vjp(lambda y, b: fused_attention.attention16(y, b, key_mask, key, 0.1, interpret=True), y, bias)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for got_grad, want_grad in zip(got_vjp(upstream), want_grads, strict=True):
        assert got_grad.dtype == want_grad.dtype
        got_grad, want_grad = np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32)
        assert np.abs(want_grad).max() > 0
        # The key gradient contracts a [key, query] form of the score gradient that the kernel
        # computes as such (see `fused_attention._keep`); XLA:CPU fuses its float32 products and
        # sums another way than the [query, key] one's, which can round one value in a few
        # thousand to the neighbouring 16-bit number (and the bias gradient, its float32 sum, by as
        # much). Everything else is bit for bit.
        ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(want_grad), 1e-30))) - jnp.finfo(dtype).nmant)
        moved = got_grad != want_grad
        assert moved.sum() <= max(1, 1e-3 * moved.size) and np.all(np.abs(got_grad - want_grad)[moved] <= ulp.max())
    if dropout:  # the masks are drawn: another key gives another context
        other = fused_attention.attention16(y, bias, key_mask, jax.random.key(4), 0.1, interpret=True)
        assert not np.array_equal(np.asarray(other, np.float32), np.asarray(got, np.float32))


@pytest.mark.api_surface
def test_kernels_on_the_model_axis():
    """vmapped over models (each with its own key), as a sweep's step runs them."""
    y, bias, key_mask, _ = _inputs(8)
    ys, biases = jnp.stack([y, y[::-1]]), jnp.stack([bias, -bias])
    keys = jax.random.split(jax.random.key(1), 2)
    run = lambda f: jax.vmap(lambda y, b, k: f(y, b, key_mask, k, 0.1))(ys, biases, keys)
    got = run(lambda *a: fused_attention.attention16(*a, interpret=True))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(run(xla_attention), np.float32))
