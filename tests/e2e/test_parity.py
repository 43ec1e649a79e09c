"""Exact PyTorch interop: our model, train step and export against `transformers` and the seed recipe.

Everything runs in float32 with dropout off, from identical initial weights, on identical batches
of the real AFQMC files built by `sda_jax.data.input_pipeline`. The PyTorch side is
`tests/torch_reference.py`: the seed notebook's recipe on `transformers.BertForSequenceClassification`.

Weights are N(0, 0.2) (LayerNorm scales 1 + N(0, 0.2)), not BERT's 0.02, so that logits are O(1)
and vary between examples: a 1e-5 tolerance then says something.

How the train-step tolerances were chosen. Gradients agree to ~5e-8 on a scale of 0.1 (float32
sums in another order). Adam without bias correction moves a weight by lr·m/(√v + eps), about
±3.16·lr whatever |g| is, so a relative error of g becomes at most that relative error of the
step, except where |g| is near or below eps/√(1−β2) ≈ 3e-7: there the step is proportional to
g/eps and carries the gradient's absolute rounding noise. Hence:

* each tensor's update Δ = weight − initial weight agrees to ~2e-5 relative in norm
  (|Δ_jax − Δ_torch| / |Δ_torch|), elementwise to ~1e-6 absolute after the first real step;
* word embeddings: rows of tokens seen once or twice have components with |g| ~ 1e-8, so the
  table agrees to ~3e-4 relative in norm (still elementwise < 5e-4 after 20 steps);
* attention key biases are left out: softmax is invariant to them, their exact gradient is 0
  (checked by `test_key_biases_do_not_change_logits`), so Adam moves them on rounding noise alone
  — differently in every framework, by up to ~3% of a step.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from configs import default
from reference.torch_reference import RecipeConfig, SdaTrainer, torch_batch
from sda_jax import export
from sda_jax.config import Settings
from sda_jax.data import input_pipeline, splits, tokenization
from sda_jax.data.clue_files import read_clue_file
from sda_jax.hf.convert import params_from_state_dict, state_dict_from_params
from sda_jax.models.bert import BertForSequenceClassification
from sda_jax.models.config import BertConfig
from sda_jax.step.hyperparameters import Hyperparameters
from sda_jax.step.train_step import create_train_state, train_step
from tests.conftest import one_line_error

ARCH = {
    "vocab_size": 21128,  # the real bert-base-chinese vocabulary
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
INIT_STD = 0.2
LABELS = ("0", "1")
MAX_LEN = 64
BUCKETS = (16, 32, 48, 64)
# The train step: one bucket length, so that it compiles once.
TRAIN_BUCKETS = (64,)
BATCH_SIZE = 32
TOTAL_STEPS = 20
LEARNING_RATE = 1e-3
WARMUP_RATIO = 0.1  # int(0.1 · 20) = 2 warmup steps: lr 0 at step 1, lr/2 at step 2, lr at step 3
EVAL_EMA_START = 5  # the eval EMA copies the student up to step 5 and averages from step 6 on
PARTIAL_ROWS = 25  # step 2's batch has 25 real rows of 32: weighted means vs sliced-off padding

# Tolerances. Each test prints what it measured: python -m pytest tests/e2e/test_parity.py -q -rP | grep parity:
LOGITS_ATOL = 1e-5
STEP_LOSS_ATOL = 1e-6  # the first steps' losses
TRAJECTORY_LOSS_ATOL = 1e-4  # every step's loss over 20 steps
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
# (update rtol in norm, elementwise atol) after the first real step and after 20 steps; a weight
# is O(0.2), a full Adam step 3.16e-3 (1.6e-3 at step 2, in warmup).
STEP_TOL = {"dense": (1e-4, 5e-6), "word_embeddings": (1e-3, 1e-4)}
TRAJECTORY_TOL = {"dense": (1e-4, 3e-5), "word_embeddings": (2e-3, 2e-3)}
EXPORT_LOGITS_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(bert_base_chinese_dir):
    return tokenization.load_tokenizer(bert_base_chinese_dir)


@functools.cache
def _encoded(split: str, tokenizer) -> tokenization.Encoded:
    """A split of the shipped AFQMC files, as training reads it (64 tokens, labels "0"/"1")."""
    data = Settings.from_config(default.get_config()).data
    assert (data.max_seq_len, data.label_names) == (MAX_LEN, LABELS)
    return splits.read_split(data, split, tokenizer)


@pytest.fixture(scope="module")
def dev(afqmc_dir, tokenizer):
    return _encoded("dev", tokenizer)


@pytest.fixture(scope="module")
def afqmc_test(afqmc_dir, tokenizer):
    return _encoded("test", tokenizer)


def torch_model(seed: int = 0) -> transformers.BertForSequenceClassification:
    """The small BERT in PyTorch, in eval mode, with weights N(0, INIT_STD) (LayerNorm scales
    1 + N(0, INIT_STD)): logits are O(1) and vary from example to example."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**ARCH, num_labels=len(LABELS), attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, INIT_STD)
    return model


def jax_twin(model: transformers.BertForSequenceClassification) -> tuple[BertConfig, dict]:
    """Our config and params holding the same weights (through the HF import)."""
    config = BertConfig(**ARCH, num_labels=len(LABELS))
    state = {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}
    params, report = params_from_state_dict(state, config, jax.random.key(0), source="torch")
    assert report.initialized == ()
    return config, params


def torch_logits(model, batches) -> np.ndarray:
    """HF logits of the real rows of sda_jax batches."""
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs = torch_batch(batch, torch.device("cpu"))
            del inputs["labels"]
            out.append(model(**inputs).logits.numpy())
    return np.concatenate(out)


def our_logits(config: BertConfig, params, batches) -> np.ndarray:
    apply = jax.jit(BertForSequenceClassification(config).apply)
    out = []
    for batch in batches:
        logits = apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        out.append(np.asarray(logits)[batch["weights"] > 0])
    return np.concatenate(out)


def test_logits_match_transformers_on_afqmc_dev(dev) -> None:
    """The first 1,024 dev pairs in 32 batches of 32, padded to the bucket lengths as in training."""
    model = torch_model()
    config, params = jax_twin(model)
    batches = list(itertools.islice(input_pipeline.eval_batches(dev, batch_size=32, bucket_lengths=BUCKETS), 32))
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    ours, theirs = our_logits(config, params, batches), torch_logits(model, batches)
    assert ours.shape == theirs.shape == (1024, 2)
    # O(1) logits that depend on the input: a 1e-5 tolerance then says something.
    assert np.abs(theirs).max() > 1.0 and theirs.std(axis=0).min() > 0.1, theirs.std(axis=0)
    print(f"parity: dev logits (1,024 pairs), max |ours - transformers| = {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=LOGITS_ATOL)


# --- The SDA train step and a 20-step trajectory ---------------------------------------------


def _settings() -> Settings:
    """The run's settings as train.py reads them: the seed recipe, fp32, a larger learning rate."""
    config = default.get_config()
    config.optim.learning_rate = LEARNING_RATE
    config.optim.warmup_ratio = WARMUP_RATIO
    config.optim.lookahead_k, config.optim.lookahead_alpha = 5, 1.0
    config.sda.eval_ema_start_step = EVAL_EMA_START
    config.model.dtype = "float32"
    return Settings.from_config(config)


def _torch_params(named) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in dict(named).items()}


def _step_batches(afqmc_dir: Path, tokenizer) -> list[dict[str, np.ndarray]]:
    """The first 20 batches of the train sampler; step 2's batch keeps only 25 of its 32 rows."""
    train = _encoded("train", tokenizer)
    order = input_pipeline.epoch_order(train.lengths, batch_size=BATCH_SIZE, bucket_multiplier=200, seed=2021, epoch=0)
    order[1] = order[1][:PARTIAL_ROWS]
    make = functools.partial(input_pipeline.make_batch, train, batch_size=BATCH_SIZE, bucket_lengths=TRAIN_BUCKETS)
    return [make(indices) for indices in order[:TOTAL_STEPS]]


@pytest.fixture(scope="module")
def trajectory(afqmc_dir, tokenizer):
    """Both trainers run 20 steps side by side; returns per-step losses and param snapshots."""
    settings = _settings()
    model = torch_model()
    config, params = jax_twin(model)
    initial = _torch_params(model.named_parameters())

    # sda_jax, built as train.train_and_evaluate builds it.
    state = create_train_state(params, Hyperparameters.of(settings, TOTAL_STEPS), settings, compute_dtype=jnp.float32)
    step_fn = jax.jit(functools.partial(train_step, model=BertForSequenceClassification(config), settings=settings))

    reference = SdaTrainer(model, TOTAL_STEPS, RecipeConfig.from_settings(settings))
    ours_loss, ref_loss, snapshots = [], [], {}
    rng = jax.random.key(0)  # unused: dropout is off
    for step, batch in enumerate(_step_batches(afqmc_dir, tokenizer), start=1):
        state, metrics = step_fn(state, batch, rng)
        ours_loss.append(float(metrics["loss"]))
        ref_loss.append(reference.step(batch)["loss"])
        if step in (1, 2, TOTAL_STEPS):
            snapshots[step] = {
                "ours": {
                    "student": state_dict_from_params(state.params),
                    "teacher": state_dict_from_params(state.teacher.one_model()),
                    "eval_ema": state_dict_from_params(state.eval_ema.params),
                },
                "ref": {
                    "student": _torch_params(reference.student.named_parameters()),
                    "teacher": _torch_params(reference.teacher.named_parameters()),
                    "eval_ema": _torch_params(reference.eval_ema_params()),
                },
            }
    assert int(state.step) == TOTAL_STEPS == reference.global_step
    return {
        "initial": initial,
        "ours_loss": np.array(ours_loss),
        "ref_loss": np.array(ref_loss),
        "snapshots": snapshots,
    }


def _group(name: str) -> str | None:
    if name.endswith("attention.self.key.bias"):
        return None  # no gradient: see the module docstring
    return "word_embeddings" if name == WORD_EMBEDDINGS else "dense"


def _param_diffs(ours: dict, ref: dict, initial: dict) -> dict[str, tuple[float, float]]:
    """Per group: (max over tensors of |Δours − Δref| / |Δref|, max elementwise |ours − ref|)."""
    assert list(ours) == list(ref) == list(initial)
    out: dict[str, tuple[float, float]] = {}
    for name, theirs in ref.items():
        group = _group(name)
        if group is None:
            continue
        diff = ours[name] - theirs
        moved = np.linalg.norm(theirs - initial[name])
        assert moved > 0, f"{name} did not move"
        rel, abs_ = out.get(group, (0.0, 0.0))
        out[group] = (max(rel, float(np.linalg.norm(diff) / moved)), max(abs_, float(np.abs(diff).max())))
    return out


def _check_params(snapshot: dict, initial: dict, tolerances: dict, label: str) -> None:
    for which in ("student", "teacher", "eval_ema"):
        for group, (rel, abs_) in _param_diffs(snapshot["ours"][which], snapshot["ref"][which], initial).items():
            print(f"parity: {label}, {which} {group}: update rel diff {rel:.2e}, max abs diff {abs_:.2e}")
            max_rel, max_abs = tolerances[group]
            assert rel <= max_rel and abs_ <= max_abs, (which, group, rel, abs_)


def test_key_biases_do_not_change_logits(dev) -> None:
    model = torch_model()
    batch = next(input_pipeline.eval_batches(dev, batch_size=32, bucket_lengths=BUCKETS))
    before = torch_logits(model, [batch])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _group(name) is None:
                p.add_(1.0)
    np.testing.assert_allclose(torch_logits(model, [batch]), before, rtol=0, atol=1e-5)


def test_step_1_with_zero_learning_rate_is_exact(trajectory) -> None:
    # Warmup starts at lr 0: step 1 changes no weight, in both; the loss is one forward pass.
    snap = trajectory["snapshots"][1]
    for which in ("student", "teacher", "eval_ema"):
        for name, initial in trajectory["initial"].items():
            np.testing.assert_array_equal(snap["ours"][which][name], initial, err_msg=f"{which} {name}")
            np.testing.assert_array_equal(snap["ref"][which][name], initial, err_msg=f"{which} {name}")
    assert abs(trajectory["ours_loss"][0] - trajectory["ref_loss"][0]) <= STEP_LOSS_ATOL


def test_one_sda_step_matches_reference(trajectory) -> None:
    """Step 2, the first real update (lr/2, on a partial batch): student, teacher, eval EMA, loss."""
    loss_diff = abs(trajectory["ours_loss"][1] - trajectory["ref_loss"][1])
    print(f"parity: step 2 loss {trajectory['ref_loss'][1]:.6f}, |ours - reference| = {loss_diff:.2e}")
    assert loss_diff <= STEP_LOSS_ATOL
    _check_params(trajectory["snapshots"][2], trajectory["initial"], STEP_TOL, "step 2")


def test_twenty_step_trajectory_matches_reference(trajectory) -> None:
    ours, ref = trajectory["ours_loss"], trajectory["ref_loss"]
    print(
        f"parity: 20 steps, loss {ref[0]:.4f} -> {ref[-1]:.4f}, max |ours - reference| = {np.abs(ours - ref).max():.2e}"
    )
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TRAJECTORY_LOSS_ATOL)
    assert ref[-5:].mean() < ref[:5].mean() - 0.02, ref  # it trains: the comparison is not of a flat line
    snap = trajectory["snapshots"][TOTAL_STEPS]
    _check_params(snap, trajectory["initial"], TRAJECTORY_TOL, "step 20")
    # The three parameter sets are distinct by step 20, so each comparison checks its own average.
    weights = "bert.encoder.layer.0.attention.self.query.weight"
    student, teacher, ema = (snap["ref"][w][weights] for w in ("student", "teacher", "eval_ema"))
    assert np.abs(student - teacher).max() > 3e-4 and np.abs(student - ema).max() > 3e-4


def _reference(precision: str = "fp32", ema_impl: str = "loop") -> SdaTrainer:
    config = RecipeConfig.from_settings(
        Settings(), learning_rate=LEARNING_RATE, warmup_ratio=0.0, eval_ema_start_step=2, precision=precision, ema_impl=ema_impl
    )
    return SdaTrainer(torch_model(), TOTAL_STEPS, config)


def test_reference_ema_loop_and_foreach_are_identical(afqmc_dir, tokenizer) -> None:
    """The benchmark switch changes the kernels, not the arithmetic: bit-identical averages."""
    batches = _step_batches(afqmc_dir, tokenizer)[:4]  # the eval EMA averages from step 3 on
    loop, foreach = _reference(ema_impl="loop"), _reference(ema_impl="foreach")
    for batch in batches:
        assert loop.step(batch) == foreach.step(batch)
    for name, value in loop.eval_ema_params().items():
        np.testing.assert_array_equal(foreach.eval_ema_params()[name].numpy(), value.numpy(), err_msg=name)
    for (name, a), b in zip(loop.teacher.named_parameters(), foreach.teacher.parameters()):
        np.testing.assert_array_equal(b.detach().numpy(), a.detach().numpy(), err_msg=name)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reference_mixed_precision_runs_close_to_fp32(afqmc_dir, tokenizer, precision: str) -> None:
    batches = _step_batches(afqmc_dir, tokenizer)[:3]
    fp32, mixed = _reference("fp32"), _reference(precision)
    assert mixed.scaler.is_enabled() == (precision == "fp16")  # GradScaler as the seed, for fp16 only
    for batch in batches:
        expected, got = fp32.step(batch)["loss"], mixed.step(batch)["loss"]
        assert np.isfinite(got) and abs(got - expected) < 0.05, (expected, got)


# --- Export: a real run through the command line, loaded in transformers ----------------------

@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory, bert_base_chinese_dir, cli):
    """Starts a 5-step `python -m sda_jax.train` run of a 1-layer, 32-wide BERT in the background.

    It runs while the in-process comparisons above use the other core; `exported` waits for it.
    The model folder is bert-base-chinese's with initializer_range 0.3, so that the from-scratch
    model's logits are O(1) and its predictions mixed, not one class everywhere.
    """
    root = tmp_path_factory.mktemp("export")
    model_dir = root / "init"
    model_dir.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copyfile(bert_base_chinese_dir / name, model_dir / name)
    hf_config = json.loads((bert_base_chinese_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**hf_config, "initializer_range": 0.3}))
    workdir = root / "run"
    args = [
        "--config", "configs/afqmc_small.py", f"--workdir={workdir}", f"--config.model.dir={model_dir}",
        "--config.model.num_hidden_layers=1", "--config.model.hidden_size=32", "--config.model.num_attention_heads=2",
        "--config.model.intermediate_size=64", "--config.train.max_steps=5", "--config.train.batch_size=32",
        "--config.data.bucket_lengths=(64,)", "--config.model.dtype=float32",
    ]  # fmt: skip
    log = (root / "train.log").open("w")
    process = cli.start("sda_jax.train", *args, log=log)
    yield process, workdir, root
    if process.poll() is None:  # the export tests were not selected
        process.kill()
    process.wait()
    log.close()


@pytest.fixture(scope="module")
def exported(cli_run, cli):
    """(workdir, out): the background run, finished, then exported with `python -m sda_jax.export`."""
    process, workdir, root = cli_run
    assert process.wait(timeout=600) == 0, (root / "train.log").read_text()[-3000:]
    out = root / "hf"
    result = cli.run("sda_jax.export", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exported the eval_ema parameters of model 0 (seed 2021) of step 5" in result.stdout
    return workdir, out


def test_export_folder_loads_in_transformers(exported, dev, afqmc_dir) -> None:
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "sda_jax_export.json", "tokenizer.json", "tokenizer_config.json"]
    )
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.id2label == {0: "0", 1: "1"} and model.config.label2id == {"0": 0, "1": 1}
    # The exported tokenizer encodes pairs exactly as our input pipeline did in training.
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    rows = read_clue_file(afqmc_dir / "dev.json", LABELS, require_labels=True)
    got = loaded(rows.text_a[:300], rows.text_b[:300], truncation="longest_first", max_length=MAX_LEN)
    for i, ids in enumerate(got["input_ids"]):
        assert ids == dev.token_ids[i, : dev.lengths[i]].tolist(), i


@pytest.fixture(scope="module")
def export_logits(exported, dev, afqmc_test):
    """Dev and test logits of the exported model in transformers, and ours on the checkpoint."""
    workdir, out = exported
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    params, metrics = export.restore_best(workdir, "eval_ema")
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    dev_batches = list(input_pipeline.eval_batches(dev, batch_size=256, bucket_lengths=TRAIN_BUCKETS))
    test_batches = list(input_pipeline.eval_batches(afqmc_test, batch_size=256, bucket_lengths=TRAIN_BUCKETS))
    return {
        "ours_dev": our_logits(config, params, dev_batches),
        "hf_dev": torch_logits(model, dev_batches),
        "hf_test": torch_logits(model, test_batches),
        "metrics": metrics,
    }


def test_exported_logits_match_ours_on_whole_dev_set(export_logits, dev) -> None:
    ours, theirs = export_logits["ours_dev"], export_logits["hf_dev"]
    assert ours.shape == theirs.shape == (len(dev), 2)
    print(f"parity: exported model, whole dev set, max |transformers - ours| = {np.abs(theirs - ours).max():.2e}")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=EXPORT_LOGITS_ATOL)
    # Dev accuracy in PyTorch is the one the run recorded for its best checkpoint.
    accuracy = float(np.mean(theirs.argmax(-1) == dev.labels))
    assert accuracy == pytest.approx(export_logits["metrics"]["accuracy"], abs=1e-12)


def test_exported_predictions_match_run_on_whole_test_set(export_logits, exported, afqmc_test) -> None:
    workdir, _ = exported
    predicted = export_logits["hf_test"].argmax(-1)
    print(f"parity: exported model, whole test set: {len(predicted)} predictions, {predicted.mean():.1%} class 1")
    assert 0.05 < predicted.mean() < 0.95, predicted.mean()  # both classes occur: not a trivial match
    lines = (workdir / "afqmc_predict.json").read_text().splitlines()
    run_labels = [json.loads(line)["label"] for line in lines]
    assert [int(x) for x in run_labels] == predicted.tolist()


def test_pipeline_answers_a_sentence_pair(exported, export_logits, afqmc_dir) -> None:
    _, out = exported
    first = json.loads((afqmc_dir / "dev.json").read_text(encoding="utf-8").splitlines()[0])
    classify = transformers.pipeline("text-classification", model=str(out))
    answer = classify({"text": first["sentence1"], "text_pair": first["sentence2"]})
    answer = answer[0] if isinstance(answer, list) else answer
    logits = export_logits["ours_dev"][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert answer["label"] == LABELS[int(logits.argmax())]
    assert answer["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_export_other_params_and_atomicity(exported, tmp_path) -> None:
    workdir, out = exported
    target = tmp_path / "teacher"
    target.mkdir()  # an empty folder is fine
    info = export.export(workdir, target, "teacher")
    assert info["params"] == "teacher" and info["checkpoint"]["step"] == 5
    weights = safetensors.numpy.load_file(target / "model.safetensors")
    teacher, _ = export.restore_best(workdir, "teacher")
    expected = state_dict_from_params(teacher)
    assert sorted(weights) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    eval_ema = safetensors.numpy.load_file(out / "model.safetensors")
    assert any(not np.array_equal(eval_ema[n], expected[n]) for n in expected)  # really another set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temporary folder left behind


def test_export_errors_exit_2_with_one_line(exported, tmp_path, cli) -> None:
    workdir, out = exported
    export_cli = lambda *args: cli.run("sda_jax.export", *args, timeout=600)
    one_line_error(export_cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}"), "not an sda-jax run folder")
    one_line_error(export_cli(f"--workdir={workdir}", f"--out={out}"), "not empty")
    no_checkpoint = tmp_path / "fresh_run"
    shutil.copytree(workdir / "model", no_checkpoint / "model")
    shutil.copyfile(workdir / "settings.json", no_checkpoint / "settings.json")
    one_line_error(export_cli(f"--workdir={no_checkpoint}", f"--out={tmp_path / 'y'}"), "no best checkpoint")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
