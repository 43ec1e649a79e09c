"""The fused attention kernels (`sda_jax/fused_attention.py`), in Pallas' interpreter on the CPU,
against the 16-bit model's XLA expression: the same values and gradients bit for bit, with the
same dropout masks; and which attention a run takes (`model.attention`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax import fused_attention
from sda_jax.bert_config import BertConfig
from sda_jax.dropout import uint16_halves
from sda_jax.errors import InputError
from sda_jax.models import BertForSequenceClassification, init_params
from sda_jax.sixteen_bit import add_bias16
from tests.conftest import TINY_RUN_FLAGS, one_line_error

CONFIG = BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, type_vocab_size=2, num_labels=2,
)  # fmt: skip


def xla_attention(y, bias, key_mask, key, rate):
    """`models.BertSelfAttention`'s 16-bit expression, from the fused product on."""
    batch, length, three_heads, head_dim = y.shape
    qkv = add_bias16(y.reshape(batch, length, -1), bias.reshape(-1)).reshape(batch, length, 3, three_heads // 3, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=y.dtype) / math.sqrt(head_dim)
    scores = jnp.where(key_mask[:, None, None, :], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if key is not None:
        keep = uint16_halves(key, probs.shape, per_element=True) >= np.uint32(round(rate * 65536))
        probs = jnp.where(keep, probs / (1.0 - rate), jnp.zeros_like(probs))
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(y.dtype), v)


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
    want, want_vjp = jax.vjp(lambda y, b: xla_attention(y, b, key_mask, key, 0.1), y, bias)
    got, got_vjp = jax.vjp(lambda y, b: fused_attention.attention16(y, b, key_mask, key, 0.1, interpret=True), y, bias)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for got_grad, want_grad in zip(got_vjp(upstream), want_vjp(upstream), strict=True):
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


def test_kernels_on_the_model_axis():
    """vmapped over models (each with its own key), as a sweep's step runs them."""
    y, bias, key_mask, _ = _inputs(8)
    ys, biases = jnp.stack([y, y[::-1]]), jnp.stack([bias, -bias])
    keys = jax.random.split(jax.random.key(1), 2)
    run = lambda f: jax.vmap(lambda y, b, k: f(y, b, key_mask, k, 0.1))(ys, biases, keys)
    got = run(lambda *a: fused_attention.attention16(*a, interpret=True))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(run(xla_attention), np.float32))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_model_with_fused_attention_is_the_model(scan_layers):
    """The bf16 classifier's training loss, every gradient and its eval logits are the XLA
    attention's bit for bit: the kernels draw the dropout masks `Dropout` would draw."""
    params = init_params(CONFIG, jax.random.key(0), scan_layers)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 100, (4, 12)))
    types = jnp.zeros((4, 12), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [9], [5], [12]]), jnp.int32)
    results = {}
    for attention in ("xla", "fused_interpreted"):
        model = BertForSequenceClassification(CONFIG, jnp.bfloat16, scan_layers, attention=attention)
        loss = lambda p: model.apply({"params": p}, ids, types, mask, deterministic=False, rngs={"dropout": jax.random.key(5)}).sum()
        results[attention] = (*jax.value_and_grad(loss)(params), model.apply({"params": params}, ids, types, mask))
    (want_loss, want_grads, want_logits), (got_loss, got_grads, got_logits) = results["xla"], results["fused_interpreted"]
    assert float(got_loss) == float(want_loss)
    np.testing.assert_array_equal(got_logits, want_logits)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_array_equal(got, want)


def test_which_attention_a_run_takes():
    choose = lambda setting, dtype=jnp.bfloat16, platform="gpu", length=64: fused_attention.implementation(
        setting, dtype, platform, CONFIG, length
    )  # fmt: skip
    assert jax.device_count() == 1  # the test process: one CPU device
    assert choose("auto") == "fused"
    assert choose("auto", platform="cpu") == "xla"
    assert choose("auto", platform="tpu") == "xla"
    assert choose("auto", dtype=jnp.float32) == "xla"
    assert choose("auto", length=256) == "xla"
    assert choose("xla") == "xla"
    assert choose("fused") == "fused"
    assert choose("fused", platform="cpu") == "fused_interpreted"
    with pytest.raises(InputError, match=r"^config key model.attention: fused needs a 16-bit compute dtype"):
        choose("fused", dtype=jnp.float32)
    with pytest.raises(InputError, match=r"data.max_seq_len <= 128 \(256\)"):
        choose("fused", length=256)


def test_fused_attention_in_float32_is_a_one_line_error_that_leaves_nothing(cli, tmp_path):
    workdir = tmp_path / "run"
    result = cli.run(
        "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", "--config.model.attention=fused",
        *TINY_RUN_FLAGS,
    )  # fmt: skip
    one_line_error(result, "model.attention", "16-bit")
    assert not workdir.exists()
