"""A residual block's end in 16-bit models as one GPU kernel per pass (Pallas, Triton): bias, dropout, residual sum, LayerNorm.

`residual_layer_norm16(y, dense_bias, residual, scale, bias, key, rate, epsilon)` is what
`layers.BertResidualOutput` computes after its product `y` (16-bit, [tokens, hidden], its bias not
yet added), op for op: the bias added in float32 and rounded (`sixteen_bit.add_bias16`), dropout
(the mask of `dropout.uint16_halves`, per element, bit for bit), the float32 sum with the residual
stream and torch's LayerNorm of it in float32 (`sixteen_bit.layer_norm`). It returns the float32
output (the next block's residual) and its 16-bit copy (what the next products read).

XLA writes the biased product, the dropout's result, the residual sum and the copy in separate
kernels and, in the backward pass, splits the LayerNorm's gradient into ~6 passes over float32
[tokens, hidden] arrays (its row sums, its input gradient, the scale and bias gradients' column
sums, the two gradient paths' sum, the dropout's select and division). Here a program per block of
rows reads the product and the residual once per pass: the forward writes the two outputs, the
backward (which recomputes the forward) writes the residual's and the product's gradients and
per-block partial column sums of the LayerNorm's scale and bias gradients, which XLA adds up
(float32 sums of the same values as autodiff's, in another order). The rest of the backward is
autodiff's, op for op (`jax.vjp` of the same expression inside the kernel); the product's bias
gradient is `add_bias16`'s float32 sum of the product's gradient the kernel wrote.

The hidden size need not be a power of two: rows are padded inside the kernel (masked loads; the
padding is kept out of the row sums). `interpret=True` runs the kernels in Pallas' interpreter
(any platform: the tests, on a CPU), where rows are not padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from sda_jax.kernels.dropout_counters import kept_in_kernel
from sda_jax.kernels.sixteen_bit import float32_column_sums

ROWS = 8  # rows per program: [8, 1024] float32 tiles, 32 values per thread and array at 8 warps (not tuned on a GPU)


def _keep(key_ref, first_row, rows: int, padded: int, hidden: int, rate: float):
    """`Dropout(rate, per_element_draws=True)`'s mask on [tokens, hidden] for these rows: element
    (t, c) draws with the counter t · ceil(hidden / 2) + c // 2."""
    token = jax.lax.broadcasted_iota(jnp.uint32, (rows, padded), 0) + first_row.astype(jnp.uint32)
    column = jax.lax.broadcasted_iota(jnp.uint32, (rows, padded), 1)
    counter = (column >> np.uint32(1)) + token * np.uint32(-(-hidden // 2))
    return kept_in_kernel(key_ref[0], key_ref[1], counter, column, rate)


def _block(rows: int, padded: int, tokens: int, hidden: int):
    """This program's first row, its columns' validity and the [rows, padded] load mask."""
    first = pl.program_id(0) * rows
    row_ok = (first + jnp.arange(rows)) < tokens
    column_ok = jnp.arange(padded) < hidden
    return first, column_ok, row_ok[:, None] & column_ok[None, :]


def _function(z16, residual, scale, bias, keep, column_ok, *, hidden, rate, epsilon):
    """The block's expression from the biased product: dropout, residual sum, LayerNorm (padding
    columns are zero and left out of the row sums; `keep` None: no dropout)."""
    # z16 / (1 - rate) in 16 bits: by the divisor rounded to 16 bits, in float32, the quotient
    # rounded (Triton has no 16-bit division). XLA:CPU divides bf16 so; float16 it multiplies by
    # the float16 reciprocal instead, which is one float16 ulp away for ~13% of the elements.
    divisor = float(np.asarray(1.0 - rate, z16.dtype))
    scaled = (z16.astype(jnp.float32) / divisor).astype(z16.dtype)
    dropped = z16 if keep is None else jnp.where(keep, scaled, jnp.zeros_like(z16))
    x = dropped.astype(jnp.float32) + residual
    centered = jnp.where(column_ok[None, :], x - jnp.sum(x, axis=-1, keepdims=True) / hidden, 0.0)
    variance = jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / hidden
    return centered * jax.lax.rsqrt(variance + epsilon) * scale[None, :] + bias[None, :]


def _inputs(y_ref, dense_bias_ref, residual_ref, scale_ref, bias_ref, key_ref, *, rows, padded, tokens, hidden, rate, dtype, **_):
    """This program's block: its index, masks, the biased 16-bit product, the residual, the
    LayerNorm's scale and bias, and the dropout mask (None without dropout)."""
    first, column_ok, mask = _block(rows, padded, tokens, hidden)
    # Indices, masked, not slices (pl.ds): jax >= 0.12 refuses a slice past the array's end.
    block = ((first + jnp.arange(rows))[:, None], jnp.arange(padded)[None, :])
    vector = lambda ref: pallas_triton.load(ref.at[jnp.arange(padded)], mask=column_ok, other=0.0)
    y = pallas_triton.load(y_ref.at[block], mask=mask, other=0.0)
    z16 = (y.astype(jnp.float32) + vector(dense_bias_ref)[None, :]).astype(dtype)  # add_bias16
    residual = pallas_triton.load(residual_ref.at[block], mask=mask, other=0.0)
    keep = _keep(key_ref, first, rows, padded, hidden, rate) if rate > 0 else None
    return block, mask, column_ok, z16, residual, vector(scale_ref), vector(bias_ref), keep


def _forward_kernel(y_ref, dense_bias_ref, residual_ref, scale_ref, bias_ref, key_ref, out_ref, out16_ref, **shape):
    block, mask, column_ok, z16, residual, scale, bias, keep = _inputs(
        y_ref, dense_bias_ref, residual_ref, scale_ref, bias_ref, key_ref, **shape
    )
    out = _function(z16, residual, scale, bias, keep, column_ok, hidden=shape["hidden"], rate=shape["rate"], epsilon=shape["epsilon"])
    pallas_triton.store(out_ref.at[block], out, mask=mask)
    pallas_triton.store(out16_ref.at[block], out.astype(shape["dtype"]), mask=mask)


def _backward_kernel(
    y_ref, dense_bias_ref, residual_ref, scale_ref, bias_ref, key_ref, g_ref, g16_ref,
    dz_ref, d_residual_ref, d_scale_ref, d_bias_ref, **shape,
):  # fmt: skip
    block, mask, column_ok, z16, residual, scale, bias, keep = _inputs(
        y_ref, dense_bias_ref, residual_ref, scale_ref, bias_ref, key_ref, **shape
    )
    # The output's two uses' gradients, summed as autodiff sums them (the copy's in float32).
    g = pallas_triton.load(g_ref.at[block], mask=mask, other=0.0)
    g = g + pallas_triton.load(g16_ref.at[block], mask=mask, other=0.0).astype(jnp.float32)
    function = functools.partial(
        _function, keep=keep, column_ok=column_ok, hidden=shape["hidden"], rate=shape["rate"], epsilon=shape["epsilon"]
    )
    _, vjp = jax.vjp(function, z16, residual, scale, bias)
    dz, d_residual, d_scale, d_bias = vjp(g)  # the last two: this block's column sums
    pallas_triton.store(dz_ref.at[block], dz, mask=mask)
    pallas_triton.store(d_residual_ref.at[block], d_residual, mask=mask)
    part = (pl.program_id(0), jnp.arange(shape["padded"]))
    pallas_triton.store(d_scale_ref.at[part], d_scale, mask=column_ok)
    pallas_triton.store(d_bias_ref.at[part], d_bias, mask=column_ok)


def _tiling(tokens: int, hidden: int, interpret: bool) -> tuple[int, int]:
    """Rows per program and the padded row width. The interpreter takes every row in one program,
    unpadded: XLA:CPU rounds a LayerNorm of a block of rows differently from one of the whole
    array (its loops vectorise by shape), and the tests compare with the whole array's."""
    return (tokens, hidden) if interpret else (ROWS, 1 << (hidden - 1).bit_length())


def _call(kernel, inputs, out_shape, rate: float, epsilon: float, interpret: bool):
    y = inputs[0]
    tokens, hidden = y.shape
    rows, padded = _tiling(tokens, hidden, interpret)
    shape = {
        "rows": rows, "padded": padded, "tokens": tokens,
        "hidden": hidden, "rate": rate, "epsilon": epsilon, "dtype": y.dtype,
    }  # fmt: skip
    compiler_params = None if interpret else pallas_triton.CompilerParams(num_warps=8, num_stages=1)
    return pl.pallas_call(
        functools.partial(kernel, **shape), grid=(pl.cdiv(tokens, rows),), out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params,
    )(*inputs)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _residual_layer_norm(y, dense_bias, residual, scale, bias, key_data, rate, epsilon, interpret):
    out_shape = (jax.ShapeDtypeStruct(y.shape, jnp.float32), jax.ShapeDtypeStruct(y.shape, y.dtype))
    return _call(_forward_kernel, (y, dense_bias, residual, scale, bias, key_data), out_shape, rate, epsilon, interpret)


def _residual_layer_norm_fwd(y, dense_bias, residual, scale, bias, key_data, rate, epsilon, interpret):
    outputs = _residual_layer_norm(y, dense_bias, residual, scale, bias, key_data, rate, epsilon, interpret)
    return outputs, (y, dense_bias, residual, scale, bias, key_data)


def _residual_layer_norm_bwd(rate, epsilon, interpret, inputs, cotangents):
    y = inputs[0]
    g, g16 = cotangents
    parts = jax.ShapeDtypeStruct((pl.cdiv(y.shape[0], _tiling(*y.shape, interpret)[0]), y.shape[1]), jnp.float32)
    out_shape = (jax.ShapeDtypeStruct(y.shape, y.dtype), jax.ShapeDtypeStruct(y.shape, jnp.float32), parts, parts)
    dz, d_residual, d_scale, d_bias = _call(_backward_kernel, (*inputs, g, g16), out_shape, rate, epsilon, interpret)
    # The product's bias gradient as `sixteen_bit.add_bias16`'s: summed in the kernel, XLA:CPU
    # (the interpreter) would drop the 16-bit rounding of the values it sums.
    return dz, float32_column_sums(dz), d_residual, jnp.sum(d_scale, axis=0), jnp.sum(d_bias, axis=0), None


_residual_layer_norm.defvjp(_residual_layer_norm_fwd, _residual_layer_norm_bwd)


def residual_layer_norm16(
    y: jax.Array, dense_bias: jax.Array, residual: jax.Array, scale: jax.Array, bias: jax.Array,
    key: jax.Array | None, rate: float, epsilon: float, *, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """LayerNorm(residual + dropout(y + dense_bias)) of 16-bit `y` ([..., hidden], a product before
    its float32 bias) and the float32 `residual`, with float32 `scale` and `bias`; dropout with
    `rate` drawn from `key` (a threefry2x32 key; None: no dropout). Returns the float32 result and
    its 16-bit copy."""
    key_data = jnp.zeros(2, jnp.uint32) if key is None else jax.random.key_data(key).astype(jnp.uint32)
    hidden = y.shape[-1]
    out, out16 = _residual_layer_norm(
        y.reshape(-1, hidden), dense_bias, residual.reshape(-1, hidden).astype(jnp.float32), scale, bias, key_data,
        float(rate) if key is not None else 0.0, float(epsilon), interpret,
    )  # fmt: skip
    return out.reshape(y.shape), out16.reshape(y.shape)
