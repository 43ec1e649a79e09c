"""The 16-bit model's own forms of the rematerialised LayerNorm, the query, key and value products
and the dropout counters in the scan over layers, against what they replace: the same values
and gradients, no 16-bit sums. `sda_jax/kernels/sixteen_bit.py`, `sda_jax/models/bert.py`,
`sda_jax/kernels/dropout_counters.py`; why: benchmarks/RESULTS.md, the rows "More levers"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax import kernels
from sda_jax.kernels.blocks16 import SelfAttention16
from sda_jax.kernels.dropout_counters import per_element_halves
from sda_jax.kernels.sixteen_bit import layer_norm16
from sda_jax.models.bert import BertForSequenceClassification, init_params
from sda_jax.models.layers import layer_norm
from tests.conftest import moved_by_rounding_alone, tiny_model

CONFIG = tiny_model(num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, max_position_embeddings=40, num_labels=3)


def test_layer_norm16_has_autodiffs_gradients() -> None:
    keys = jax.random.split(jax.random.key(0), 4)
    x = 3 * jax.random.normal(keys[0], (4, 16, 96)) + 1
    scale = 1 + 0.1 * jax.random.normal(keys[1], (96,))
    bias = jax.random.normal(keys[2], (96,))
    upstream = jax.random.normal(keys[3], (4, 16, 96))
    np.testing.assert_array_equal(layer_norm16(x, scale, bias, 1e-12), layer_norm(x, scale, bias, 1e-12))

    def grads(f):
        return jax.jit(jax.grad(lambda x, s, b: jnp.sum(f(x, s, b, 1e-12) * upstream), (0, 1, 2)))(x, scale, bias)

    for got, want in zip(grads(layer_norm16), grads(layer_norm)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert not np.allclose(want, 0)


def test_fused_query_key_value_products_equal_three_products() -> None:
    """The [CLS] row of 16-bit attention over every row (one product) against the [CLS]-only path
    (three products, as in float32): the same values, gradients to 16-bit rounding."""
    x = jax.random.normal(jax.random.key(1), (2, 9, CONFIG.hidden_size))
    mask = jnp.ones((2, 9), bool).at[1, 6:].set(False)
    upstream = jax.random.normal(jax.random.key(2), (2, CONFIG.hidden_size))
    attention = SelfAttention16(CONFIG, kernels.XLA, jnp.bfloat16)
    params = attention.init(jax.random.key(3), x, mask, deterministic=True)
    assert set(params["params"]) == {"query", "key", "value"}
    assert params["params"]["query"]["bias"].dtype == jnp.float32
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(4), p.shape), params)

    def cls_row(params, x, cls_only):
        out = attention.apply(params, x, mask, deterministic=True, cls_only=cls_only)[:, 0]
        return jnp.sum(out.astype(jnp.float32) * upstream)

    fused, separate = (
        jax.jit(jax.value_and_grad(cls_row, (0, 1)), static_argnums=2)(params, x, c) for c in (False, True)
    )
    np.testing.assert_allclose(fused[0], separate[0], rtol=1e-2)
    for got, want in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(separate[1])):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.02 * np.abs(want).max())
    # Only the query path differs between the two forms for the other rows: the [CLS] row alone
    # reads every key and value, so a mix-up of the three products' columns shows here.
    assert np.abs(np.asarray(fused[1][0]["params"]["key"]["kernel"])).max() > 0


@pytest.mark.parametrize("scan_layers", [True, False])
def test_16_bit_model_gradients_follow_float32_without_16_bit_sums(scan_layers) -> None:
    params = init_params(CONFIG, jax.random.key(0), scan_layers)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(5), p.shape), params)
    ids = jax.random.randint(jax.random.key(6), (4, 12), 1, CONFIG.vocab_size)
    mask = jnp.ones_like(ids).at[3, 8:].set(0)

    def grads(dtype):
        forms = kernels.XLA if dtype != jnp.float32 else kernels.REFERENCE
        model = BertForSequenceClassification(CONFIG, dtype=dtype, scan_layers=scan_layers, forms=forms)

        def loss(p):
            logits = model.apply(
                {"params": p}, ids, jnp.zeros_like(ids), mask, deterministic=False, rngs={"dropout": jax.random.key(7)}
            )
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

        with jax.allow_f16_reductions(False):  # a 16-bit sum is then an error when traced
            return jax.jit(jax.grad(loss))(params)

    full, half = grads(jnp.float32), grads(jnp.bfloat16)
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(full))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(half), jax.tree.leaves(full)):
        assert got.dtype == jnp.float32, path
        if moved_by_rounding_alone(jax.tree_util.keystr(path)):
            # Exactly zero (softmax ignores a key bias): rounding noise alone, which the 16-bit
            # scores' backward (torch autocast's) makes ~1e-6 rather than float32's ~1e-11.
            assert np.abs(got).max() <= 1e-4 * largest, (jax.tree_util.keystr(path), np.abs(got).max(), largest)
            continue
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max() + 1e-6, err_msg=jax.tree_util.keystr(path))


def test_dropout_counters_in_a_loop_draw_the_same_halves() -> None:
    shape = (3, 4, 5, 6)
    keys = jax.random.split(jax.random.key(11), 3)

    def body(carry, key):
        return carry, per_element_halves(key, shape, True)

    _, drawn = jax.jit(lambda keys: jax.lax.scan(body, 0, keys))(keys)
    for key, got in zip(keys, drawn):
        bits = jax.random.bits(key, (*shape[:-1], shape[-1] // 2), jnp.uint32)
        want = jnp.stack([bits >> 16, bits & 0xFFFF], axis=-1).reshape(shape)
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(drawn[0], drawn[1])
