"""What 16-bit models compute differently from float32 ones, against what it replaces: dropout's
per-element draws, the same masks bit for bit (`sda_jax/dropout.py`; why: benchmarks/RESULTS.md,
the deviceless H100 report of 2026-12-01)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax.dropout import Dropout, uint16_halves

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
    per_element = jax.jit(lambda key: uint16_halves(key, shape, per_element=True))
    np.testing.assert_array_equal(np.asarray(per_element(key)), want)
    np.testing.assert_array_equal(np.asarray(uint16_halves(key, shape)), want)
    assert not np.array_equal(np.asarray(per_element(jax.random.key(1))), want)


def test_dropout_with_per_element_draws_drops_the_same_elements() -> None:
    x = jax.random.normal(KEY, (16, 30, 257))
    rngs = {"dropout": jax.random.key(7)}
    whole = Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs)
    per_element = Dropout(0.1, per_element_draws=True).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(per_element, whole)
    assert 0.88 < float(jnp.mean(whole != 0)) < 0.92


def test_other_generators_split_their_own_whole_draws() -> None:
    key = jax.random.key(3, impl="rbg")
    want = _halves_of_whole_draws(key, (4, 9))
    np.testing.assert_array_equal(np.asarray(uint16_halves(key, (4, 9), per_element=True)), want)
