"""The backward passes written out for 16-bit compute, and dropout's per-element draws, against
what they replace: the same masks bit for bit, the same gradients (`sda_jax/models.py`,
`sda_jax/dropout.py`; why they exist: benchmarks/RESULTS.md, the deviceless H100 report)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax.dropout import uint16_halves

KEY = jax.random.key(0)


def _halves_of_whole_draws(key: jax.Array, shape: tuple[int, ...]) -> np.ndarray:
    """The draws as they were taken before: 32-bit bits for half the last axis, split in two."""
    *leading, last = shape
    bits = jax.random.bits(key, (*leading, -(-last // 2)), jnp.uint32)
    return np.asarray(jnp.stack([bits >> 16, bits & 0xFFFF], axis=-1).reshape(*leading, -1)[..., :last])


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5), (64, 4, 30, 15), (8, 12, 64, 64)])
def test_per_element_draws_are_the_halves_of_jax_random_bits(shape) -> None:
    key = jax.random.key(12345)
    want = _halves_of_whole_draws(key, shape)
    np.testing.assert_array_equal(np.asarray(uint16_halves(key, shape)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(uint16_halves, static_argnums=1)(key, shape)), want)
    assert not np.array_equal(np.asarray(uint16_halves(jax.random.key(1), shape)), want)


def test_other_generators_split_their_own_whole_draws() -> None:
    key = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(np.asarray(uint16_halves(key, (4, 9))), _halves_of_whole_draws(key, (4, 9)))
