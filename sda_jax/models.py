"""BERT for sequence classification in Flax, numerically matching `transformers` (PyTorch).

The module tree mirrors Hugging Face's names (`bert/embeddings/word_embeddings`,
`bert/encoder/layer_3/attention/self/query`, `classifier`, ...) so that `hf_checkpoint` converts
a PyTorch state dict with a plain name mapping. Layers are unrolled rather than `nn.scan`-ned for
the same reason: one HF tensor is one leaf of our param tree.

Parameters are always float32; `dtype` only sets the compute dtype. In bfloat16/float16 the
matmuls run in that dtype while LayerNorm statistics, the attention softmax and the returned
logits stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sda_jax.dropout import Dropout
from sda_jax.errors import InputError

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF "gelu" is the exact erf form. jax.nn.gelu evaluates it as x/2 * erfc(-x/sqrt(2)); torch's
    # x/2 * (1 + erf(x/sqrt(2))) is 3% faster on CPU in XLA but lands 4x further from torch's
    # updates after 20 steps (XLA's and torch's erf round 1 + erf differently for negative x).
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# Fields without a default in our dataclass: a config.json lacking one of them is not a BERT config.
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
_INT_FIELDS = (*_REQUIRED_FIELDS, "type_vocab_size", "pad_token_id", "num_labels")
_FLOAT_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "initializer_range",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters under their Hugging Face `config.json` names."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2
    # HF falls back to hidden_dropout_prob when this is None; kept so fine-tuned configs round-trip.
    classifier_dropout: float | None = None

    def __post_init__(self) -> None:
        # ValueError here; from_json_file re-raises it as an InputError naming the file.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004 (see above)
            if value < (0 if name == "pad_token_id" else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        for name in (*_FLOAT_FIELDS, "classifier_dropout"):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")  # noqa: TRY004 (see above)
            if name.endswith(("dropout", "_prob")):
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"{name} must be in [0, 1), got {value}")
            elif value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} >= vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> BertConfig:
        """Read a Hugging Face `config.json`; unknown HF fields are ignored, `overrides` win."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: model config file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: cannot read model config: {err}") from None
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object, got {type(raw).__name__}")

        # Relative position embeddings change the attention maths, which this model lacks.
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise InputError(f"{path}: position_embedding_type {position_type!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputError(f"{path}: unknown BERT config override(s) {unknown}")
        values = {k: v for k, v in raw.items() if k in names}
        # Fine-tuned HF configs usually store id2label instead of num_labels.
        if "num_labels" not in values and isinstance(raw.get("id2label"), dict):
            values["num_labels"] = len(raw["id2label"])
        values.update(overrides)
        missing = [name for name in _REQUIRED_FIELDS if name not in values]
        if missing:
            raise InputError(f"{path}: missing required field(s) {', '.join(missing)}")
        try:
            return cls(**values)
        except ValueError as err:
            raise InputError(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self, label_names: Sequence[str]) -> dict[str, Any]:
        """A `config.json` dict that `transformers.BertForSequenceClassification` loads as is."""
        labels = list(label_names)
        if len(labels) != self.num_labels:
            raise ValueError(f"got {len(labels)} label names for num_labels={self.num_labels}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"label names are not unique: {labels}")
        fields = dataclasses.asdict(self)
        del fields["num_labels"]  # HF derives it from id2label
        return {
            "architectures": ["BertForSequenceClassification"],
            "model_type": "bert",
            **fields,
            "position_embedding_type": "absolute",
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)},
        }


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


def _dense(config: BertConfig, features: int, dtype: Any, name: str) -> nn.Dense:
    # Zero bias and float32 params are the Flax defaults; only the kernel init is HF-specific.
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=hf_normal_init(config),
        name=name,
    )


class LayerNorm(nn.Module):
    """torch's LayerNorm, (x - mean) * rsqrt(var + eps) * scale + bias, statistics in float32.

    Params `scale`/`bias` as in `nn.LayerNorm`. Flax folds the scale into the normaliser,
    (x - mean) * (rsqrt(var + eps) * scale), a [batch, length, hidden] product that its backward
    pass keeps; scaling the normalised rows afterwards does not need it (the small model's CPU
    train step: 2.5% faster) and lands closer to torch's updates in the parity tests. The variance
    is two-pass, mean((x - mean)^2), as in torch.
    """

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x = x.astype(jnp.float32)
        centered = x - jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        normalised = centered * jax.lax.rsqrt(variance + self.epsilon)
        return (normalised * scale + bias).astype(self.dtype)


def _layer_norm(config: BertConfig, dtype: Any) -> LayerNorm:
    return LayerNorm(config.layer_norm_eps, dtype, name="LayerNorm")


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, *, deterministic: bool
    ) -> jax.Array:
        cfg = self.config

        def embed(num: int, name: str, init: nn.initializers.Initializer) -> nn.Embed:
            # Lookups are cheap; the sum stays float32 until LayerNorm casts to the compute dtype.
            return nn.Embed(
                num, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32, name=name
            )

        positions = jnp.arange(input_ids.shape[1])[None, :]
        # Same summation order as HF: (word + token_type) + position.
        x = embed(cfg.vocab_size, "word_embeddings", word_embedding_init(cfg))(input_ids)
        normal = hf_normal_init(cfg)
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings", normal)(token_type_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings", normal)(positions)
        x = _layer_norm(cfg, self.dtype)(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        """Attention of every row of `x` ([batch, 1, hidden] of the [CLS] row alone if `cls_only`)."""
        cfg = self.config

        def project(name: str, inputs: jax.Array) -> jax.Array:
            y = _dense(cfg, cfg.hidden_size, self.dtype, name)(inputs)
            return y.reshape(*inputs.shape[:2], cfg.num_attention_heads, cfg.head_dim)

        q = project("query", x[:, :1] if cls_only else x)
        k, v = project("key", x), project("value", x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (cfg.head_dim**-0.5)
        # Equal to HF's additive finfo.min mask after rounding, but cannot overflow to -inf, so a
        # row with every key masked (an all-padding example) gets a uniform softmax, not NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return context.reshape(*q.shape[:2], cfg.hidden_size)


class BertResidualOutput(nn.Module):
    """HF's BertSelfOutput / BertOutput: dense, dropout, then LayerNorm of the residual sum."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, self.dtype, "dense")(x)
        x = Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return _layer_norm(cfg, self.dtype)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        context = BertSelfAttention(self.config, self.dtype, name="self")(
            x, key_mask, deterministic=deterministic, cls_only=cls_only
        )
        return BertResidualOutput(self.config, self.dtype, name="output")(
            context, x[:, :1] if cls_only else x, deterministic=deterministic
        )


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.config, self.config.intermediate_size, self.dtype, "dense")(x)
        return _ACTIVATIONS[self.config.hidden_act](x)


class BertLayer(nn.Module):
    """One transformer layer; with `cls_only`, only the [CLS] row's output ([batch, 1, hidden])."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool, cls_only: bool = False
    ) -> jax.Array:
        x = BertAttention(self.config, self.dtype, name="attention")(
            x, key_mask, deterministic=deterministic, cls_only=cls_only
        )
        h = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return BertResidualOutput(self.config, self.dtype, name="output")(
            h, x, deterministic=deterministic
        )


class BertEncoder(nn.Module):
    """The layer stack; returns the last layer's [CLS] row, [batch, hidden]."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool) -> jax.Array:
        last = self.config.num_hidden_layers - 1
        for i in range(self.config.num_hidden_layers):
            # Only the [CLS] row of the last layer reaches the pooler, so that layer projects
            # queries, attends, and runs its output and feed-forward blocks for that row alone:
            # the same logits for 10/12 less of one layer's matmul work per token.
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(
                x, key_mask, deterministic=deterministic, cls_only=i == last
            )
        return x[:, 0]


class BertPooler(nn.Module):
    """tanh(dense) of the [CLS] row, [batch, hidden]."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(self.config, self.config.hidden_size, self.dtype, "dense")(x))


class BertModel(nn.Module):
    """Embeddings, encoder and pooler; returns the pooled [batch, hidden] output."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool,
    ) -> jax.Array:
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic=deterministic
        )
        x = BertEncoder(self.config, self.dtype, name="encoder")(
            x, attention_mask.astype(bool), deterministic=deterministic
        )
        return BertPooler(self.config, self.dtype, name="pooler")(x)


class BertForSequenceClassification(nn.Module):
    """`transformers.BertForSequenceClassification` in Flax; returns float32 logits.

    Call as `model.apply({"params": params}, input_ids, token_type_ids, attention_mask,
    deterministic=False, rngs={"dropout": key})` for training; the default
    `deterministic=True` needs no rng. Inputs are int [batch, length]; `attention_mask` is 1 for
    real tokens and 0 for padding.
    """

    config: BertConfig
    dtype: Any = jnp.float32

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
        if input_ids.ndim != 2 or token_type_ids.shape != input_ids.shape or (
            attention_mask.shape != input_ids.shape
        ):
            raise ValueError(
                "input_ids, token_type_ids and attention_mask must share a [batch, length] shape, "
                f"got {input_ids.shape}, {token_type_ids.shape}, {attention_mask.shape}"
            )
        # JAX clamps out-of-range gathers, so a too-long input would silently reuse position 511.
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds "
                f"max_position_embeddings {cfg.max_position_embeddings}"
            )
        pooled = BertModel(cfg, self.dtype, name="bert")(
            input_ids, token_type_ids, attention_mask, deterministic=deterministic
        )
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = Dropout(rate)(pooled, deterministic=deterministic)
        logits = _dense(cfg, cfg.num_labels, self.dtype, "classifier")(pooled)
        return logits.astype(jnp.float32)


def init_params(config: BertConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh float32 params with HF's initialisation.

    Returns the inner dict `{"bert": ..., "classifier": ...}`; callers wrap it as
    `model.apply({"params": params}, ...)`.
    """
    dummy = jnp.zeros((1, 1), jnp.int32)
    return _jitted_init(config)({"params": rng}, dummy, dummy, dummy)["params"]


@functools.cache
def _jitted_init(config: BertConfig) -> Callable[..., Any]:
    # One compiled init per config, rather than a retrace and recompile on every call.
    return jax.jit(BertForSequenceClassification(config).init)


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
