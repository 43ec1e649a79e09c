"""BERT for sequence classification in Flax, numerically matching `transformers` (PyTorch).

The module tree mirrors Hugging Face's names (`bert/embeddings/word_embeddings`,
`.../attention/self/query`, `classifier`, ...) so that `hf_checkpoint` converts a PyTorch state
dict with a name mapping. With `scan_layers` (the default) all encoder layers but the last run
under `nn.scan`: their parameters are stacked along a leading axis (`bert/encoder/layers/...`,
one slice per layer) and XLA compiles one layer instead of eleven (BERT-base's train step for an
H100: ~14 CPU-s instead of ~33, for a step estimated ~30% slower; benchmarks/RESULTS.md). Without
it the layers are unrolled, `bert/encoder/layer_{i}`. The last layer, which runs for the [CLS]
row alone, is `bert/encoder/layer_{L-1}` either way.

Parameters are always float32; `dtype` only sets the compute dtype, as torch autocast does: the
matmuls run in that dtype (accumulating in float32) and add their bias in float32; LayerNorm,
the residual stream it feeds, the attention softmax and the returned logits stay float32. In 16
bits some backward passes are written out (`sda_jax.sixteen_bit`) and the query, key and value
products are one product, so that XLA moves less memory on a GPU; the float32 model runs none
of that code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sda_jax.bert_config import ACTIVATION_NAMES, BertConfig
from sda_jax.dropout import Dropout
from sda_jax.fused_attention import attention16
from sda_jax.sixteen_bit import activation16, layer_norm, layer_norm16
from sda_jax.sixteen_bit import add_bias16 as _add_bias16

ATTENTION = ("xla", "fused", "fused_interpreted")  # how self-attention is computed (BertForSequenceClassification)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF "gelu" is the exact erf form. jax.nn.gelu evaluates it as x/2 * erfc(-x/sqrt(2)); torch's
    # x/2 * (1 + erf(x/sqrt(2))) is 3% faster on CPU in XLA but lands 4x further from torch's
    # updates after 20 steps (XLA's and torch's erf round 1 + erf differently for negative x).
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)

def hf_normal_init(config: BertConfig) -> nn.initializers.Initializer:
    """HF's init for Linear and Embedding weights."""
    # HF initialises with an untruncated normal, unlike the truncated one some JAX BERTs use.
    return nn.initializers.normal(stddev=config.initializer_range)


def word_embedding_init(config: BertConfig) -> nn.initializers.Initializer:
    """HF's embedding init: normal, with the `padding_idx` row zeroed."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        table = hf_normal_init(config)(key, shape, dtype)
        return table.at[config.pad_token_id].set(0.0)

    return init


class Dense(nn.Module):
    """torch's Linear under autocast: a product in the compute dtype whose bias is added in float32.

    Params `kernel` [in, out] and `bias` as in `nn.Dense`, float32. `nn.Dense(dtype=bf16)` casts
    the bias to bf16 and adds it there, so the bias gradient becomes a bf16 sum over batch ×
    length rows (XLA keeps such sums in 16 bits on Hopper). Here the product is widened to
    float32, the bias added, and the sum rounded once to the compute dtype (as cuBLAS adds
    torch's bias in its float32 epilogue), so the bias gradient is a float32 sum (`_add_bias16`).
    In float32 this is exactly `nn.Dense`.
    """

    features: int
    dtype: Any
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        if not _is_16_bit(self.dtype):
            return (y.astype(jnp.float32) + bias).astype(self.dtype)
        return _add_bias16(y, bias)


class _DenseKernel(nn.Module):
    """`Dense`'s parameters for a caller that takes the product itself; returns the kernel in the
    compute dtype (the caller reads the float32 bias from its variables)."""

    features: int
    dtype: Any
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel.astype(self.dtype)


def _is_16_bit(dtype: Any) -> bool:
    # The accelerators' compute dtypes (mixed_precision.compute_dtype), where what moves through
    # memory is the cost: they take the written-out forms (sda_jax.sixteen_bit, fused products,
    # barriers, per-element dropout draws that XLA fuses into the kernel applying them).
    return jnp.dtype(dtype) != jnp.float32


def _dropout(rate: float, dtype: Any, in_loop: bool = False) -> Dropout:
    return Dropout(rate, per_element_draws=_is_16_bit(dtype), in_loop=in_loop)


def _dense(config: BertConfig, features: int, dtype: Any, name: str) -> Dense:
    return Dense(features, dtype, hf_normal_init(config), name=name)


class LayerNorm(nn.Module):
    """torch's LayerNorm, (x - mean) * rsqrt(var + eps) * scale + bias, in float32 (as under autocast).

    Params `scale`/`bias` as in `nn.LayerNorm`. Flax folds the scale into the normaliser,
    (x - mean) * (rsqrt(var + eps) * scale), a [batch, length, hidden] product that its backward
    pass keeps; scaling the normalised rows afterwards does not need it (the small model's CPU
    train step: 2.5% faster) and lands closer to torch's updates in the parity tests. The variance
    is two-pass, mean((x - mean)^2), as in torch.
    """

    epsilon: float
    dtype: Any = jnp.float32  # the model's compute dtype
    rematerialised: bool = False  # under `nn.remat`, where 16 bits take `sixteen_bit.layer_norm16`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x = x.astype(jnp.float32)
        if _is_16_bit(self.dtype) and self.rematerialised:
            return layer_norm16(x, scale, bias, self.epsilon)
        return layer_norm(x, scale, bias, self.epsilon)


def _layer_norm(config: BertConfig, dtype: Any, rematerialised: bool = False) -> LayerNorm:
    # Its float32 output is the residual stream, as autocast keeps it: the next matmul casts.
    return LayerNorm(config.layer_norm_eps, dtype, rematerialised, name="LayerNorm")


class BertEmbeddings(nn.Module):
    """Word + token-type + position embeddings (+ ERNIE's task-type embedding), LayerNorm, dropout.

    The same module for `model_type` bert and ernie: an ERNIE config with `use_task_id` adds the
    `task_type_embeddings` table, under the same `bert/embeddings` path as the others.
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, *, deterministic: bool
    ) -> jax.Array:
        cfg = self.config

        def embed(num: int, name: str, init: nn.initializers.Initializer) -> nn.Embed:
            # Lookups are cheap; the sum stays float32, as does the LayerNorm of it.
            return nn.Embed(
                num, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32, name=name
            )

        positions = jnp.arange(input_ids.shape[1])[None, :]
        # Same summation order as HF: (word + token_type) + position.
        x = embed(cfg.vocab_size, "word_embeddings", word_embedding_init(cfg))(input_ids)
        normal = hf_normal_init(cfg)
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings", normal)(token_type_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings", normal)(positions)
        if cfg.use_task_id:
            # ERNIE's task-type embedding, added last as in transformers' ErnieEmbeddings. Every
            # token has task type 0 (what transformers uses when no task_type_ids are given), so
            # row 0 is added to every position: the same sums as a lookup of all-zero ids.
            task_type = embed(cfg.task_type_vocab_size, "task_type_embeddings", normal)
            x = x + task_type(jnp.zeros((1, 1), jnp.int32))
        x = _layer_norm(cfg, self.dtype)(x)
        return _dropout(cfg.hidden_dropout_prob, self.dtype)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False  # the body of the scan over layers
    attention: str = "xla"  # ATTENTION: 16-bit models may take `fused_attention.attention16`'s kernels

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        """Attention of every row of `x` ([batch, 1, hidden] of the [CLS] row alone if `cls_only`)."""
        cfg = self.config

        def project(name: str, inputs: jax.Array) -> jax.Array:
            y = _dense(cfg, cfg.hidden_size, self.dtype, name)(inputs)
            return y.reshape(*inputs.shape[:2], cfg.num_attention_heads, cfg.head_dim)

        if _is_16_bit(self.dtype) and not cls_only and self.attention != "xla":
            return self._fused_attention(x, key_mask, deterministic)
        if _is_16_bit(self.dtype) and not cls_only:
            q, k, v = self._fused_projections(x)
        else:
            q = project("query", x[:, :1] if cls_only else x)
            k, v = project("key", x), project("value", x)
        if not _is_16_bit(self.dtype):
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (cfg.head_dim**-0.5)
        else:
            # torch autocast's q @ kᵀ / √d: a 16-bit product divided in 16 bits, then float32 (mask, softmax);
            # float32 scores move 0.9 GB more per BERT-base step on an H100, and their backward is float32.
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=self.dtype) / math.sqrt(cfg.head_dim)
            scores = scores.astype(jnp.float32)
        # Equal to HF's additive finfo.min mask after rounding, but cannot overflow to -inf, so a
        # row with every key masked (an all-padding example) gets a uniform softmax, not NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = _dropout(cfg.attention_probs_dropout_prob, self.dtype, self.rematerialised)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return context.reshape(*q.shape[:2], cfg.hidden_size)

    def _fused_projections(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The query, key and value products as one, [hidden, 3 * hidden] (16-bit compute).

        XLA merges the three forward products itself, but not their input gradients: three
        products, each rounded to 16 bits, and a float32 sum of them. One product's input gradient
        sums all three in its float32 accumulator (BERT-base's step: 176 kernels fewer scanned, 110
        unrolled, for 0.15 / 0.09 GB more, XLA writing that gradient in two layouts).
        """
        cfg = self.config
        y, bias = self._fused_product(x)
        y = _add_bias16(y, bias)
        y = y.reshape(*x.shape[:2], 3, cfg.num_attention_heads, cfg.head_dim)
        return y[:, :, 0], y[:, :, 1], y[:, :, 2]

    def _fused_product(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x times the [hidden, 3 * hidden] query/key/value kernel (16-bit), and the float32 bias."""
        cfg, names = self.config, ("query", "key", "value")
        kernels = [_DenseKernel(cfg.hidden_size, self.dtype, hf_normal_init(cfg), name=n)(x.shape[-1]) for n in names]
        bias = jnp.concatenate([self.variables["params"][n]["bias"] for n in names])
        return jax.lax.dot_general(x.astype(self.dtype), jnp.concatenate(kernels, axis=1), (((x.ndim - 1,), (0,)), ((), ()))), bias

    def _fused_attention(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
        """What the 16-bit path computes, in `attention16`'s kernels (the same values, bit for bit,
        in Pallas' interpreter; the same dropout masks, drawn with the key `Dropout` would draw)."""
        cfg = self.config
        y, bias = self._fused_product(x)
        rate = cfg.attention_probs_dropout_prob
        key = None if deterministic or rate == 0.0 else _DropoutKey(name="Dropout_0")()
        heads = 3 * cfg.num_attention_heads
        context = attention16(
            y.reshape(*x.shape[:2], heads, cfg.head_dim), bias.reshape(heads, cfg.head_dim), key_mask, key, rate,
            interpret=self.attention == "fused_interpreted",
        )  # fmt: skip
        return context.reshape(*x.shape[:2], cfg.hidden_size)


class _DropoutKey(nn.Module):
    """The key a `Dropout` module of this name draws its mask with (Flax derives it from the name)."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("dropout")


class BertResidualOutput(nn.Module):
    """HF's BertSelfOutput / BertOutput: dense, dropout, then LayerNorm of the residual sum."""

    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, self.dtype, "dense")(x)
        x = _dropout(cfg.hidden_dropout_prob, self.dtype, self.rematerialised)(x, deterministic=deterministic)
        # A compute-dtype branch plus the float32 stream: float32.
        return _layer_norm(cfg, self.dtype, self.rematerialised)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        context = BertSelfAttention(self.config, self.dtype, self.rematerialised, self.attention, name="self")(
            x, key_mask, deterministic=deterministic, cls_only=cls_only
        )
        return BertResidualOutput(self.config, self.dtype, self.rematerialised, name="output")(
            context, x[:, :1] if cls_only else x, deterministic=deterministic
        )


def _activation16(name: str, u: jax.Array) -> jax.Array:
    """The activation of 16-bit `u` in float32, rounded once; its backward recomputes it from `u`."""
    return activation16(ACTIVATIONS[name], u)


class BertIntermediate(nn.Module):
    """The feed-forward block's first half: dense, then the activation.

    `rematerialised`: the layer runs under `nn.remat`, whose backward pass recomputes the
    activation anyway; there the plain autodiff is used (`_activation16`'s barrier would only
    keep XLA from fusing the recomputation: +0.5 GB per scanned step).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.config, self.config.intermediate_size, self.dtype, "dense")(x)
        if _is_16_bit(self.dtype) and not self.rematerialised:
            return _activation16(self.config.hidden_act, x)
        # Evaluated in float32 and rounded once, as torch's GELU kernel does for bf16/fp16 input.
        return ACTIVATIONS[self.config.hidden_act](x.astype(jnp.float32)).astype(self.dtype)


def _layer(
    config: BertConfig, dtype: Any, x: jax.Array, key_mask: jax.Array, deterministic: bool, cls_only: bool,
    rematerialised: bool = False, attention: str = "xla",
):  # fmt: skip
    """One transformer layer's submodules, created in the calling module (BertLayer or a scanned one)."""
    attention = BertAttention(config, dtype, rematerialised, attention, name="attention")
    x = attention(x, key_mask, deterministic=deterministic, cls_only=cls_only)
    if rematerialised and _is_16_bit(dtype):
        # Written out once: otherwise XLA recomputes the attention block's LayerNorm inside the
        # output block's, which then reads the layer's input (the scan's carry) while writing the
        # layer's output, and the new carry is copied (BERT-base's scanned step: 22 kernels fewer;
        # the copies' 0.55 GB go, most of it spent again on this array; eval: 36 copies -> 3).
        x = jax.lax.optimization_barrier(x)
    h = BertIntermediate(config, dtype, rematerialised, name="intermediate")(x)
    return BertResidualOutput(config, dtype, rematerialised, name="output")(h, x, deterministic=deterministic)


class BertLayer(nn.Module):
    """One transformer layer; with `cls_only`, only the [CLS] row's output ([batch, 1, hidden])."""

    config: BertConfig
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        return _layer(self.config, self.dtype, x, key_mask, deterministic, cls_only, attention=self.attention)


class _ScannedLayer(nn.Module):
    """A full layer as the body of `nn.scan`: (carry, key_mask) -> (carry, nothing)."""

    config: BertConfig
    dtype: Any
    deterministic: bool
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, None]:
        x = _layer(
            self.config, self.dtype, x, key_mask, self.deterministic, cls_only=False, rematerialised=True,
            attention=self.attention,
        )  # fmt: skip
        return x, None


class BertEncoder(nn.Module):
    """The layer stack; returns the last layer's [CLS] row, [batch, hidden] (with `every_row`,
    every row: [batch, length, hidden], what a masked-LM head reads).

    Layers 0 .. L-2 are one `nn.scan` (params stacked under `layers`, a dropout key per layer)
    or, without `scan_layers`, unrolled (`layer_0` ...); only the [CLS] row of the last layer
    reaches the pooler, so that layer (`layer_{L-1}`) projects queries, attends, and runs its
    output and feed-forward blocks for that row alone: the same logits for 10/12 less of one
    layer's matmul work per token. The parameter layout is the same either way.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    scan_layers: bool = True
    every_row: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool) -> jax.Array:
        last = self.config.num_hidden_layers - 1
        if not self.scan_layers:
            for i in range(last):
                x = BertLayer(self.config, self.dtype, self.attention, name=f"layer_{i}")(x, key_mask, deterministic=deterministic)
        elif last:
            # Saving only the weight matmuls' outputs for the backward pass (the rest is recomputed)
            # keeps the scan from copying every intermediate into stacked buffers: on an H100 the
            # step moves 21 GB instead of 27, and on CPU it is faster too (benchmarks/RESULTS.md).
            body = nn.remat(_ScannedLayer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable, prevent_cse=False)
            layers = nn.scan(
                body,
                variable_axes={"params": 0, "intermediates": 0},  # intermediates: for inspection only
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=last,
            )
            x, _ = layers(self.config, self.dtype, deterministic, self.attention, name="layers")(x, key_mask)
        x = BertLayer(self.config, self.dtype, self.attention, name=f"layer_{last}")(
            x, key_mask, deterministic=deterministic, cls_only=not self.every_row
        )
        return x if self.every_row else x[:, 0]


class BertPooler(nn.Module):
    """tanh(dense) of the [CLS] row, [batch, hidden]."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(self.config, self.config.hidden_size, self.dtype, "dense")(x))


class BertModel(nn.Module):
    """Embeddings, encoder and pooler; returns the pooled [batch, hidden] output. Without
    `add_pooling_layer` (transformers' name; its masked-LM models have no pooler) it returns the
    last layer's every row, [batch, length, hidden]."""

    config: BertConfig
    dtype: Any = jnp.float32
    scan_layers: bool = True
    add_pooling_layer: bool = True
    attention: str = "xla"  # see BertForSequenceClassification

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool,
    ) -> jax.Array:
        check_inputs(self.config, input_ids, token_type_ids, attention_mask)
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic=deterministic
        )
        every_row = not self.add_pooling_layer
        x = BertEncoder(self.config, self.dtype, self.scan_layers, every_row, self.attention, name="encoder")(
            x, attention_mask.astype(bool), deterministic=deterministic
        )
        return x if every_row else BertPooler(self.config, self.dtype, name="pooler")(x)


def check_inputs(config: BertConfig, input_ids: jax.Array, token_type_ids: jax.Array, attention_mask: jax.Array) -> None:
    """ValueError unless the inputs share one [batch, length] shape that the position table covers."""
    if input_ids.ndim != 2 or token_type_ids.shape != input_ids.shape or (
        attention_mask.shape != input_ids.shape
    ):
        raise ValueError(
            "input_ids, token_type_ids and attention_mask must share a [batch, length] shape, "
            f"got {input_ids.shape}, {token_type_ids.shape}, {attention_mask.shape}"
        )
    # JAX clamps out-of-range gathers, so a too-long input would silently reuse position 511.
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds "
            f"max_position_embeddings {config.max_position_embeddings}"
        )


class BertForSequenceClassification(nn.Module):
    """`transformers.BertForSequenceClassification` in Flax; returns float32 logits.

    Call as `model.apply({"params": params}, input_ids, token_type_ids, attention_mask,
    deterministic=False, rngs={"dropout": key})` for training; the default
    `deterministic=True` needs no rng. Inputs are int [batch, length]; `attention_mask` is 1 for
    real tokens and 0 for padding. `scan_layers` picks the encoder's layout (see `BertEncoder`);
    `attention` (ATTENTION) is "xla" (XLA's ops), "fused" (16-bit models: self-attention in
    `sda_jax.fused_attention`'s Triton kernels, a GPU's) or "fused_interpreted" (the same kernels
    in Pallas' interpreter, on any platform: the tests').
    """

    config: BertConfig
    dtype: Any = jnp.float32
    scan_layers: bool = True
    attention: str = "xla"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.config
        pooled = BertModel(cfg, self.dtype, self.scan_layers, attention=self.attention, name="bert")(
            input_ids, token_type_ids, attention_mask, deterministic=deterministic
        )
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = _dropout(rate, self.dtype)(pooled, deterministic=deterministic)
        logits = _dense(cfg, cfg.num_labels, self.dtype, "classifier")(pooled)
        return logits.astype(jnp.float32)


def init_params(config: BertConfig, rng: jax.Array, scan_layers: bool = True) -> dict[str, Any]:
    """Fresh float32 params with HF's initialisation, in the layout of `scan_layers`.

    Returns the inner dict `{"bert": ..., "classifier": ...}`; callers wrap it as
    `model.apply({"params": params}, ...)`.
    """
    dummy = jnp.zeros((1, 1), jnp.int32)
    return _jitted_init(config, scan_layers)({"params": rng}, dummy, dummy, dummy)["params"]


@functools.cache
def _jitted_init(config: BertConfig, scan_layers: bool) -> Callable[..., Any]:
    # One compiled init per config, rather than a retrace and recompile on every call.
    return jax.jit(BertForSequenceClassification(config, scan_layers=scan_layers).init)


def scans_layers(params: dict[str, Any]) -> bool:
    """Whether a param tree has the `scan_layers` layout (stacked `bert/encoder/layers`)."""
    return "layers" in params["bert"]["encoder"]


def flops_per_token(config: BertConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of this model, for model FLOPs utilisation.

    6 FLOPs per matmul weight per token (2 forward, 4 backward), plus 12 * hidden * seq_len per
    query row for the two attention matmuls (QK^T and PV), which have no weights. The last layer
    runs everything but its key and value projections for the [CLS] row alone (see
    `BertEncoder`), so that work, the pooler and the classifier are spread over the sequence.
    Embedding gathers are free.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    full_layer = 4 * h * h + 2 * h * config.intermediate_size
    last_layer_cls = 2 * h * h + 2 * h * config.intermediate_size  # query, output, feed-forward
    per_sequence = last_layer_cls + h * h + h * config.num_labels
    matmul_params = (layers - 1) * full_layer + 2 * h * h + per_sequence / seq_len
    return 6.0 * matmul_params + 12.0 * h * ((layers - 1) * seq_len + 1)
