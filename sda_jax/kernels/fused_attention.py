"""Self-attention of 16-bit models as one GPU kernel per pass (Pallas, Triton), with the model's dropout.

`attention16(y, bias, key_mask, key, rate)` is what `layers.BertSelfAttention` computes from the
fused query/key/value product `y` ([batch, length, 3 · heads, head_dim], bias not yet added) in
16-bit compute, op for op: the bias added in float32 and rounded, q·kᵀ a 16-bit product divided
by √d in 16 bits, the key mask and softmax in float32, dropout on the probabilities (the mask of
`dropout.uint16_halves`, per element, bit for bit) and the context a 16-bit product. XLA writes
each of those steps' results to memory and reads them back (the scores, the probabilities, their
dropout, the query/key/value split into the products' layouts), in the forward pass, again in the
rematerialised forward and in the backward; here a program per (example, head) keeps its
[length, length] scores in registers and reads q, k and v where the product wrote them.

The backward pass recomputes the forward from `y` and returns autodiff's gradients of the same
expression, rounding for rounding (16-bit products accumulated in float32; the bias gradient the
float32 sum of `sixteen_bit.add_bias16`), but for a rare one-ulp move of the key gradient, whose
[key, query] operand is computed as such (`_keep`). Lengths that are not a power of two are padded inside
the kernel (masked loads: Triton's blocks are powers of two); the head dimension must be one.
`interpret=True` runs the kernels in Pallas' interpreter (any platform: the tests, on a CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from sda_jax.kernels.dropout_counters import kept_in_kernel
from sda_jax.kernels.sixteen_bit import float32_column_sums

_MIN = float(jnp.finfo(jnp.float32).min)
MAX_LENGTH = 128  # a program holds [length, length] float32 tiles in registers: longer inputs take XLA's ops


def _dot(a, b, trans_b: bool = False):
    """a · b (a · bᵀ with `trans_b`) of 16-bit [n, n] tiles, accumulated and returned in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1 if trans_b else 0,)), ((), ())), preferred_element_type=jnp.float32)


def _keep(key_ref, b, h, heads: int, length: int, padded: int, rate: float, transposed: bool = False):
    """The dropout mask of example b, head h: `Dropout(rate, per_element_draws=True)` on
    [batch, heads, length, length] keeps these elements ([padded, padded], [query, key], or
    [key, query] if `transposed`; the padding's is unused).

    The transposed mask is hashed as such, not transposed: Triton's transpose folding pushes a
    transpose through the whole hash, whose shared values it copies until the compile runs out of
    memory (a deviceless H100 compile of the backward kernel: > 7 GB and 10 minutes, unfinished).
    """
    rows = jax.lax.broadcasted_iota(jnp.uint32, (padded, padded), 1 if transposed else 0)
    cols = jax.lax.broadcasted_iota(jnp.uint32, (padded, padded), 0 if transposed else 1)
    draws = -(-length // 2)
    base = (b.astype(jnp.uint32) * np.uint32(heads) + h.astype(jnp.uint32)) * np.uint32(length * draws)
    counter = (cols >> np.uint32(1)) + rows * np.uint32(draws) + base
    return kept_in_kernel(key_ref[0], key_ref[1], counter, cols, rate)


def _forward_values(y_ref, bias_ref, mask_ref, key_ref, *, heads, length, padded, head_dim, rate, dtype):
    """q, k, v and the probabilities after dropout (16-bit, and float32 p and the mask) of this program's (b, h)."""
    b, h = pl.program_id(0), pl.program_id(1)
    rows = jnp.arange(padded) < length
    # Indices, masked, not slices (pl.ds(0, padded)): jax >= 0.12 refuses a slice past the array's end.
    tokens, columns = jnp.arange(padded), jnp.arange(head_dim)[None, :]

    def load(j):  # q, k or v of head h: the product's bf16 values, the bias added in float32 and rounded
        part = pallas_triton.load(y_ref.at[b, tokens[:, None], j * heads + h, columns], mask=rows[:, None], other=0.0)
        bias = bias_ref[j * heads + h, :]
        return (part.astype(jnp.float32) + bias[None, :]).astype(dtype)

    q, k, v = load(0), load(1), load(2)
    scores = _dot(q, k, trans_b=True).astype(dtype)
    scores = (scores.astype(jnp.float32) / math.sqrt(head_dim)).astype(dtype).astype(jnp.float32)
    key_ok = (pallas_triton.load(mask_ref.at[b, tokens], mask=rows, other=0) != 0)[None, :]
    scores = jnp.where(key_ok, scores, _MIN)
    scores = jnp.where(rows[None, :], scores, -jnp.inf)  # the padding's keys: no weight at all
    unnormalised = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    probs = unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)
    keep = _keep(key_ref, b, h, heads, length, padded, rate) if rate > 0 else None
    dropped = probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0.0)
    return q, k, v, probs, keep, key_ok, dropped.astype(dtype)


def _forward_kernel(y_ref, bias_ref, mask_ref, key_ref, out_ref, **shape):
    b, h = pl.program_id(0), pl.program_id(1)
    padded, length = shape["padded"], shape["length"]
    _, _, v, _, _, _, dropped = _forward_values(y_ref, bias_ref, mask_ref, key_ref, **shape)
    context = _dot(dropped, v).astype(shape["dtype"])
    tokens, columns = jnp.arange(padded)[:, None], jnp.arange(shape["head_dim"])[None, :]
    pallas_triton.store(out_ref.at[b, tokens, h, columns], context, mask=(jnp.arange(padded) < length)[:, None])


def _backward_kernel(y_ref, bias_ref, mask_ref, key_ref, g_ref, dy_ref, **shape):
    b, h = pl.program_id(0), pl.program_id(1)
    heads, padded, length, rate, dtype = shape["heads"], shape["padded"], shape["length"], shape["rate"], shape["dtype"]
    q, k, v, probs, keep, key_ok, _ = _forward_values(y_ref, bias_ref, mask_ref, key_ref, **shape)
    rows = jnp.arange(padded) < length
    tokens, columns = jnp.arange(padded)[:, None], jnp.arange(shape["head_dim"])[None, :]
    g = pallas_triton.load(g_ref.at[b, tokens, h, columns], mask=rows[:, None], other=0.0)
    # Autodiff's transposes of the forward, in its order and dtypes. The products that contract
    # over the queries (dv, dk) take [key, query] operands computed as such (see `_keep`): the
    # same values as the [query, key] ones, element for element.
    probs_t = probs.T
    keep_t = _keep(key_ref, b, h, heads, length, padded, rate, transposed=True) if rate > 0 else None
    dropped_t = (probs_t if keep_t is None else jnp.where(keep_t, probs_t / (1.0 - rate), 0.0)).astype(dtype)
    dv = _dot(dropped_t, g).astype(dtype)

    d_dropped = _dot(g, v, trans_b=True).astype(dtype).astype(jnp.float32)
    d_probs = d_dropped if keep is None else jnp.where(keep, d_dropped / (1.0 - rate), 0.0)
    weighted = probs * d_probs
    row_sum = jnp.sum(weighted, axis=-1)
    d_scores = weighted - probs * row_sum[:, None]
    d_dropped_t = _dot(v, g, trans_b=True).astype(dtype).astype(jnp.float32)
    d_probs_t = d_dropped_t if keep_t is None else jnp.where(keep_t, d_dropped_t / (1.0 - rate), 0.0)
    d_scores_t = probs_t * d_probs_t - probs_t * row_sum[None, :]
    scale = lambda d, ok: (jnp.where(ok, d, 0.0).astype(dtype).astype(jnp.float32) / math.sqrt(shape["head_dim"])).astype(dtype)
    dq = _dot(scale(d_scores, key_ok), k).astype(dtype)
    dk = _dot(scale(d_scores_t, key_ok[0][:, None]), q).astype(dtype)
    for j, grad in enumerate((dq, dk, dv)):
        pallas_triton.store(dy_ref.at[b, tokens, j * heads + h, columns], grad, mask=rows[:, None])


def _call(kernel, y, bias, key_mask, key_data, extra, out_shape, rate: float, interpret: bool):
    batch, length, three_heads, head_dim = y.shape
    shape = {
        "heads": three_heads // 3, "length": length, "padded": max(16, 1 << (length - 1).bit_length()),
        "head_dim": head_dim, "rate": rate, "dtype": y.dtype,
    }  # fmt: skip
    compiler_params = None
    if not interpret:
        # 8 warps from 64 tokens: each thread then holds 16 values of a [64, 64] tile (not tuned on a GPU).
        compiler_params = pallas_triton.CompilerParams(num_warps=8 if shape["padded"] >= 64 else 4, num_stages=1)
    return pl.pallas_call(
        functools.partial(kernel, **shape), grid=(batch, shape["heads"]), out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params,
    )(y, bias, key_mask.astype(jnp.int32), key_data, *extra)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(y, bias, key_mask, key_data, rate, interpret):
    batch, length, three_heads, head_dim = y.shape
    out = jax.ShapeDtypeStruct((batch, length, three_heads // 3, head_dim), y.dtype)
    return _call(_forward_kernel, y, bias, key_mask, key_data, (), out, rate, interpret)


def _attention_fwd(y, bias, key_mask, key_data, rate, interpret):
    return _attention(y, bias, key_mask, key_data, rate, interpret), (y, bias, key_mask, key_data)


def _attention_bwd(rate, interpret, residuals, g):
    y, bias, key_mask, key_data = residuals
    dy = _call(_backward_kernel, y, bias, key_mask, key_data, (g,), jax.ShapeDtypeStruct(y.shape, y.dtype), rate, interpret)
    # The bias gradient as `sixteen_bit.add_bias16`'s.
    d_bias = float32_column_sums(dy.reshape(*dy.shape[:2], -1)).reshape(bias.shape).astype(bias.dtype)
    return dy, d_bias, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention16(
    y: jax.Array, bias: jax.Array, key_mask: jax.Array, key: jax.Array | None, rate: float, *, interpret: bool = False
) -> jax.Array:
    """The context [batch, length, heads, head_dim] of the fused query/key/value product `y`
    ([batch, length, 3 · heads, head_dim], 16-bit) plus `bias` ([3 · heads, head_dim], float32),
    attending to the keys where `key_mask` ([batch, length]) is true, dropout with `rate` drawn
    from `key` (a threefry2x32 key; None with rate 0: no dropout)."""
    key_data = jnp.zeros(2, jnp.uint32) if key is None else jax.random.key_data(key).astype(jnp.uint32)
    return _attention(y, bias, key_mask, key_data, float(rate) if key is not None else 0.0, interpret)
