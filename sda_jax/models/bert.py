"""BERT for sequence classification in Flax, numerically matching `transformers` (PyTorch).

The module tree mirrors Hugging Face's names (`bert/embeddings/word_embeddings`,
`.../attention/self/query`, `classifier`, ...) so that `hf_checkpoint` converts a PyTorch state
dict with a name mapping. With `scan_layers` (the default) all encoder layers but the last run
under `nn.scan`: their parameters are stacked along a leading axis (`bert/encoder/layers/...`,
one slice per layer) and XLA compiles one layer instead of eleven (BERT-base's train step for an
H100 compiles in fewer CPU-seconds, for a slower step: benchmarks/RESULTS.md). Without it the
layers are unrolled, `bert/encoder/layer_{i}`. The last layer, which runs for the [CLS]
row alone, is `bert/encoder/layer_{L-1}` either way.

Parameters are always float32; `dtype` only sets the compute dtype, as torch autocast does (the
layers' numerics: `sda_jax.models.layers`); the returned logits are float32. Every module takes
`forms` (`models.forms`): how its blocks are computed, the recipe's plain ops by default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sda_jax.models.config import BertConfig
from sda_jax.models.forms import REFERENCE, Forms, Stream
from sda_jax.models.layers import BertLayer, encoder_layer, hf_normal_init, layer_norm_for, make_dense, make_dropout


def word_embedding_init(config: BertConfig) -> nn.initializers.Initializer:
    """HF's embedding init: normal, with the `padding_idx` row zeroed."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        table = hf_normal_init(config)(key, shape, dtype)
        return table.at[config.pad_token_id].set(0.0)

    return init


class BertEmbeddings(nn.Module):
    """Word + token-type + position embeddings (+ ERNIE's task-type embedding), LayerNorm, dropout.

    The same module for `model_type` bert and ernie: an ERNIE config with `use_task_id` adds the
    `task_type_embeddings` table, under the same `bert/embeddings` path as the others.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    forms: Forms = REFERENCE

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
        x = layer_norm_for(cfg, self.forms)(x)
        return make_dropout(cfg.hidden_dropout_prob, self.forms)(x, deterministic=deterministic)


class _ScannedLayer(nn.Module):
    """A full layer as the body of `nn.scan`: (carry, key_mask) -> (carry, nothing)."""

    config: BertConfig
    forms: Forms
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, x: Stream, key_mask: jax.Array) -> tuple[Stream, None]:
        x = encoder_layer(self.config, self.forms, self.dtype, x, key_mask, self.deterministic, cls_only=False, rematerialised=True)
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
    forms: Forms = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool) -> jax.Array:
        last = self.config.num_hidden_layers - 1
        if not self.scan_layers:
            for i in range(last):
                x = BertLayer(self.config, self.forms, self.dtype, name=f"layer_{i}")(x, key_mask, deterministic=deterministic)
        elif last:
            # Saving only the weight matmuls' outputs for the backward pass (the rest is recomputed)
            # keeps the scan from copying every intermediate into stacked buffers, which moves less
            # memory on a GPU and is faster on CPU too (benchmarks/RESULTS.md, the scan's rows).
            body = nn.remat(_ScannedLayer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable, prevent_cse=False)
            layers = nn.scan(
                body,
                variable_axes={"params": 0, "intermediates": 0},  # intermediates: for inspection only
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=last,
            )
            x = self.forms.carry_in(x, self.dtype)
            x, _ = layers(self.config, self.forms, self.dtype, deterministic, name="layers")(x, key_mask)
        if not self.every_row:
            x = self.forms.float32(x)  # the [CLS] row's layer projects its rows separately
        x = self.forms.float32(BertLayer(self.config, self.forms, self.dtype, name=f"layer_{last}")(
            x, key_mask, deterministic=deterministic, cls_only=not self.every_row
        ))
        return x if self.every_row else x[:, 0]


class BertPooler(nn.Module):
    """tanh(dense) of the [CLS] row, [batch, hidden]."""

    config: BertConfig
    dtype: Any = jnp.float32
    forms: Forms = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(make_dense(self.config, self.config.hidden_size, self.dtype, self.forms, "dense")(x))


class BertModel(nn.Module):
    """Embeddings, encoder and pooler; returns the pooled [batch, hidden] output. Without
    `add_pooling_layer` (transformers' name; its masked-LM models have no pooler) it returns the
    last layer's every row, [batch, length, hidden]."""

    config: BertConfig
    dtype: Any = jnp.float32
    scan_layers: bool = True
    add_pooling_layer: bool = True
    forms: Forms = REFERENCE

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
        x = BertEmbeddings(self.config, self.dtype, self.forms, name="embeddings")(
            input_ids, token_type_ids, deterministic=deterministic
        )
        every_row = not self.add_pooling_layer
        x = BertEncoder(self.config, self.dtype, self.scan_layers, every_row, self.forms, name="encoder")(
            x, attention_mask.astype(bool), deterministic=deterministic
        )
        return x if every_row else BertPooler(self.config, self.dtype, self.forms, name="pooler")(x)


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
    `forms` how its blocks are computed (`models.forms`; `sda_jax.kernels.choose` gives the others).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    scan_layers: bool = True
    forms: Forms = REFERENCE

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
        pooled = BertModel(cfg, self.dtype, self.scan_layers, forms=self.forms, name="bert")(
            input_ids, token_type_ids, attention_mask, deterministic=deterministic
        )
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = make_dropout(rate, self.forms)(pooled, deterministic=deterministic)
        logits = make_dense(cfg, cfg.num_labels, self.dtype, self.forms, "classifier")(pooled)
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
