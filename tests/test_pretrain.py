"""Task-adaptive pretraining (issue 22): the masked-LM head against transformers, the masking, and
a short MLM run end to end (resume, export, fill-mask, fine-tuning from the export).

The model is a tiny random BERT with the real 21,128-token vocabulary (the decoder is tied to
that table, so the vocabulary is what the head's parity is about); one short run is shared by the
tests that need one.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sda_jax.bert_config import BertConfig
from sda_jax.hf_checkpoint import load_pretrained_models, state_dict_from_params
from sda_jax.masked_lm import BertForMaskedLM

VOCAB = 21128
TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64}


def hf_mlm(cls, config_cls, seed: int = 0, **extra):
    """A tiny transformers masked-LM model, O(1) random weights (LayerNorm included), eval mode."""
    torch.manual_seed(seed)
    model = cls(config_cls(vocab_size=VOCAB, attn_implementation="eager", **TINY, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def inputs(seed: int = 0, batch: int = 4, length: int = 24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (batch, length)).astype(np.int32)
    types = rng.integers(0, 2, (batch, length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < np.array([length, 17, 5, 11])[:, None]).astype(np.int32)
    return ids * mask, types * mask, mask


@functools.cache
def _apply(config: BertConfig, scan_layers: bool):
    return jax.jit(BertForMaskedLM(config, scan_layers=scan_layers).apply)


@pytest.mark.parametrize("kind", ["bert", "ernie"])
def test_mlm_logits_equal_transformers(tmp_path, kind):
    if kind == "bert":
        model = hf_mlm(transformers.BertForMaskedLM, transformers.BertConfig)
    else:
        model = hf_mlm(transformers.ErnieForMaskedLM, transformers.ErnieConfig, use_task_id=True)
    model.save_pretrained(tmp_path)
    config = BertConfig.from_json_file(tmp_path / "config.json")
    ids, types, mask = inputs()
    with torch.no_grad():
        names = ("input_ids", "token_type_ids", "attention_mask")
        expected = model(**{n: torch.from_numpy(x).long() for n, x in zip(names, (ids, types, mask))}).logits.numpy()
    for scan in (True,):  # the unrolled layout converts as the classifier's does (tests/test_models.py)
        [params], report = load_pretrained_models(tmp_path, config, [jax.random.key(0)], scan, masked_lm=True)
        assert not report.unused and not report.initialized, report.summary()
        ours = np.asarray(_apply(config, scan)({"params": params}, ids, types, mask))
        real = mask.astype(bool)
        delta = float(np.abs(ours[real] - expected[real]).max())
        print(f"parity: {kind} scan={scan} max |Δlogit| {delta:.2e} (logits up to {np.abs(expected[real]).max():.1f})")
        assert delta < 1e-5
        # The head on the gathered positions alone gives those rows' logits.
        positions = np.array([[0, 3, 7], [1, 2, 16], [4, 0, 0], [10, 5, 9]], np.int32)
        gathered = np.asarray(_apply(config, scan)({"params": params}, ids, types, mask, positions=positions))
        np.testing.assert_allclose(gathered, np.take_along_axis(ours, positions[..., None], 1), atol=1e-5)
        # And back: our params are the file's tensors, the tied decoder left to transformers.
        state = state_dict_from_params(params, config.model_type)
        reference = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder")}
        assert state.keys() == reference.keys() - {f"{config.model_type}.embeddings.position_ids"}
        for key, value in state.items():
            np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_mlm_head_is_fresh_from_a_classifier_and_the_classifier_unused(tmp_path):
    classifier = hf_mlm(transformers.BertForSequenceClassification, transformers.BertConfig)
    classifier.save_pretrained(tmp_path)
    config = BertConfig.from_json_file(tmp_path / "config.json")
    [params], report = load_pretrained_models(tmp_path, config, [jax.random.key(0)], masked_lm=True)
    assert "masked-LM head" in report.summary() and "classifier.weight" in report.unused and "bert.pooler.dense.weight" in report.unused
    head = params["cls"]["predictions"]
    np.testing.assert_array_equal(head["transform"]["LayerNorm"]["scale"], np.ones(32))
    np.testing.assert_array_equal(head["bias"], np.zeros(VOCAB))
    assert 0.01 < float(jnp.std(head["transform"]["dense"]["kernel"])) < 0.03  # HF's N(0, 0.02)
