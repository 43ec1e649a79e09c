"""BERT (or ERNIE) with transformers' masked-LM head in Flax, and its loss.

`BertForMaskedLM` is `transformers.BertForMaskedLM` (`ErnieForMaskedLM` for an ERNIE config): the
encoder without a pooler, then `cls/predictions/transform/{dense, LayerNorm}` (dense, the
encoder's activation, LayerNorm) and a decoder tied to the word embeddings with its own bias
`cls/predictions/bias`. The parameter tree is the classifier's `bert/...` (without the pooler)
plus `cls/...`, so `hf_checkpoint` converts it with the same name mapping.

Given `positions` ([batch, predictions], the masked positions of each row), the head runs on
those rows alone: the decoder is a [hidden, vocab] matmul per row (21,128 wide for Chinese
BERT), and only ~15% of the rows are predicted, so this is most of the head's work saved. Without
`positions` it returns every row's logits, as transformers does (the parity test compares those).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sda_jax.models.bert import BertModel
from sda_jax.models.config import BertConfig
from sda_jax.models.forms import REFERENCE, Forms
from sda_jax.models.layers import ACTIVATIONS, layer_norm_for, make_dense


class BertForMaskedLM(nn.Module):
    """Float32 logits [batch, length, vocab] (with `positions`, [batch, predictions, vocab]).

    Called as `BertForSequenceClassification` is, with `positions` an optional int [batch, P].
    """

    config: BertConfig
    dtype: Any = jnp.float32
    scan_layers: bool = True
    forms: Forms = REFERENCE  # as BertForSequenceClassification's

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool = True,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        hidden = BertModel(cfg, self.dtype, self.scan_layers, add_pooling_layer=False, forms=self.forms, name="bert")(
            input_ids, token_type_ids, attention_mask, deterministic=deterministic
        )
        if positions is not None:
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        table = self.variables["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
        return _OnlyMLMHead(cfg, self.forms, self.dtype, name="cls")(hidden, table)


class _OnlyMLMHead(nn.Module):
    """transformers' BertOnlyMLMHead (`cls`), whose `predictions` is the LM prediction head."""

    config: BertConfig
    forms: Forms
    dtype: Any

    @nn.compact
    def __call__(self, hidden: jax.Array, table: jax.Array) -> jax.Array:
        return _LMPredictionHead(self.config, self.forms, self.dtype, name="predictions")(hidden, table)


class _LMPredictionHead(nn.Module):
    """transformers' BertLMPredictionHead: the transform, then the decoder tied to the word
    embedding `table` [vocab, hidden] with its own float32 `bias`."""

    config: BertConfig
    forms: Forms
    dtype: Any

    @nn.compact
    def __call__(self, hidden: jax.Array, table: jax.Array) -> jax.Array:
        cfg = self.config
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
        hidden = _Transform(cfg, self.forms, self.dtype, name="transform")(hidden)
        logits = jnp.einsum(
            "...h,vh->...v", hidden.astype(self.dtype), table.astype(self.dtype), preferred_element_type=jnp.float32
        )
        return logits + bias


class _Transform(nn.Module):
    """transformers' BertPredictionHeadTransform: dense, the encoder's activation, LayerNorm (float32)."""

    config: BertConfig
    forms: Forms
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = make_dense(cfg, cfg.hidden_size, self.dtype, self.forms, "dense")(x)
        x = ACTIVATIONS[cfg.hidden_act](x.astype(jnp.float32))
        return layer_norm_for(cfg, self.forms)(x)


def init_mlm_params(config: BertConfig, rng: jax.Array, scan_layers: bool = True) -> dict[str, Any]:
    """Fresh float32 params of `BertForMaskedLM` with HF's initialisation: `{"bert": ..., "cls": ...}`."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    return _jitted_init(config, scan_layers)({"params": rng}, dummy, dummy, dummy)["params"]


@functools.cache
def _jitted_init(config: BertConfig, scan_layers: bool) -> Callable[..., Any]:
    return jax.jit(BertForMaskedLM(config, scan_layers=scan_layers).init)


def mlm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean cross-entropy over the predicted tokens, how many of them the argmax gets right, how
    many there are): transformers' loss with ignore_index, the weights 0 where nothing is predicted."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = weights.sum()
    correct = ((jnp.argmax(logits, axis=-1) == targets) * weights).sum()
    return (nll * weights).sum() / jnp.maximum(count, 1.0), correct, count
