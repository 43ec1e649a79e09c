"""Our Flax BERT and checkpoint converter against tiny `transformers` (PyTorch) models.

Weights are re-drawn with a large std so logits are O(1): with HF's 0.02 init every logit is
about 0.01 and a 1e-5 tolerance would prove little.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import traverse_util

from sda_jax.errors import InputError
from sda_jax.hf.convert import (
    find_weights_file,
    load_pretrained,
    params_from_state_dict,
    read_state_dict,
    state_dict_from_params,
)
from sda_jax.models.bert import BertForSequenceClassification, BertModel, flops_per_token, init_params
from sda_jax.models.config import BertConfig
from sda_jax.models.dropout import Dropout, threefry_bits
from sda_jax.models.forms import REFERENCE
from sda_jax.models.layers import BertSelfAttention, Dense, LayerNorm
from tests.conftest import shard_torch_state_dict

# jax >= 0.9.1 can refuse 16-bit sums as it traces (jax_allow_f16_reductions); the minimum stack's cannot.
F16_SUM_CHECK = "jax_allow_f16_reductions" in jax.config.values

pytestmark = pytest.mark.api_surface  # the model, loading and export: .ci/run's minimum-versions job

TINY = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 3,  # two of them stacked under nn.scan
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 40,
}
BATCH, LENGTH = 6, 16
KEY = jax.random.key(0)


def hf_model(cls: type = transformers.BertForSequenceClassification, seed: int = 0, **kw):
    """A tiny HF model in eval mode with O(1) random weights everywhere (LayerNorm included)."""
    extra = {k: kw.pop(k) for k in ("add_pooling_layer",) if k in kw}
    torch.manual_seed(seed)
    config = transformers.BertConfig(**TINY, attn_implementation="eager", **kw)
    model = cls(config, **extra).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ids with variable-length padding, including a full row and an all-padding row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
    types = rng.integers(0, 2, (BATCH, LENGTH)).astype(np.int32)
    lengths = np.array([LENGTH, 9, 1, 5, 13, 0])
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
    return ids * mask, types * mask, mask


def hf_forward(model, ids: np.ndarray, types: np.ndarray, mask: np.ndarray):
    names = ("input_ids", "token_type_ids", "attention_mask")
    with torch.no_grad():
        return model(**{n: torch.from_numpy(x).long() for n, x in zip(names, (ids, types, mask))})


def hf_logits(model, *inputs: np.ndarray) -> np.ndarray:
    return hf_forward(model, *inputs).logits.numpy()


# One jitted function per config: jit compiles once, op-by-op dispatch compiles far more.
@functools.cache
def _apply(config: BertConfig, dtype: jnp.dtype = jnp.float32):
    model = BertForSequenceClassification(config, dtype=dtype)
    return jax.jit(model.apply, static_argnames="deterministic")


def our_logits(params, config: BertConfig, inputs, dtype=jnp.float32) -> np.ndarray:
    return np.asarray(_apply(config, dtype)({"params": params}, *inputs))


def saved(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return saved(hf_model(), tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def classifier(classifier_dir: Path):
    """(HF model, our config, our params) for the saved classifier."""
    model = transformers.BertForSequenceClassification.from_pretrained(
        classifier_dir, attn_implementation="eager"
    ).eval()
    config = BertConfig.from_json_file(classifier_dir / "config.json")
    params, _ = load_pretrained(classifier_dir, config, KEY)
    return model, config, params


def test_unrolled_and_scanned_layers_give_the_same_logits(classifier_dir: Path, classifier) -> None:
    _, config, scanned = classifier
    unrolled, _ = load_pretrained(classifier_dir, config, KEY, scan_layers=False)
    assert "layer_0" in unrolled["bert"]["encoder"] and "layers" in scanned["bert"]["encoder"]
    logits = lambda params, scan: np.asarray(
        BertForSequenceClassification(config, scan_layers=scan).apply({"params": params}, *batch())
    )
    np.testing.assert_allclose(logits(unrolled, False), logits(scanned, True), rtol=0, atol=1e-6)


def test_logits_match_transformers(classifier_dir: Path, classifier) -> None:
    model, config, _ = classifier
    params, report = load_pretrained(classifier_dir, config, KEY)
    assert report.initialized == () and report.unused == ()
    assert len(report.loaded) == 5 + 16 * config.num_hidden_layers + 4

    inputs = batch()
    expected, got = hf_logits(model, *inputs), our_logits(params, config, inputs)
    assert got.dtype == np.float32 and got.shape == (BATCH, 2)
    assert np.all(np.isfinite(got)), "an all-padding row must not give NaN"
    assert np.abs(expected).max() > 0.1, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_last_layer_runs_on_the_cls_row_alone(classifier) -> None:
    """The logits test above proves the shortcut exact; this proves it is taken."""
    _, config, params = classifier
    model = BertForSequenceClassification(config)
    _, captured = model.apply(
        {"params": params}, *batch(), capture_intermediates=lambda mdl, _: mdl.name == "intermediate"
    )
    encoder = captured["intermediates"]["bert"]["encoder"]
    last = config.num_hidden_layers - 1
    # The scanned layers stack their intermediates: [layers, batch, length, intermediate].
    assert encoder["layers"]["intermediate"]["__call__"][0].shape == (last, BATCH, LENGTH, config.intermediate_size)
    assert encoder[f"layer_{last}"]["intermediate"]["__call__"][0].shape == (BATCH, 1, config.intermediate_size)


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_match(tmp_path: Path, act: str) -> None:
    model = hf_model(hidden_act=act)
    config = BertConfig.from_json_file(saved(model, tmp_path) / "config.json")
    assert config.hidden_act == act
    params, _ = load_pretrained(tmp_path, config, KEY)
    inputs = batch(1)
    got, expected = our_logits(params, config, inputs), hf_logits(model, *inputs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_pytorch_bin_loads(tmp_path: Path, classifier) -> None:
    model, config, params = classifier
    # transformers v5 ignores safe_serialization=False, so write the old format directly.
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert find_weights_file(tmp_path) == tmp_path / "pytorch_model.bin"
    from_bin, report = load_pretrained(tmp_path, config, KEY)
    assert report.initialized == () and report.unused == ()
    inputs = batch()
    np.testing.assert_array_equal(
        our_logits(from_bin, config, inputs), our_logits(params, config, inputs)
    )


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    assert find_weights_file(tmp_path) is None
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_weights_file(tmp_path) == tmp_path / "model.safetensors"


@pytest.mark.parametrize("shard_format", ["safetensors", "bin"])
def test_sharded_checkpoint_loads(tmp_path: Path, classifier, shard_format: str) -> None:
    model, config, params = classifier
    if shard_format == "safetensors":
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        index = tmp_path / "model.safetensors.index.json"
    else:
        index = shard_torch_state_dict(model, tmp_path, tensors_per_shard=10)
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1 and find_weights_file(tmp_path) == index
    loaded, report = load_pretrained(tmp_path, config, KEY)
    assert report.initialized == () and report.unused == () and report.source == str(index)
    inputs = batch()
    np.testing.assert_array_equal(our_logits(loaded, config, inputs), our_logits(params, config, inputs))

    first = min(shards)
    promised = json.loads(index.read_text())
    promised["weight_map"]["bert.pooler.extra.weight"] = first
    index.write_text(json.dumps(promised))
    with pytest.raises(InputError, match="lacks 1 tensor.*bert.pooler.extra.weight"):
        load_pretrained(tmp_path, config, KEY)
    (tmp_path / first).unlink()
    with pytest.raises(InputError, match=f"shard '{first}' is missing"):
        load_pretrained(tmp_path, config, KEY)
    index.write_text("{not json")
    with pytest.raises(InputError, match="not a readable checkpoint index"):
        load_pretrained(tmp_path, config, KEY)


def test_legacy_gamma_beta_names(tmp_path: Path, classifier) -> None:
    model, config, params = classifier
    renames = (("LayerNorm.weight", "LayerNorm.gamma"), ("LayerNorm.bias", "LayerNorm.beta"))
    legacy = {}
    for name, tensor in model.state_dict().items():
        for new, old in renames:
            name = name.replace(new, old)
        legacy[name] = tensor
    assert sum(".gamma" in k for k in legacy) == 1 + 2 * config.num_hidden_layers
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    loaded, report = load_pretrained(tmp_path, config, KEY)
    assert report.unused == () and report.initialized == ()
    inputs = batch()
    np.testing.assert_array_equal(
        our_logits(loaded, config, inputs), our_logits(params, config, inputs)
    )


@pytest.mark.parametrize(
    ("cls", "has_pooler"),
    [(transformers.BertForMaskedLM, False), (transformers.BertForPreTraining, True)],
)
def test_pretraining_checkpoints(tmp_path: Path, cls: type, has_pooler: bool) -> None:
    pretrained = hf_model(cls)
    config = BertConfig.from_json_file(saved(pretrained, tmp_path) / "config.json")
    params, report = load_pretrained(tmp_path, config, KEY)
    pooler = () if has_pooler else ("bert.pooler.dense.weight", "bert.pooler.dense.bias")
    assert report.initialized == (*pooler, "classifier.weight", "classifier.bias")
    assert "cls.predictions.transform.dense.weight" in report.unused
    assert all(name.startswith("cls.") for name in report.unused)
    assert "has no classifier" in report.summary() and "cls." in report.summary()
    np.testing.assert_array_equal(
        params["bert"]["embeddings"]["word_embeddings"]["embedding"],
        pretrained.bert.embeddings.word_embeddings.weight.detach().numpy(),
    )
    assert params["classifier"]["kernel"].shape == (TINY["hidden_size"], 2)
    assert np.all(np.asarray(params["classifier"]["bias"]) == 0)
    assert np.asarray(params["classifier"]["kernel"]).std() > 0


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_model_checkpoint_without_prefix(tmp_path: Path, pooler: bool) -> None:
    base = hf_model(transformers.BertModel, add_pooling_layer=pooler)
    state = safetensors.numpy.load_file(saved(base, tmp_path) / "model.safetensors")
    assert not any(k.startswith("bert.") for k in state)
    config = BertConfig.from_json_file(tmp_path / "config.json")
    params, report = load_pretrained(tmp_path, config, KEY)
    assert report.unused == ()
    assert ("bert.pooler.dense.weight" in report.initialized) != pooler
    assert "classifier.weight" in report.initialized
    if pooler:
        inputs = batch()
        expected = hf_forward(base, *inputs).pooler_output.numpy()
        got = jax.jit(BertModel(config).apply, static_argnames="deterministic")(
            {"params": params["bert"]}, *inputs, deterministic=True
        )
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_other_label_count_reinitialises_head(classifier_dir: Path) -> None:
    config = BertConfig.from_json_file(classifier_dir / "config.json", num_labels=3)
    params, report = load_pretrained(classifier_dir, config, KEY)
    assert report.initialized == ("classifier.weight", "classifier.bias")
    assert set(report.unused) == {"classifier.weight", "classifier.bias"}
    assert "2 labels" in report.summary() and "3" in report.summary()
    assert our_logits(params, config, batch()).shape == (BATCH, 3)


def test_shape_mismatch_names_tensor(classifier_dir: Path) -> None:
    config = BertConfig.from_json_file(classifier_dir / "config.json", intermediate_size=36)
    tensor = r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight"
    with pytest.raises(InputError, match=tensor) as err:
        load_pretrained(classifier_dir, config, KEY)
    assert "[37, 32]" in str(err.value) and "[36, 32]" in str(err.value)
    assert "model.safetensors" in str(err.value)


def test_missing_encoder_tensor(classifier) -> None:
    model, config, _ = classifier
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["bert.encoder.layer.1.attention.self.key.weight"]
    tensor = r"bert\.encoder\.layer\.1\.attention\.self\.key\.weight"
    with pytest.raises(InputError, match=rf"^ckpt-x: .*{tensor}"):
        params_from_state_dict(state, config, KEY, source="ckpt-x")


def test_incomplete_head_is_an_error(classifier) -> None:
    model, config, _ = classifier
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "classifier.bias"}
    with pytest.raises(InputError, match="classifier.weight"):
        params_from_state_dict(state, config, KEY, source="ckpt")


def test_folder_without_weights(tmp_path: Path) -> None:
    config = BertConfig(**TINY)
    with pytest.raises(InputError, match="from_scratch") as err:
        load_pretrained(tmp_path, config, KEY)
    assert str(tmp_path) in str(err.value)


def test_corrupt_files(tmp_path: Path) -> None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        bad = tmp_path / name
        bad.write_bytes(b"\x00not a checkpoint at all")
        with pytest.raises(InputError, match=name):
            read_state_dict(bad)


def test_bin_without_torch_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(InputError, match="pip install torch"):
        read_state_dict(tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_safetensors_read_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"a": torch.randn(3, 4).to(dtype), "ids": torch.arange(5)}
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    state = read_state_dict(tmp_path / "model.safetensors")
    assert state["a"].dtype == np.float32
    np.testing.assert_array_equal(state["a"], tensors["a"].float().numpy())
    np.testing.assert_array_equal(state["ids"], np.arange(5))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_bit_identical(classifier, scan_layers: bool) -> None:
    model, config, _ = classifier
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    params, _ = params_from_state_dict(state, config, KEY, source="mem", scan_layers=scan_layers)
    assert ("layers" in params["bert"]["encoder"]) == scan_layers
    back = state_dict_from_params(params)
    assert list(back) == list(state)
    for name, array in back.items():
        assert array.dtype == np.float32 and array.flags.c_contiguous, name
        np.testing.assert_array_equal(array, state[name], err_msg=name)


def test_export_loads_in_transformers(tmp_path: Path, classifier) -> None:
    _, config, params = classifier
    config = config.replace(num_labels=3)
    head = {"kernel": jax.random.normal(KEY, (TINY["hidden_size"], 3)), "bias": jnp.arange(3.0)}
    params = {**params, "classifier": head}
    safetensors.numpy.save_file(state_dict_from_params(params), tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict(["a", "b", "c"])))
    model = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.num_labels == 3
    inputs = batch(2)
    got, expected = our_logits(params, config, inputs), hf_logits(model, *inputs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_init_params_tree_and_hf_init(classifier) -> None:
    _, config, loaded = classifier
    fresh = init_params(config, KEY)
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(loaded)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(fresh))
    emb = fresh["bert"]["embeddings"]
    assert np.all(np.asarray(emb["word_embeddings"]["embedding"][config.pad_token_id]) == 0)
    assert np.all(np.asarray(emb["LayerNorm"]["scale"]) == 1)
    query = fresh["bert"]["encoder"]["layers"]["attention"]["self"]["query"]  # stacked: [layers - 1, in, out]
    assert query["kernel"].shape == (config.num_hidden_layers - 1, config.hidden_size, config.hidden_size)
    assert np.all(np.asarray(query["bias"]) == 0)
    assert abs(float(np.asarray(query["kernel"]).std()) - config.initializer_range) < 0.005
    # Each scanned layer draws its own initial weights.
    deeper = init_params(config.replace(num_hidden_layers=3), KEY)["bert"]["encoder"]["layers"]["attention"]["self"]
    assert not np.array_equal(np.asarray(deeper["query"]["kernel"][0]), np.asarray(deeper["query"]["kernel"][1]))


def test_bfloat16_compute_close_to_float32(classifier) -> None:
    _, config, params = classifier
    inputs = batch()
    full = our_logits(params, config, inputs)
    half = our_logits(params, config, inputs, dtype=jnp.bfloat16)
    assert half.dtype == np.float32
    assert not np.array_equal(half, full), "bfloat16 compute looks like a no-op"
    np.testing.assert_allclose(half, full, atol=0.1 * np.abs(full).max())


def test_rejects_sequences_longer_than_position_table(classifier) -> None:
    _, config, params = classifier
    too_long = np.ones((1, config.max_position_embeddings + 1), np.int32)
    model = BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, too_long, too_long, too_long)


def test_dropout_needs_rng_only_when_not_deterministic(classifier) -> None:
    _, config, params = classifier
    inputs = batch()
    plain = our_logits(params, config, inputs)  # deterministic by default: no rngs given

    def train(seed: int) -> np.ndarray:
        rngs = {"dropout": jax.random.key(seed)}
        apply = _apply(config)
        return np.asarray(apply({"params": params}, *inputs, deterministic=False, rngs=rngs))

    assert not np.allclose(train(1), plain)
    assert not np.allclose(train(1), train(2))
    np.testing.assert_array_equal(train(1), train(1))

    # The self-attention block has no other dropout, so a change proves attention-probs dropout.
    attention = BertSelfAttention(config, REFERENCE)
    variables = {"params": params["bert"]["encoder"][f"layer_{config.num_hidden_layers - 1}"]["attention"]["self"]}
    x = jax.random.normal(KEY, (2, LENGTH, config.hidden_size))
    key_mask = jnp.ones((2, LENGTH), bool)
    rngs = {"dropout": jax.random.key(3)}
    eval_out = attention.apply(variables, x, key_mask, deterministic=True)
    train_out = attention.apply(variables, x, key_mask, deterministic=False, rngs=rngs)
    assert not np.allclose(train_out, eval_out), "attention-probs dropout is missing"


def test_dropout_keeps_one_minus_rate_and_scales_like_torch() -> None:
    rate = 0.1
    x = jnp.ones((64, 30, 257))  # odd last axis: the 16-bit halves of the last 32-bit draw are cut
    out = np.asarray(Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7)}))
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1.0 / (1.0 - rate), rtol=1e-7)
    # 493,440 draws: the kept fraction's standard deviation is 4e-4.
    assert abs(kept.mean() - (1.0 - rate)) < 2e-3, kept.mean()
    # The two halves of one 32-bit draw are independent: neighbours both kept as often as chance says.
    pairs = kept[..., 0:256:2] & kept[..., 1:256:2]
    assert abs(pairs.mean() - (1.0 - rate) ** 2) < 3e-3, pairs.mean()
    # Every position of the row is dropped at the rate (no column always kept, as a bad split would).
    assert abs(kept.mean(axis=(0, 1)) - (1.0 - rate)).max() < 0.03
    other = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(8)})
    assert not np.array_equal(out, np.asarray(other))
    np.testing.assert_array_equal(Dropout(rate).apply({}, x, deterministic=True), x)
    # Keys of another generator draw that generator's bits.
    rbg = np.asarray(Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7, impl="rbg")}))
    assert abs((rbg != 0).mean() - (1.0 - rate)) < 2e-3 and not np.array_equal(rbg, out)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5), (64, 4, 30, 15)])
def test_threefry_bits_are_jax_random_bits(shape) -> None:
    key = jax.random.key(12345)
    want = np.asarray(jax.random.bits(key, shape, jnp.uint32))
    np.testing.assert_array_equal(np.asarray(threefry_bits(key, shape)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(threefry_bits, static_argnums=1)(key, shape)), want)


def test_threefry_bits_refuses_the_old_draws_and_dropout_then_uses_jax_random_bits() -> None:
    key = jax.random.key(5)
    with jax.threefry_partitionable(False):
        with pytest.raises(ValueError, match="jax_threefry_partitionable=True draws only"):
            threefry_bits(key, (4, 4))
        out = Dropout(0.5).apply({}, jnp.ones((64, 64)), deterministic=False, rngs={"dropout": key})
    assert abs((np.asarray(out) != 0).mean() - 0.5) < 0.03


def test_dropout_rows_get_their_own_draws_and_jit_changes_nothing() -> None:
    x = jnp.ones((2, 8, 16))
    rngs = {"dropout": jax.random.key(1)}
    both = np.asarray(Dropout(0.5).apply({}, x, deterministic=False, rngs=rngs))
    assert not np.array_equal(both[0], both[1])
    again = jax.jit(lambda x: Dropout(0.5).apply({}, x, deterministic=False, rngs=rngs))(x)
    np.testing.assert_array_equal(both, np.asarray(again))


def test_layer_norm_matches_torch() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, (4, 7, 33)).astype(np.float32)
    scale, bias = rng.normal(1.0, 0.3, 33).astype(np.float32), rng.normal(0.0, 0.3, 33).astype(np.float32)
    ours = LayerNorm(1e-12).apply({"params": {"scale": scale, "bias": bias}}, x)
    theirs = torch.nn.functional.layer_norm(
        torch.from_numpy(x), (33,), torch.from_numpy(scale), torch.from_numpy(bias), 1e-12
    )
    np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-6, rtol=1e-6)
    # As under torch autocast, LayerNorm computes and returns float32 whatever it is given: the
    # residual stream stays float32 under bf16 compute.
    half = LayerNorm(1e-12).apply({"params": {"scale": scale, "bias": bias}}, x.astype(jnp.bfloat16))
    assert half.dtype == jnp.float32


def test_dense_is_flax_dense_in_float32_and_adds_its_bias_in_float32() -> None:
    x = jax.random.normal(KEY, (3, 5, 8))
    ours = Dense(4, jnp.float32, nn.initializers.normal(1.0))
    params = ours.init(KEY, x)
    np.testing.assert_array_equal(ours.apply(params, x), nn.Dense(4).apply(params, x))
    half = Dense(4, jnp.bfloat16, nn.initializers.normal(1.0))
    assert half.apply(params, x).dtype == jnp.bfloat16
    # The bias gradient is a float32 sum over rows, so it traces with 16-bit sums forbidden.
    loss = lambda p: jnp.sum(half.apply(p, x).astype(jnp.float32) ** 2)
    with _no_f16_sums():
        grads = jax.grad(loss)(params)
    assert grads["params"]["bias"].dtype == jnp.float32
    if not F16_SUM_CHECK:
        return
    with _no_f16_sums(), pytest.raises(ValueError, match="reduce_sum"):
        jax.grad(lambda p: jnp.sum(nn.Dense(4, dtype=jnp.bfloat16).apply(p, x).astype(jnp.float32) ** 2))(params)


@contextlib.contextmanager
def _no_f16_sums():
    if not F16_SUM_CHECK:
        yield
        return
    previous = jax.config.jax_allow_f16_reductions
    jax.config.update("jax_allow_f16_reductions", False)
    try:
        yield
    finally:
        jax.config.update("jax_allow_f16_reductions", previous)


def test_bfloat16_model_keeps_the_residual_stream_in_float32(classifier) -> None:
    _, config, params = classifier
    model = BertForSequenceClassification(config, dtype=jnp.bfloat16)
    _, captured = model.apply(
        {"params": params}, *batch(), capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in ("LayerNorm", "query", "intermediate")
    )
    flat = {"/".join(k): v[0] for k, v in traverse_util.flatten_dict(captured["intermediates"]).items()}
    norms = {k: v.dtype for k, v in flat.items() if "LayerNorm" in k}
    assert norms and set(norms.values()) == {jnp.dtype(jnp.float32)}, norms
    matmuls = {k: v.dtype for k, v in flat.items() if "query" in k or "intermediate" in k}
    assert matmuls and set(matmuls.values()) == {jnp.dtype(jnp.bfloat16)}, matmuls


def test_config_from_json_errors(tmp_path: Path, bert_base_chinese_dir: Path) -> None:
    path = tmp_path / "config.json"
    with pytest.raises(InputError, match="not found"):
        BertConfig.from_json_file(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"config\.json:1: malformed JSON"):
        BertConfig.from_json_file(path)
    fields = dataclasses.asdict(BertConfig(**TINY))
    path.write_text(json.dumps({k: v for k, v in fields.items() if k != "hidden_size"}))
    with pytest.raises(InputError, match="hidden_size"):
        BertConfig.from_json_file(path)
    path.write_text(json.dumps({**fields, "num_attention_heads": 5}))
    with pytest.raises(InputError, match="not a multiple"):
        BertConfig.from_json_file(path)
    path.write_text(json.dumps({**fields, "hidden_act": "swish"}))
    with pytest.raises(InputError, match="hidden_act"):
        BertConfig.from_json_file(path)
    path.write_text(json.dumps({**fields, "position_embedding_type": "relative_key"}))
    with pytest.raises(InputError, match="position_embedding_type"):
        BertConfig.from_json_file(path)
    if (bert_base_chinese_dir / "config.json").is_file():
        base = BertConfig.from_json_file(bert_base_chinese_dir / "config.json", num_labels=2)
        assert (base.vocab_size, base.hidden_size, base.num_hidden_layers) == (21128, 768, 12)


def test_to_hf_dict_round_trips(tmp_path: Path) -> None:
    config = BertConfig(**TINY, num_labels=3, hidden_act="gelu_new")
    hf = config.to_hf_dict(["neg", "neu", "pos"])
    assert hf["architectures"] == ["BertForSequenceClassification"] and hf["model_type"] == "bert"
    assert hf["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert BertConfig.from_json_file(tmp_path / "config.json") == config
    assert transformers.BertConfig(**hf).num_labels == 3
    with pytest.raises(ValueError, match="label names"):
        config.to_hf_dict(["a", "b"])


def test_flops_per_token_counts_matmul_params() -> None:
    config = BertConfig(**TINY)
    params = jax.eval_shape(lambda key: init_params(config, key), KEY)
    kernels = {
        "/".join(str(k.key) for k in path): x.size
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel"
    }
    last = f"bert/encoder/layer_{config.num_hidden_layers - 1}/"
    # Every token meets all encoder kernels but those of the last layer, where it only meets the
    # key and value projections; the [CLS] row alone meets the rest, the pooler and the classifier.
    def per_token(name: str) -> bool:
        if not name.startswith("bert/encoder/"):
            return False
        return not name.startswith(last) or name.endswith(("self/key/kernel", "self/value/kernel"))

    token_params = sum(n for name, n in kernels.items() if per_token(name))
    sequence_params = sum(n for name, n in kernels.items() if not per_token(name))
    assert token_params and sequence_params
    seq = 16
    attention = 12 * config.hidden_size * ((config.num_hidden_layers - 1) * seq + 1)
    assert flops_per_token(config, seq) == pytest.approx(6 * (token_params + sequence_params / seq) + attention)
    # bert-base: about 6 * 78M matmul params + attention
    big = BertConfig(30522, 768, 12, 12, 3072, 512, 2)
    assert 4.5e8 < flops_per_token(big, 128) < 5.0e8
