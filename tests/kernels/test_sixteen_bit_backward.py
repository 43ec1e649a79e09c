"""The xla forms' pieces against the reference they replace: dropout's per-element draws (the same
masks bit for bit) and the backward passes written out (the same gradients).
`sda_jax/kernels/dropout_counters.py`, `sda_jax/kernels/sixteen_bit.py`; why: benchmarks/RESULTS.md,
the deviceless H100 rows of the 16-bit forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax.kernels.dropout_counters import per_element_halves
from sda_jax.kernels.sixteen_bit import activation16, add_bias16
from sda_jax.models.dropout import Dropout, uint16_halves
from sda_jax.models.layers import ACTIVATIONS

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
    per_element = jax.jit(lambda key: per_element_halves(key, shape))
    np.testing.assert_array_equal(np.asarray(per_element(key)), want)
    np.testing.assert_array_equal(np.asarray(uint16_halves(key, shape)), want)
    assert not np.array_equal(np.asarray(per_element(jax.random.key(1))), want)


def test_dropout_with_per_element_draws_drops_the_same_elements() -> None:
    x = jax.random.normal(KEY, (16, 30, 257))
    rngs = {"dropout": jax.random.key(7)}
    whole = Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs)
    per_element = Dropout(0.1, per_element_halves).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(per_element, whole)
    assert 0.88 < float(jnp.mean(whole != 0)) < 0.92


def test_other_generators_split_their_own_whole_draws() -> None:
    key = jax.random.key(3, impl="rbg")
    want = _halves_of_whole_draws(key, (4, 9))
    np.testing.assert_array_equal(np.asarray(per_element_halves(key, (4, 9))), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_bias_add_has_autodiffs_gradients(dtype) -> None:
    y = jax.random.normal(KEY, (6, 16, 48)).astype(dtype)
    bias = jax.random.normal(jax.random.key(1), (48,))
    upstream = jax.random.normal(jax.random.key(2), (6, 16, 48))

    def loss(add):
        return lambda y, b: jnp.sum(add(y, b).astype(jnp.float32) * upstream)

    plain = lambda y, b: (y.astype(jnp.float32) + b).astype(y.dtype)
    np.testing.assert_array_equal(add_bias16(y, bias), plain(y, bias))
    (dy, db), (want_dy, want_db) = (jax.grad(loss(f), (0, 1))(y, bias) for f in (add_bias16, plain))
    assert dy.dtype == dtype and db.dtype == jnp.float32
    np.testing.assert_array_equal(dy, want_dy)
    # The same 16-bit values summed in float32, in another order.
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)
    assert not np.allclose(db, 0)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_16_bit_activation_recomputes_autodiffs_gradient(name) -> None:
    y = (3 * jax.random.normal(KEY, (4, 8, 96))).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(2), (96,))
    upstream = jax.random.normal(jax.random.key(1), (4, 8, 96)).astype(jnp.bfloat16)
    plain = lambda y, bias: ACTIVATIONS[name](add_bias16(y, bias).astype(jnp.float32)).astype(y.dtype)
    np.testing.assert_array_equal(activation16(ACTIVATIONS[name], y, bias), plain(y, bias))
    grad = lambda f: jax.jit(jax.grad(lambda y, bias: jnp.sum((f(y, bias) * upstream).astype(jnp.float32)), (0, 1)))(y, bias)
    (dy, d_bias), (want_dy, want_d_bias) = grad(lambda y, bias: activation16(ACTIVATIONS[name], y, bias)), grad(plain)
    assert dy.dtype == jnp.bfloat16 and d_bias.dtype == jnp.float32
    np.testing.assert_array_equal(dy, want_dy)
    np.testing.assert_array_equal(d_bias, want_d_bias)  # add_bias16's own float32 sum of the same values
    assert not np.allclose(d_bias, 0)
