"""Dropout for the BERT model: torch's maths, JAX's Threefry bits, cheap to draw and compile.

`Dropout` is what the model applies after embeddings, attention probabilities and each residual
branch. Two costs of `flax.linen.Dropout` are avoided:

* it draws a 32-bit uniform per element; here each 32-bit draw gives two 16-bit uniforms, so half
  the hashing;
* on CPU, JAX lowers its Threefry hash as a 5-iteration while loop, which XLA:CPU compiles slowly;
  the rounds here are written out, as JAX itself does on GPU.

How the uniforms reach memory is a form (`Dropout.draws`): the draws taken whole here, or drawn per
element where they are applied (`sda_jax.kernels.dropout_counters`), the same bits either way.
Measurements of each: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32 (Salmon et al., 2011) as JAX implements it: 20 rounds in 5 groups of 4, rotation
# constants alternating between the two rows, a key injection after each group.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def partitionable_threefry() -> bool:
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
    if not partitionable_threefry():
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
    return threefry_hash(key, counter)


def threefry_hash(key: jax.Array, counter: jax.Array) -> jax.Array:
    """Threefry-2x32 of the 64-bit counters (0, counter), the two output words xor-ed."""
    key_words = jax.random.key_data(key)
    return threefry_words(key_words[0], key_words[1], counter)


def threefry_words(k0: jax.Array, k1: jax.Array, counter: jax.Array) -> jax.Array:
    """`threefry_hash` with the key as its two uint32 words (what a kernel holds)."""
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


def uint16_halves(key: jax.Array, shape: Sequence[int], in_loop: bool = False) -> jax.Array:
    """16-bit uniforms (as uint32) for `shape`: the high then the low half of each 32-bit draw of
    `jax.random.bits(key, (*leading, ceil(last / 2)), jnp.uint32)`, along the last axis.

    The draws are taken whole and split. `in_loop` (drawn in the scan over layers) changes nothing
    here; it is part of the signature every `Dropout.draws` shares (`models.forms`).
    """
    del in_loop
    *leading, last = shape
    draws = -(-last // 2)
    if str(jax.random.key_impl(key)) == "threefry2x32" and partitionable_threefry():
        bits = threefry_bits(key, (*leading, draws))
    else:  # another generator's own bits: just as random
        bits = jax.random.bits(key, (*leading, draws), jnp.uint32)
    return jnp.stack([bits >> 16, bits & 0xFFFF], axis=-1).reshape(*leading, -1)[..., :last]


def kept(halves: jax.Array, rate: float) -> jax.Array:
    """Where dropout keeps an element of 16-bit uniforms `halves`."""
    return halves >= np.uint32(round(rate * 65536))


class Dropout(nn.Module):
    """Inverted dropout (`torch.nn.Dropout`'s maths) on 16-bit uniforms.

    An element is kept when its uniform is at least round(rate * 65536): a keep probability within
    1e-5 of 1 - rate (0.899994 for rate 0.1); kept elements are scaled by 1 / (1 - rate) as in
    torch. The 32-bit draws are split along the last axis only, so a batch sharded over its first
    axis draws its mask where it lives, and the mask never depends on the device count.
    `draws(key, shape, in_loop)` gives the uniforms (`uint16_halves`, or a form of the same values
    that `models.forms` chooses); `in_loop`: drawn in the scan over layers.
    """

    rate: float
    draws: Callable[[jax.Array, Sequence[int], bool], jax.Array] = uint16_halves
    in_loop: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = kept(self.draws(self.make_rng("dropout"), x.shape, self.in_loop), self.rate)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
