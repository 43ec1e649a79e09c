"""Dropout for the BERT model: torch's maths, JAX's Threefry bits, cheap to draw, fuse and compile.

`Dropout` is what `models` applies after embeddings, attention probabilities and each residual
branch. Three costs of `flax.linen.Dropout` are avoided:

* it draws a 32-bit uniform per element; here each 32-bit draw gives two 16-bit uniforms, so half
  the hashing (the small model's CPU train step: 6% of it spent on dropout with Flax's, 3.5% here);
* it writes its draws to memory and reads them back where the mask is applied. With
  `per_element_draws` (what the model asks for in 16-bit compute, i.e. on GPUs) every element
  hashes its own draw's counter instead (the two elements that share a draw hash it twice): the
  same bits, but the mask is an elementwise function of the position, which XLA fuses into the
  kernel applying it (BERT-base's train step on an H100 moves 1.3 GB less; benchmarks/RESULTS.md).
  float32 models keep the draws whole: XLA:CPU fuses the two forms differently, which moves
  float32 results by rounding, and the float32 path is the reference the parity tests measure;
* on CPU, JAX lowers its Threefry hash as a 5-iteration while loop, which made XLA:CPU spend ~4 s
  more compiling each train step (10.5 s instead of 6.4 s for the small model); the rounds here
  are written out, as JAX itself does on GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32 (Salmon et al., 2011) as JAX implements it: 20 rounds in 5 groups of 4, rotation
# constants alternating between the two rows, a key injection after each group.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _partitionable_threefry() -> bool:
    # A JAX that has dropped the flag has made partitionable draws the only kind.
    return bool(getattr(jax.config, "jax_threefry_partitionable", True))


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`jax.random.bits(key, shape, jnp.uint32)` for a threefry2x32 `key`, with unrolled rounds.

    Bit for bit what JAX draws with `jax_threefry_partitionable` (the default since JAX 0.5): the
    element at flat index i hashes the 64-bit counter i, and the two output words are xor-ed. The
    counter is built from per-axis iotas, as JAX builds it, so a sharded draw stays local.
    """
    if not _partitionable_threefry():
        raise ValueError("threefry_bits reproduces jax_threefry_partitionable=True draws only")
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"threefry_bits draws fewer than 2**32 values, asked for {size}")
    # The high counter word is 0 below 2**32 elements; the low one is the flat index.
    counter = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        counter = counter + jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), axis) * np.uint32(stride)
        stride *= shape[axis]
    return _threefry_hash(key, counter)


def _threefry_hash(key: jax.Array, counter: jax.Array) -> jax.Array:
    """Threefry-2x32 of the 64-bit counters (0, counter), the two output words xor-ed."""
    key_words = jax.random.key_data(key)
    return threefry_words(key_words[0], key_words[1], counter)


def threefry_words(k0: jax.Array, k1: jax.Array, counter: jax.Array) -> jax.Array:
    """`_threefry_hash` with the key as its two uint32 words (what a kernel holds, `fused_attention`)."""
    keys = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
    x0 = jnp.zeros(counter.shape, jnp.uint32) + keys[0]
    x1 = counter + keys[1]
    for group in range(5):
        for rotation in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation) ^ x0
        x0 = x0 + keys[(group + 1) % 3]
        x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return x0 ^ x1


def uint16_halves(
    key: jax.Array, shape: Sequence[int], *, per_element: bool = False, in_loop: bool = False
) -> jax.Array:
    """16-bit uniforms (as uint32) for `shape`: the high then the low half of each 32-bit draw of
    `jax.random.bits(key, (*leading, ceil(last / 2)), jnp.uint32)`, along the last axis.

    `per_element` (threefry2x32 keys): each element computes its own, its draw's counter hashed
    (`threefry_bits`' bits, element by element) and its half taken, rather than all draws being
    taken whole and split. The same values either way. `in_loop` (with `per_element`): drawn in
    the body of a loop whose iterations draw with different keys (the scan over layers); the
    counters are then made to depend on the key, so that XLA does not hoist them out of the loop.
    """
    *leading, last = shape
    draws = -(-last // 2)
    threefry = str(jax.random.key_impl(key)) == "threefry2x32" and _partitionable_threefry()
    if not (per_element and threefry):
        if threefry:
            bits = threefry_bits(key, (*leading, draws))
        else:  # another generator's own bits: just as random
            bits = jax.random.bits(key, (*leading, draws), jnp.uint32)
        return jnp.stack([bits >> 16, bits & 0xFFFF], axis=-1).reshape(*leading, -1)[..., :last]
    if math.prod(leading) * draws >= 2**32:
        raise ValueError(f"threefry_bits draws fewer than 2**32 values, asked for {math.prod(leading) * draws}")
    index = lambda axis: jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), axis)
    if in_loop:
        # Counters that do not depend on the key are loop-invariant: XLA computes them once before
        # the loop and reads them back as uint32 arrays at every draw (BERT-base's scanned train
        # step on an H100: 0.38 GB). A zero it cannot see through (from the key, behind a
        # barrier) added to each 1-D index keeps them in the loop; a full-shape iota is hoisted
        # whatever is added to it.
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
    return _half(_threefry_hash(key, counter), column)


def _half(bits: jax.Array, column: jax.Array) -> jax.Array:
    """The 16-bit uniform of the element at last-axis index `column` from its 32-bit draw: the
    high half for even columns, the low half for odd ones."""
    return jnp.where((column & np.uint32(1)) == 1, bits & np.uint32(0xFFFF), bits >> np.uint32(16))


def _kept(halves: jax.Array, rate: float) -> jax.Array:
    return halves >= np.uint32(round(rate * 65536))


def kept_in_kernel(k0: jax.Array, k1: jax.Array, counter: jax.Array, column: jax.Array, rate: float) -> jax.Array:
    """`Dropout(rate, per_element_draws=True)`'s keep mask for elements whose draw has `counter`
    and whose last-axis index is `column`, with the key as its two uint32 words: what a kernel
    holds (`fused_attention`, `fused_layer_norm`)."""
    return _kept(_half(threefry_words(k0, k1, counter), column), rate)


class Dropout(nn.Module):
    """Inverted dropout (`torch.nn.Dropout`'s maths) on 16-bit uniforms.

    An element is kept when its uniform is at least round(rate * 65536): a keep probability within
    1e-5 of 1 - rate (0.899994 for rate 0.1); kept elements are scaled by 1 / (1 - rate) as in
    torch. The 32-bit draws are split along the last axis only, so a batch sharded over its first
    axis draws its mask where it lives, and the mask never depends on the device count.
    `per_element_draws`: the same mask, each element drawing its own (see the module docstring);
    `in_loop`: drawn in the scan over layers (see `uint16_halves`).
    """

    rate: float
    per_element_draws: bool = False
    in_loop: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        halves = uint16_halves(
            self.make_rng("dropout"), x.shape, per_element=self.per_element_draws, in_loop=self.in_loop
        )
        keep = _kept(halves, self.rate)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
