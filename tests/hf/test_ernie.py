"""ERNIE (`model_type: "ernie"`) checkpoints in and out, against tiny `transformers` ERNIE models.

The models have 2 layers and the real 21,128-token bert-base-chinese vocabulary, with ERNIE 3.0's
config fields (`use_task_id`, 3 task types, 4 token types, LayerNorm eps 1e-5) and weights
N(0, 0.2) (LayerNorm scales 1 + N(0, 0.2)), so that logits are O(1) and a 1e-5 tolerance says
something. Inputs are real AFQMC dev pairs, tokenized and batched as training does.

What it measures (python -m pytest tests/hf/test_ernie.py -q -rP | grep parity:): the largest
|ours - transformers| logit difference at each bucket length, and the exported run's.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from configs import default
from sda_jax import export
from sda_jax.config import Settings
from sda_jax.data import input_pipeline, splits, tokenization
from sda_jax.errors import InputError
from sda_jax.hf.convert import (
    find_weights_file,
    load_pretrained,
    params_from_state_dict,
    state_dict_from_params,
)
from sda_jax.models.bert import BertForSequenceClassification, BertModel
from sda_jax.models.config import BertConfig
from tests.conftest import shard_torch_state_dict, train_in_process

ARCH = {
    "vocab_size": 21128,  # the real bert-base-chinese vocabulary
    "hidden_size": 64,
    "num_hidden_layers": 2,  # layer 0 under nn.scan, layer 1 unrolled
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    # ERNIE 3.0's values where they differ from BERT's defaults.
    "type_vocab_size": 4,
    "task_type_vocab_size": 3,
    "layer_norm_eps": 1e-5,
}
INIT_STD = 0.2
BUCKETS = (16, 32, 48, 64)
LOGITS_ATOL = 1e-5
EXPORT_LOGITS_ATOL = 1e-4
KEY = jax.random.key(0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ernie_model(cls: type = transformers.ErnieForSequenceClassification, use_task_id: bool = True, seed: int = 0, **kw):
    """A tiny transformers ERNIE in eval mode with O(1) random weights everywhere."""
    torch.manual_seed(seed)
    config = transformers.ErnieConfig(**ARCH, use_task_id=use_task_id, attn_implementation="eager")
    model = cls(config, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, INIT_STD)
    return model


def state_of(model) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}


@functools.cache
def _apply(config: BertConfig, scan_layers: bool):
    return jax.jit(BertForSequenceClassification(config, scan_layers=scan_layers).apply)


def our_logits(config: BertConfig, params, batches, scan_layers: bool = True) -> np.ndarray:
    apply = _apply(config, scan_layers)
    out = [
        np.asarray(apply({"params": params}, b["input_ids"], b["token_type_ids"], b["attention_mask"]))[b["weights"] > 0]
        for b in batches
    ]
    return np.concatenate(out)


def hf_logits(model, batches) -> np.ndarray:
    """transformers' logits of the real rows, called as a user would: no task_type_ids."""
    out = []
    with torch.no_grad():
        for b in batches:
            real = b["weights"] > 0
            inputs = {n: torch.from_numpy(b[n][real]).long() for n in ("input_ids", "token_type_ids", "attention_mask")}
            out.append(model(**inputs).logits.numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def tokenizer(bert_base_chinese_dir):
    return tokenization.load_tokenizer(bert_base_chinese_dir)


@pytest.fixture(scope="module")
def dev(afqmc_dir, tokenizer):
    data = Settings.from_config(default.get_config()).data
    return splits.read_split(data, "dev", tokenizer)


@pytest.fixture(scope="module")
def dev_batches(dev) -> dict[int, list[dict[str, np.ndarray]]]:
    """Two batches of 32 real dev pairs at each bucket length, padded as evaluation pads them
    (examples in length order, so that every bucket length occurs)."""
    by_width: dict[int, list] = {width: [] for width in BUCKETS}
    order = input_pipeline.eval_order(dev)
    for batch in input_pipeline.eval_batches(dev, batch_size=32, bucket_lengths=BUCKETS, order=order):
        width = batch["input_ids"].shape[1]
        if len(by_width[width]) < 2 and batch["weights"].all():
            by_width[width].append(batch)
    assert all(len(batches) == 2 for batches in by_width.values()), {w: len(b) for w, b in by_width.items()}
    return by_width


@pytest.fixture(scope="module")
def saved_ernie(tmp_path_factory) -> dict[bool, tuple[Path, transformers.ErnieForSequenceClassification]]:
    """use_task_id -> (a saved ErnieForSequenceClassification folder, the model)."""
    out = {}
    for use_task_id in (True, False):
        model = ernie_model(use_task_id=use_task_id)
        path = tmp_path_factory.mktemp(f"ernie_task{int(use_task_id)}")
        model.save_pretrained(path)
        out[use_task_id] = path, model
    return out


# --- Config ----------------------------------------------------------------------------------


def test_config_reads_ernie_fields(saved_ernie) -> None:
    path, _ = saved_ernie[True]
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "ernie" and raw["use_task_id"] is True
    config = BertConfig.from_json_file(path / "config.json")
    assert (config.model_type, config.use_task_id, config.task_type_vocab_size) == ("ernie", True, 3)
    assert (config.type_vocab_size, config.layer_norm_eps, config.vocab_size) == (4, 1e-5, 21128)
    assert BertConfig.from_json_file(saved_ernie[False][0] / "config.json").use_task_id is False


def test_to_hf_dict_writes_ernie_and_leaves_bert_as_it_was(tmp_path: Path, saved_ernie) -> None:
    config = BertConfig.from_json_file(saved_ernie[True][0] / "config.json", num_labels=3)
    hf = config.to_hf_dict(["a", "b", "c"])
    assert hf["architectures"] == ["ErnieForSequenceClassification"] and hf["model_type"] == "ernie"
    assert hf["use_task_id"] is True and hf["task_type_vocab_size"] == 3
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert BertConfig.from_json_file(tmp_path / "config.json") == config
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, transformers.ErnieConfig) and loaded.use_task_id and loaded.num_labels == 3

    bert = BertConfig(**{k: v for k, v in ARCH.items() if k != "task_type_vocab_size"}).to_hf_dict(["0", "1"])
    assert bert["model_type"] == "bert" and bert["architectures"] == ["BertForSequenceClassification"]
    assert "use_task_id" not in bert and "task_type_vocab_size" not in bert
    # A BERT config.json carrying ERNIE's fields is still BERT (transformers.BertModel ignores them),
    # and one without model_type, as old folders have, is BERT.
    (tmp_path / "config.json").write_text(json.dumps({**bert, "use_task_id": True}))
    assert not BertConfig.from_json_file(tmp_path / "config.json").use_task_id
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in bert.items() if k != "model_type"}))
    assert BertConfig.from_json_file(tmp_path / "config.json").model_type == "bert"
    with pytest.raises(ValueError, match="use_task_id"):
        BertConfig(**ARCH, use_task_id=True)


@pytest.mark.parametrize("model_type", ["roberta", "albert", "ernie_m", "", None, ["bert"]])
def test_unsupported_model_type_is_one_line(tmp_path: Path, saved_ernie, model_type: str) -> None:
    raw = json.loads((saved_ernie[True][0] / "config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**raw, "model_type": model_type}))
    with pytest.raises(InputError) as err:
        BertConfig.from_json_file(path)
    message = str(err.value)
    assert "\n" not in message
    assert message == f"{path}: model_type {model_type!r} is not supported (supported: bert, ernie)"


# --- Weights in: parity with transformers ----------------------------------------------------


@pytest.mark.parametrize("use_task_id", [True, False])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_at_every_bucket_length(saved_ernie, dev_batches, use_task_id, scan_layers) -> None:
    path, model = saved_ernie[use_task_id]
    config = BertConfig.from_json_file(path / "config.json")
    params, report = load_pretrained(path, config, KEY, scan_layers=scan_layers)
    assert report.unused == () and report.initialized == ()
    assert len(report.loaded) == 5 + use_task_id + 16 * ARCH["num_hidden_layers"] + 4
    assert ("layers" in params["bert"]["encoder"]) == scan_layers
    assert ("task_type_embeddings" in params["bert"]["embeddings"]) == use_task_id

    diffs = {}
    for width, batches in dev_batches.items():
        assert {b["input_ids"].shape[1] for b in batches} == {width}
        theirs, ours = hf_logits(model, batches), our_logits(config, params, batches, scan_layers)
        assert ours.shape == theirs.shape == (64, 2)
        # O(1) logits that depend on the input: a 1e-5 tolerance then says something.
        assert np.abs(theirs).max() > 1.0 and theirs.std(axis=0).min() > 0.1, theirs.std(axis=0)
        diffs[width] = float(np.abs(ours - theirs).max())
    shown = ", ".join(f"{width}: {diff:.2e}" for width, diff in diffs.items())
    print(f"parity: ERNIE use_task_id={use_task_id} scan_layers={scan_layers}, max |ours - transformers| by bucket length: {shown}")
    assert max(diffs.values()) <= LOGITS_ATOL, diffs


def test_task_type_row_0_is_the_one_transformers_adds(saved_ernie, dev_batches) -> None:
    """transformers adds task type 0 when no task_type_ids are given; another row, or none, is far off."""
    path, model = saved_ernie[True]
    config = BertConfig.from_json_file(path / "config.json")
    params, _ = load_pretrained(path, config, KEY)
    batches = dev_batches[32]
    theirs = hf_logits(model, batches)
    np.testing.assert_allclose(our_logits(config, params, batches), theirs, rtol=0, atol=LOGITS_ATOL)

    table = params["bert"]["embeddings"]["task_type_embeddings"]["embedding"]
    swapped = jax.tree.map(lambda x: x, params)
    swapped["bert"]["embeddings"]["task_type_embeddings"]["embedding"] = table[::-1]  # row 2 first
    assert np.abs(our_logits(config, swapped, batches) - theirs).max() > 0.01
    without = jax.tree.map(lambda x: x, params)
    del without["bert"]["embeddings"]["task_type_embeddings"]
    no_task = config.replace(use_task_id=False)
    assert np.abs(our_logits(no_task, without, batches) - theirs).max() > 0.01
    with torch.no_grad():  # and transformers with explicit task type 0 is transformers by default
        b = batches[0]
        inputs = {n: torch.from_numpy(b[n]).long() for n in ("input_ids", "token_type_ids", "attention_mask")}
        explicit = model(**inputs, task_type_ids=torch.zeros_like(inputs["input_ids"])).logits.numpy()
    np.testing.assert_array_equal(explicit, theirs[:32])


@pytest.mark.parametrize("layout", ["bin", "sharded_safetensors", "sharded_bin"])
def test_other_file_layouts_load_the_same_params(tmp_path: Path, saved_ernie, layout: str) -> None:
    path, model = saved_ernie[True]
    config = BertConfig.from_json_file(path / "config.json")
    reference, _ = load_pretrained(path, config, KEY)
    if layout == "bin":
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        expected = tmp_path / "pytorch_model.bin"
    elif layout == "sharded_safetensors":
        model.save_pretrained(tmp_path, max_shard_size="1MB")
        expected = tmp_path / "model.safetensors.index.json"
    else:
        expected = shard_torch_state_dict(model, tmp_path, tensors_per_shard=12)
    if layout != "bin":
        assert len(set(json.loads(expected.read_text())["weight_map"].values())) > 1
    assert find_weights_file(tmp_path) == expected
    params, report = load_pretrained(tmp_path, config, KEY)
    assert report.unused == () and report.initialized == () and report.source == str(expected)
    flat, ref = traverse_util.flatten_dict(params), traverse_util.flatten_dict(reference)
    assert flat.keys() == ref.keys()
    for key, value in ref.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(value), err_msg=str(key))


@pytest.mark.parametrize(
    ("cls", "has_pooler", "kw"),
    [
        (transformers.ErnieModel, True, {}),
        (transformers.ErnieModel, False, {"add_pooling_layer": False}),
        (transformers.ErnieForMaskedLM, False, {}),
        (transformers.ErnieForPreTraining, True, {}),
    ],
)
def test_pretrained_ernie_checkpoints_load_with_a_fresh_classifier(tmp_path: Path, dev_batches, cls, has_pooler, kw) -> None:
    pretrained = ernie_model(cls, seed=1, **kw)
    pretrained.save_pretrained(tmp_path)
    config = BertConfig.from_json_file(tmp_path / "config.json", num_labels=2)
    assert config.model_type == "ernie" and config.use_task_id
    params, report = load_pretrained(tmp_path, config, KEY)
    pooler = () if has_pooler else ("ernie.pooler.dense.weight", "ernie.pooler.dense.bias")
    assert report.initialized == (*pooler, "classifier.weight", "classifier.bias")
    assert "ernie.embeddings.task_type_embeddings.weight" in report.loaded
    if cls is transformers.ErnieModel:
        assert report.unused == ()
    else:  # the pre-training heads, reported by their own names
        assert "cls.predictions.transform.dense.weight" in report.unused
        assert all(name.startswith("cls.") for name in report.unused)
        assert "has no classifier" in report.summary() and "cls." in report.summary()
    base = pretrained if cls is transformers.ErnieModel else pretrained.ernie
    for name in ("word_embeddings", "task_type_embeddings"):
        np.testing.assert_array_equal(
            params["bert"]["embeddings"][name]["embedding"], getattr(base.embeddings, name).weight.detach().numpy()
        )
    assert np.all(np.asarray(params["classifier"]["bias"]) == 0) and np.asarray(params["classifier"]["kernel"]).std() > 0
    if has_pooler:  # the encoder and pooler equal transformers' (the classifier aside)
        b = dev_batches[48][0]
        inputs = {n: torch.from_numpy(b[n]).long() for n in ("input_ids", "token_type_ids", "attention_mask")}
        with torch.no_grad():
            expected = base(**inputs).pooler_output.numpy()
        got = BertModel(config).apply(
            {"params": params["bert"]}, b["input_ids"], b["token_type_ids"], b["attention_mask"], deterministic=True
        )
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=LOGITS_ATOL)


def test_bert_and_ernie_checkpoints_are_not_mixed_up(saved_ernie) -> None:
    path, model = saved_ernie[True]
    ernie = BertConfig.from_json_file(path / "config.json")
    state = state_of(model)
    bert = BertConfig(**{k: v for k, v in ARCH.items() if k != "task_type_vocab_size"})
    with pytest.raises(InputError, match=r"^ckpt: not a BERT checkpoint .*missing bert\.embeddings\.word_embeddings"):
        params_from_state_dict(state, bert, KEY, source="ckpt")
    as_bert = {name.replace("ernie.", "bert.", 1): array for name, array in state.items()}
    with pytest.raises(InputError, match=r"^ckpt: not an ERNIE checkpoint .*missing ernie\.embeddings\.word_embeddings"):
        params_from_state_dict(as_bert, ernie, KEY, source="ckpt")
    del state["ernie.embeddings.task_type_embeddings.weight"]
    with pytest.raises(InputError, match=r"missing ernie\.embeddings\.task_type_embeddings\.weight"):
        params_from_state_dict(state, ernie, KEY, source="ckpt")
    # A config without use_task_id loads the encoder and reports the table it does not use.
    _, report = params_from_state_dict(state_of(model), ernie.replace(use_task_id=False), KEY, source="ckpt")
    assert report.unused == ("ernie.embeddings.task_type_embeddings.weight",)


# --- Weights out -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_task_id", [True, False])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_bit_identical(saved_ernie, use_task_id: bool, scan_layers: bool) -> None:
    _, model = saved_ernie[use_task_id]
    config = BertConfig.from_json_file(saved_ernie[use_task_id][0] / "config.json")
    state = state_of(model)
    params, _ = params_from_state_dict(state, config, KEY, source="mem", scan_layers=scan_layers)
    back = state_dict_from_params(params, "ernie")
    assert list(back) == list(state)  # the same names, in transformers' order
    for name, array in back.items():
        assert array.dtype == np.float32 and array.flags.c_contiguous, name
        np.testing.assert_array_equal(array, state[name], err_msg=name)
    if use_task_id:
        with pytest.raises(ValueError, match="model_type='ernie'"):
            state_dict_from_params(params)
    print(f"parity: ERNIE round trip use_task_id={use_task_id} scan_layers={scan_layers}: {len(back)} tensors bit-identical")


# --- A run from an ERNIE folder: train, export, serve ----------------------------------------

MAX_STEPS = 6


def _ernie_folder(root: Path, bert_base_chinese_dir: Path, model) -> Path:
    """An HF ERNIE model folder as a user downloads one: config.json, weights, vocab.txt."""
    folder = root / "ernie-tiny-zh"
    model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copyfile(bert_base_chinese_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def ernie_run(tmp_path_factory, bert_base_chinese_dir, saved_ernie):
    """(workdir, exported folder, what the run printed): a short AFQMC run, in this process, from the
    ERNIE folder (its own architecture: afqmc_small's overrides reset), exported with `export`."""
    root = tmp_path_factory.mktemp("ernie_run")
    folder = _ernie_folder(root, bert_base_chinese_dir, saved_ernie[True][1])
    workdir, out = root / "run", root / "hf"
    architecture = {f"model.{k}": None for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_in_process(workdir, {
            "model.dir": folder, "model.from_scratch": False, **architecture, "train.max_steps": MAX_STEPS,
            "train.batch_size": 16, "data.bucket_lengths": (64,), "train.eval_all_params": False, "model.dtype": "float32",
        })  # fmt: skip
    info = export.export(workdir, out)
    assert info["params"] == "eval_ema" and info["checkpoint"]["step"] == MAX_STEPS
    return workdir, out, printed.getvalue()


def test_run_loads_the_ernie_weights_and_records_an_ernie_model(ernie_run, saved_ernie) -> None:
    workdir, _, stdout = ernie_run
    loaded = 5 + 1 + 16 * ARCH["num_hidden_layers"] + 4
    assert f"Loaded {loaded} tensors from " in stdout and "Initialised fresh" not in stdout, stdout[-2000:]
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    assert (config.model_type, config.use_task_id, config.num_hidden_layers) == ("ernie", True, 2)
    params, metrics = export.restore_best(workdir, "eval_ema")
    assert metrics["step"] == MAX_STEPS and 0.0 < metrics["accuracy"] < 1.0
    assert params["bert"]["embeddings"]["task_type_embeddings"]["embedding"].shape == (3, ARCH["hidden_size"])
    # It trained: every tensor moved off the folder's weights (the attention key biases too: Adam
    # moves them on rounding noise), and none became NaN.
    initial = state_of(saved_ernie[True][1])
    trained = state_dict_from_params(params, "ernie")
    assert trained.keys() == initial.keys()
    unmoved = [name for name in trained if np.array_equal(trained[name], initial[name])]
    assert not unmoved, unmoved
    assert all(np.all(np.isfinite(array)) for array in trained.values())


@pytest.fixture(scope="module")
def exported_logits(ernie_run, dev, dev_batches):
    """Ours on the run's best checkpoint and transformers' on the exported folder: 256 dev pairs
    at the four bucket lengths, and ours on the first 256 dev pairs (file order)."""
    workdir, out, _ = ernie_run
    params, _ = export.restore_best(workdir, "eval_ema")
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    batches = [b for width in BUCKETS for b in dev_batches[width]]
    first = [
        input_pipeline.make_batch(dev, np.arange(i, i + 64), batch_size=64, bucket_lengths=(64,)) for i in range(0, 256, 64)
    ]
    return {
        "ours": our_logits(config, params, batches),
        "hf": hf_logits(model, batches),
        "ours_first": our_logits(config, params, first),
    }


def test_export_is_an_ernie_classifier_that_transformers_loads_whole(ernie_run, exported_logits) -> None:
    _, out, _ = ernie_run
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(model) is transformers.ErnieForSequenceClassification
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.use_task_id and model.config.id2label == {0: "0", 1: "1"}
    ours, theirs = exported_logits["ours"], exported_logits["hf"]
    assert ours.shape == theirs.shape == (256, 2)
    assert np.abs(theirs).max() > 1.0  # the trained weights still give O(1) logits
    print(f"parity: exported ERNIE run, 256 dev pairs, max |transformers - ours| = {np.abs(theirs - ours).max():.2e}")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=EXPORT_LOGITS_ATOL)


def test_pipeline_answers_a_pair(ernie_run, exported_logits, afqmc_dir) -> None:
    """`pipeline("text-classification")` on raw dev pairs gives the label and score of our logits,
    on three pairs that we predict 0 and three that we predict 1."""
    _, out, _ = ernie_run
    rows = [json.loads(line) for line in (afqmc_dir / "dev.json").read_text(encoding="utf-8").splitlines()[:256]]
    ours = exported_logits["ours_first"]
    predicted = ours.argmax(-1)
    picked = [int(i) for label in (0, 1) for i in np.flatnonzero(predicted == label)[:3]]
    assert len(picked) == 6, f"the run predicts one class on 256 dev pairs: {predicted.mean():.1%} class 1"
    classify = transformers.pipeline("text-classification", model=str(out))
    assert isinstance(classify.model, transformers.ErnieForSequenceClassification)
    labels = []
    for i in picked:
        row, logits = rows[i], ours[i]
        answer = classify({"text": row["sentence1"], "text_pair": row["sentence2"]})
        answer = answer[0] if isinstance(answer, list) else answer
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert answer["label"] == str(int(logits.argmax()))
        assert answer["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        labels.append(answer["label"])
    print(f"parity: pipeline on dev pairs {picked}: labels {labels}, as ours")


def test_train_from_an_unsupported_folder_stops_with_one_line(tmp_path: Path, bert_base_chinese_dir: Path) -> None:
    folder = tmp_path / "roberta"
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copyfile(bert_base_chinese_dir / name, folder / name)
    raw = json.loads((bert_base_chinese_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "roberta"}))
    with pytest.raises(InputError) as refused:
        train_in_process(tmp_path / "run", {"model.dir": folder}, config="afqmc")
    assert str(refused.value) == f"{folder / 'config.json'}: model_type 'roberta' is not supported (supported: bert, ernie)"
    assert not (tmp_path / "run").exists()  # stopped before writing anything
