"""Builds the run's model and its initial parameters from the model folder named in the config.

A Hugging Face folder gives the architecture (config.json) and, unless the config explicitly asks
for training from scratch, the weights; a folder without weights is an error, never a silent
random initialisation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sda_jax.config import Settings
from sda_jax.errors import InputError
from sda_jax.hf import convert
from sda_jax.models.bert import BertForSequenceClassification, init_params
from sda_jax.models.config import BertConfig
from sda_jax.models.forms import REFERENCE, Forms
from sda_jax.models.masked_lm import BertForMaskedLM, init_mlm_params
from sda_jax.step.model_axis import Models


def bert_config(settings: Settings, vocab_size: int) -> BertConfig:
    """The architecture: the folder's config.json, the config's overrides, one head per label."""
    config = BertConfig.from_json_file(
        settings.model.dir / "config.json",
        num_labels=len(settings.data.label_names),
        **dict(settings.model.overrides),
    )
    if vocab_size > config.vocab_size:
        raise InputError(
            f"{settings.model.dir / 'vocab.txt'}: the vocabulary has {vocab_size} tokens but the "
            f"embedding table in config.json has only {config.vocab_size}"
        )
    if settings.data.max_seq_len > config.max_position_embeddings:
        raise InputError(
            f"config key data.max_seq_len: {settings.data.max_seq_len} exceeds the model's "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    return config


def load_models(
    settings: Settings, vocab_size: int, models: Models, init_keys: list[jax.Array], dtype: jnp.dtype, masked_lm: bool = False,
    forms: Forms = REFERENCE,
) -> tuple[Any, dict[str, Any], str]:
    """Returns (model, float32 params of every model stacked on the model axis, a one-paragraph
    note of where they came from); the classifier, or with `masked_lm` `masked_lm.BertForMaskedLM`.
    A checkpoint is read and converted once for all models; each model's own key initialises its
    fresh heads, or all of its weights when training from scratch. `forms`: how the model computes
    its blocks (`sda_jax.kernels.choose`)."""
    config = bert_config(settings, vocab_size)
    scan = settings.model.scan_layers
    model = (BertForMaskedLM if masked_lm else BertForSequenceClassification)(config=config, dtype=dtype, scan_layers=scan, forms=forms)
    init = init_mlm_params if masked_lm else init_params
    if settings.model.from_scratch:
        note = (
            f"Initialised a {config.num_hidden_layers}-layer, {config.hidden_size}-wide {config.model_type.upper()} from "
            f"scratch (model.from_scratch=True); architecture from {settings.model.dir / 'config.json'}."
        )
        return model, models.stack([init(config, key, scan) for key in init_keys]), note
    params, report = convert.load_pretrained_models(settings.model.dir, config, init_keys, scan, masked_lm)
    return model, models.stack(params), report.summary()
