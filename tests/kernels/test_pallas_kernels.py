"""`model.kernels=pallas`: the residual blocks' kernel (`sda_jax/kernels/fused_layer_norm.py`) in Pallas'
interpreter against the 16-bit model's XLA expression, the model with both kernels against the
model with XLA's ops, and which kernels a run takes. The attention kernel alone:
tests/kernels/test_fused_attention.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax import kernels
from sda_jax.errors import InputError
from sda_jax.kernels import fused_layer_norm
from sda_jax.kernels.dropout_counters import per_element_halves
from sda_jax.kernels.sixteen_bit import add_bias16
from sda_jax.models.bert import BertForSequenceClassification, init_params
from sda_jax.models.layers import layer_norm
from sda_jax.models.masked_lm import BertForMaskedLM
from tests.conftest import TINY_RUN_FLAGS, one_line_error, tiny_model

# Two layers: a scan of one and the [CLS] row's layer, or both unrolled (the interpreted kernels
# compile slowly: ~20 s a layer layout on the CI machine).
CONFIG = tiny_model()
KEY = jax.random.key(5)


def xla_block(y, dense_bias, residual, scale, bias, rate):
    """`layers.BertResidualOutput`'s 16-bit expression after its product, with the output's 16-bit copy."""
    z = add_bias16(y, dense_bias)
    if rate:
        z = jnp.where(per_element_halves(KEY, z.shape) >= round(rate * 65536), z / (1.0 - rate), jnp.zeros_like(z))
    out = layer_norm(z + residual, scale, bias, 1e-12)
    return out, out.astype(y.dtype)


def _inputs(dtype, hidden=96):
    keys = jax.random.split(jax.random.key(0), 7)
    shape = (4, 24, hidden)
    return (
        jax.random.normal(keys[0], shape).astype(dtype), 0.1 * jax.random.normal(keys[1], (hidden,)),
        jax.random.normal(keys[2], shape), 1 + 0.1 * jax.random.normal(keys[3], (hidden,)),
        0.1 * jax.random.normal(keys[4], (hidden,)),
    ), (jax.random.normal(keys[5], shape), jax.random.normal(keys[6], shape).astype(dtype))  # fmt: skip


def _values_and_gradients(block, inputs, upstream):
    g, g16 = upstream

    def loss(*args):
        out, out16 = block(*args)
        return jnp.sum(out * g) + jnp.sum((out16 * g16).astype(jnp.float32))

    return jax.jit(block)(*inputs), jax.jit(jax.grad(loss, argnums=range(5)))(*inputs)


def _kernel(rate):
    return lambda *args: fused_layer_norm.residual_layer_norm16(*args, KEY if rate else None, rate, 1e-12, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("rate", [0.1, 0.0])
def test_the_block_kernel_computes_the_xla_expression(dtype, rate):
    """Outputs, the product's, residual's, dense bias's and LayerNorm scale's gradients bit for
    bit; the LayerNorm bias gradient, a float32 sum in another order, within rounding. Float16
    with dropout within a float16 rounding: XLA:CPU turns its division by 1 - rate into a product
    with the float16 reciprocal, the kernel divides in float32 (as XLA:CPU does bfloat16)."""
    inputs, upstream = _inputs(dtype)
    (want, want_grads), (got, got_grads) = (
        _values_and_gradients(block, inputs, upstream) for block in (lambda *a: xla_block(*a, rate), _kernel(rate))
    )
    exact = dtype == jnp.bfloat16 or rate == 0.0
    for name, g, w in zip(("out", "out16", "y", "dense_bias", "residual", "scale", "bias"), (*got, *got_grads), (*want, *want_grads)):
        assert g.dtype == w.dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if exact and name != "bias":
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            np.testing.assert_allclose(g, w, rtol=0, atol=(1e-6 if exact else 4e-3) * float(np.max(np.abs(w))), err_msg=name)
    if rate:  # the dropout is there: another key draws another mask
        other = fused_layer_norm.residual_layer_norm16(*inputs, jax.random.key(6), rate, 1e-12, interpret=True)
        assert not np.array_equal(np.asarray(other[0]), np.asarray(got[0]))


@pytest.mark.api_surface
def test_the_gpu_tiling_pads_rows_and_columns_out_of_the_sums(monkeypatch):
    """The GPU's tiling (blocks of ROWS rows, the hidden size padded to a power of two, the last
    block partly outside the array) in the interpreter: the same values within rounding (a
    LayerNorm of a block of rows rounds as XLA:CPU vectorises it), so the padding reaches no sum."""
    monkeypatch.setattr(fused_layer_norm, "_tiling", lambda tokens, hidden, interpret: (fused_layer_norm.ROWS, 128))
    inputs, upstream = _inputs(jnp.bfloat16, hidden=96)
    inputs = tuple(x[:, :23] if x.ndim == 3 else x for x in inputs)  # 92 tokens: the last block has 4
    upstream = tuple(x[:, :23] for x in upstream)
    (want, want_grads), (got, got_grads) = (
        _values_and_gradients(block, inputs, upstream) for block in (lambda *a: xla_block(*a, 0.1), _kernel(0.1))
    )
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32), rtol=0, atol=0.02)
    for g, w in zip(got_grads, want_grads):
        scale = float(np.max(np.abs(np.asarray(w, np.float32))))
        mismatch = np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)) > 1e-4 * scale
        assert np.mean(mismatch) < 0.01  # 16-bit gradients: a rare element one rounding away


def _assert_gradients_match(got_grads, want_grads) -> None:
    """Bit for bit but the LayerNorms' and the embeddings': float32 sums (the LayerNorm's bias and
    scale columns, the residual stream's gradient, which XLA:CPU rounds by how it fuses the
    LayerNorm backward) that move by float32 rounding."""
    exact = 0
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads), strict=True):
        name = jax.tree_util.keystr(path)
        if "LayerNorm" in name or "embeddings" in name:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.max(np.abs(want))), err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
            exact += 1
    assert exact >= 8


_CPU_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else None


def test_the_model_with_pallas_kernels_is_the_model():
    """The bf16 classifier (its layers scanned, the scan's carry the pair of streams, then the
    [CLS] row's layer): training loss and eval logits XLA's ops' bit for bit (the kernels draw the
    dropout masks `Dropout` would draw), the gradients as `_assert_gradients_match` says."""
    params = init_params(CONFIG, jax.random.key(0), True)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 100, (4, 12)))
    types = jnp.zeros((4, 12), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [9], [5], [12]]), jnp.int32)
    results = {}
    for name, forms in (("xla", kernels.XLA), ("pallas_interpreted", kernels.PALLAS_INTERPRETED)):
        model = BertForSequenceClassification(CONFIG, jnp.bfloat16, True, forms=forms)
        loss = lambda p, model=model: model.apply({"params": p}, ids, types, mask, deterministic=False, rngs={"dropout": jax.random.key(5)}).sum()
        # One program each, compiled without YNNPACK's dots (see test_fused_attention's
        # `_xla_values_and_gradients`: XLA:CPU of jaxlib 0.11 computes some bf16 products in bf16).
        results[name] = (*jax.jit(jax.value_and_grad(loss), compiler_options=_CPU_DOTS)(params), model.apply({"params": params}, ids, types, mask))
    (want_loss, want_grads, want_logits), (got_loss, got_grads, got_logits) = results["xla"], results["pallas_interpreted"]
    assert float(got_loss) == float(want_loss)
    np.testing.assert_array_equal(got_logits, want_logits)
    _assert_gradients_match(got_grads, want_grads)


def test_the_unrolled_masked_lm_with_pallas_kernels_is_the_model():
    """Pretraining's model, its layers unrolled: every row through every layer, the pair of
    streams passed from layer to layer and to the end; the same loss and gradients."""
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 16)))
    types, mask = jnp.zeros_like(ids), jnp.ones_like(ids)
    results = {}
    for name, forms in (("xla", kernels.XLA), ("pallas_interpreted", kernels.PALLAS_INTERPRETED)):
        model = BertForMaskedLM(CONFIG, jnp.bfloat16, False, forms=forms)
        params = model.init(jax.random.key(0), ids, types, mask)["params"]
        loss = lambda p, model=model: jnp.sum(
            model.apply({"params": p}, ids, types, mask, deterministic=False, rngs={"dropout": jax.random.key(1)}).astype(jnp.float32)
        )  # fmt: skip
        results[name] = jax.jit(jax.value_and_grad(loss), compiler_options=_CPU_DOTS)(params)
    (want_loss, want_grads), (got_loss, got_grads) = results["xla"], results["pallas_interpreted"]
    assert float(got_loss) == float(want_loss)
    _assert_gradients_match(got_grads, want_grads)


def test_which_forms_a_run_takes():
    """`model.kernels` by platform, not by dtype (the table in sda_jax/kernels/__init__.py)."""
    choose = lambda setting, dtype=jnp.bfloat16, platform="gpu", length=64: kernels.choose(setting, dtype, platform, CONFIG, length)
    assert jax.device_count() == 1  # the test process: one CPU device
    assert choose("auto") is kernels.XLA
    assert choose("auto", platform="tpu") is kernels.REFERENCE and choose("auto", platform="cpu") is kernels.REFERENCE
    for setting in ("auto", "reference", "xla"):
        assert choose(setting, dtype=jnp.float32) is kernels.REFERENCE
    assert choose("reference") is kernels.REFERENCE
    assert choose("xla") is kernels.XLA and choose("xla", platform="tpu") is kernels.XLA
    assert choose("pallas") is kernels.PALLAS
    assert choose("pallas", platform="cpu") is kernels.PALLAS_INTERPRETED
    assert not kernels.REFERENCE.weight_copies and kernels.XLA.weight_copies and kernels.PALLAS.weight_copies
    with pytest.raises(InputError, match=r"^config key model.kernels: pallas needs a 16-bit compute dtype"):
        choose("pallas", dtype=jnp.float32)
    with pytest.raises(InputError, match=r"data.max_seq_len <= 128 \(256\)"):
        choose("pallas", length=256)


def test_pallas_kernels_in_float32_are_a_one_line_error_that_leaves_nothing(cli, tmp_path):
    workdir = tmp_path / "run"
    result = cli.run(
        "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", "--config.model.kernels=pallas",
        *TINY_RUN_FLAGS,
    )  # fmt: skip
    one_line_error(result, "model.kernels", "16-bit")
    assert not workdir.exists()
