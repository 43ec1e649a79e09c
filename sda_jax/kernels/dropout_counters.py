"""Dropout's uniforms drawn per element, where they are applied: a memory form of `models.dropout`.

`models.dropout.uint16_halves` draws 32-bit words whole and splits them, so the mask is an array
that XLA writes to memory and reads back where it is applied. Here every element hashes its own
draw's counter (the two elements that share a draw hash it twice): the same bits, but the mask is
an elementwise function of the position, which XLA fuses into the kernel applying it. The
hand-written kernels draw their masks the same way (`kept_in_kernel`). Float32 models keep the
draws whole: XLA:CPU fuses the two forms differently, which moves float32 results by rounding.
What each form moves: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sda_jax.models.dropout import kept, partitionable_threefry, threefry_hash, threefry_words, uint16_halves


def per_element_halves(key: jax.Array, shape: Sequence[int], in_loop: bool = False) -> jax.Array:
    """`uint16_halves(key, shape)`, each element computing its own: its draw's counter hashed
    (`threefry_bits`' bits, element by element) and its half taken (threefry2x32 keys; other
    generators take the draws whole). `in_loop`: drawn in the body of a loop whose iterations draw
    with different keys (the scan over layers); the counters are then made to depend on the key,
    so that XLA does not hoist them out of the loop."""
    *leading, last = shape
    draws = -(-last // 2)
    if not (str(jax.random.key_impl(key)) == "threefry2x32" and partitionable_threefry()):
        return uint16_halves(key, shape)
    if math.prod(leading) * draws >= 2**32:
        raise ValueError(f"threefry_bits draws fewer than 2**32 values, asked for {math.prod(leading) * draws}")
    index = lambda axis: jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), axis)
    if in_loop:
        # Counters that do not depend on the key are loop-invariant: XLA computes them once before
        # the loop and reads them back as uint32 arrays at every draw. A zero it cannot see through
        # (from the key, behind a barrier) added to each 1-D index keeps them in the loop; a
        # full-shape iota is hoisted whatever is added to it.
        word = jax.random.key_data(key)[0]
        zero = word ^ jax.lax.optimization_barrier(word)
        index = lambda axis: jax.lax.broadcast_in_dim(
            jax.lax.iota(jnp.uint32, shape[axis]) + zero, tuple(shape), (axis,)
        )
    column = index(len(shape) - 1)
    counter, stride = column >> np.uint32(1), draws
    for axis in reversed(range(len(leading))):
        counter = counter + index(axis) * np.uint32(stride)
        stride *= shape[axis]
    return _half(threefry_hash(key, counter), column)


def _half(bits: jax.Array, column: jax.Array) -> jax.Array:
    """The 16-bit uniform of the element at last-axis index `column` from its 32-bit draw: the
    high half for even columns, the low half for odd ones."""
    return jnp.where((column & np.uint32(1)) == 1, bits & np.uint32(0xFFFF), bits >> np.uint32(16))


def kept_in_kernel(k0: jax.Array, k1: jax.Array, counter: jax.Array, column: jax.Array, rate: float) -> jax.Array:
    """`Dropout(rate, draws=per_element_halves)`'s keep mask for elements whose draw has `counter`
    and whose last-axis index is `column`, with the key as its two uint32 words: what a kernel
    holds (`fused_attention`, `fused_layer_norm`)."""
    return kept(_half(threefry_words(k0, k1, counter), column), rate)
