"""The bucket policy: configured lengths, a fitted count, or the count the cost model finds cheapest."""

import dataclasses

import numpy as np
import pytest

from configs import default
from sda_jax.config import Settings
from sda_jax.data import bucketing, input_pipeline
from sda_jax.models.bert import flops_per_token
from sda_jax.models.config import BertConfig

DATA = Settings.from_config(default.get_config()).data
LENGTHS = np.random.default_rng(0).integers(8, 65, size=20_000)
BASE = BertConfig(21128, 768, 12, 12, 3072, 512)
SMALL = BASE.replace(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)


def choose(data=DATA, config=BASE, platform="gpu", epochs=1.0, lengths=LENGTHS):
    return bucketing.choose(data, lengths, flops_per_token(config, data.max_seq_len), platform, epochs)


def test_configured_and_fitted_lengths_are_taken_as_given():
    given = choose(dataclasses.replace(DATA, bucket_lengths=(32, 64)))
    assert given.lengths == (32, 64) and given.how == "configured"
    fitted = choose(dataclasses.replace(DATA, num_buckets=3))
    assert fitted.lengths == input_pipeline.fit_bucket_lengths(LENGTHS, 3, 64) and fitted.how == "fitted"


def test_cost_model_picks_the_cheapest_count_and_says_so():
    choice = choose()
    model = bucketing.CostModel.for_platform("gpu", flops_per_token(BASE, 64))
    total = lambda k: sum(model.cost(bucketing.padded_tokens(LENGTHS, input_pipeline.fit_bucket_lengths(LENGTHS, k, 64)), 1.0, k))
    assert sum(model.cost(bucketing.padded_tokens(LENGTHS, choice.lengths), 1.0, len(choice.lengths))) == pytest.approx(
        min(total(k) for k in range(1, 17))
    )
    assert choice.how == "cost model" and f"{list(choice.lengths)}" in choice.note and "µs per padded token" in choice.note


def test_padding_is_cheap_on_a_gpu_and_dear_on_a_cpu():
    # BERT-base on a GPU: launch- and memory-bound, compiling dominates: one length.
    assert len(choose().lengths) == 1
    # The small model on 2 CPU cores: padded tokens cost real time, so several lengths pay.
    cpu = choose(config=SMALL, platform="cpu")
    assert 2 <= len(cpu.lengths) <= bucketing.MAX_BUCKETS
    # More epochs make padding dearer relative to the one-off compiles: never fewer lengths.
    assert len(choose(config=SMALL, platform="cpu", epochs=10.0).lengths) >= len(cpu.lengths)
    assert cpu.lengths[-1] == 64


def test_all_examples_of_one_length_need_one_bucket():
    assert choose(config=SMALL, platform="cpu", lengths=np.full(1000, 64)).lengths == (64,)


def test_several_models_pay_for_padding_each():
    one = choose(config=SMALL, platform="cpu")
    eight = bucketing.choose(DATA, LENGTHS, flops_per_token(SMALL, DATA.max_seq_len), "cpu", 1.0, models=8)
    assert len(eight.lengths) > len(one.lengths) and "× 8 models" in eight.note
