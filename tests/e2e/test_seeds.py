"""The model axis: N models (`sweep.seed`) side by side in one program, each its own run; one model
is the plain train step.

What is held: one model on the model axis is the plain jitted `train_step`, bit for bit, from the
same initial weights, batches and dropout key as `train_and_evaluate` derives them; a seed trained
among others equals that seed trained alone (to float32 rounding: vmap batches the matmuls); per
model, mean ± std and ensemble dev metrics are what the per-model logits say; predictions come from
the ensemble of the models' best; a SIGKILLed run of two seeds resumes bit-identically; 2 models ×
2 data shards on 4 devices match 1 device; one model exports, the ensemble does not; a checkpoint
is read once for all models; too many models for the device is a clear error before training.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax import export
from sda_jax.data import input_pipeline, splits, tokenization
from sda_jax.errors import InputError
from sda_jax.hf import convert
from sda_jax.models.bert import BertForSequenceClassification, init_params
from sda_jax.models.config import BertConfig
from sda_jax.parallel import distributed
from sda_jax.step import train_step
from sda_jax.step.hyperparameters import Hyperparameters
from sda_jax.step.model_axis import Models
from sda_jax.workdir import checkpoints
from sda_jax.workdir.layout import Workdir
from tests.conftest import (
    AFQMC_CUT_ROWS,
    TINY_RUN,
    assert_within_rounding_but_adam_flips,
    flags_of,
    load_train_state,
    moved_by_rounding_alone,
    read_records,
    settings_of,
    tiny_model,
    train_in_process,
)
from tests.e2e import resume_runs

SEEDS = (2021, 2022)
CONFIG = tiny_model(vocab_size=21128, type_vocab_size=2)
RUN = {**TINY_RUN, "train.max_steps": 12, "train.eval_every": 6, "train.log_every": 3}


# --- In process ---------------------------------------------------------------------------------


@pytest.mark.api_surface
def test_one_model_is_the_plain_train_step_bit_for_bit(tmp_path):
    """A one-model run's program is the one-model train step itself: its checkpoint equals 12
    steps of `jax.jit(train_step)` on the run's batches, from the run's initial weights and dropout
    key, bit for bit (a program with size-1 reshapes in it is fused differently by XLA)."""
    overrides = {**RUN, "train.checkpoint_every": 12, "sda.eval_ema_start_step": 4}
    train_in_process(tmp_path / "run", overrides)
    settings = settings_of(overrides)
    data = splits.load_splits(settings.data, settings.model.dir)
    (init_key,), dropout_key = Models.of(settings).keys()
    config = BertConfig.from_json_file(tmp_path / "run" / "model" / "config.json")
    model = BertForSequenceClassification(config)
    state = train_step.create_train_state(init_params(config, init_key), Hyperparameters.of(settings, 12), settings, compute_dtype=jnp.float32)
    step = jax.jit(functools.partial(train_step.train_step, model=model, settings=settings))
    batches = input_pipeline.train_batches(data.train, batch_size=16, bucket_multiplier=200, bucket_lengths=(64,), seed=settings.seed)
    for batch in itertools.islice(batches, 12):
        state, _ = step(state, batch, dropout_key)
    saved = checkpoints.TrainCheckpoints(Workdir(tmp_path / "run").train_checkpoints, keep=2)
    run = saved.restore(12, state)  # into the plain state's own structure
    saved.close()
    for (path, mine), theirs in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(run), strict=True):
        np.testing.assert_array_equal(np.asarray(theirs), np.asarray(mine), err_msg=jax.tree_util.keystr(path))


def test_a_seed_trained_among_others_equals_that_seed_alone(bert_base_chinese_dir):
    """20 steps with dropout on. vmap batches every matmul over the model axis, which XLA:CPU may
    sum in another order, so the comparison is to float32 rounding (1e-6 per weight), not bits,
    but for Adam's rare flips (`assert_within_rounding_but_adam_flips`)."""
    settings = settings_of({"optim.learning_rate": 1e-3, "optim.warmup_ratio": 0.0}, config="default")
    dev = splits.read_split(settings.data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    batches = list(itertools.islice(input_pipeline.eval_batches(dev, batch_size=16, bucket_lengths=(32, 64)), 20))
    model = BertForSequenceClassification(CONFIG)
    models = Models.of_seeds(SEEDS)
    init_keys, dropout_keys = models.keys()
    params = [init_params(CONFIG, key) for key in init_keys]
    mesh = distributed.make_mesh(models.count)
    together, step_together = train_step.place_state_and_step(models.stack(params), model, settings, 100, mesh, models)
    keys = models.put(dropout_keys, mesh)
    alone = [train_step.create_train_state(p, Hyperparameters.of(settings, 100), settings, compute_dtype=jnp.float32) for p in params]
    step_alone = jax.jit(lambda s, b, r: train_step.train_step(s, b, r, model=model, settings=settings))
    for batch in batches:
        together, metrics = step_together(together, distributed.put_global_batch(batch, mesh), keys)
        for i in range(len(SEEDS)):
            alone[i], alone_metrics = step_alone(alone[i], batch, dropout_keys[i])
            np.testing.assert_allclose(metrics["loss"][i], alone_metrics["loss"], rtol=1e-5)
    worst = 0.0
    for i in range(len(SEEDS)):
        mine = jax.tree_util.tree_flatten_with_path(models.take(jax.device_get(together.params), i))[0]
        for (path, a), b in zip(mine, jax.tree.leaves(alone[i].params), strict=True):
            if not moved_by_rounding_alone(jax.tree_util.keystr(path)):
                worst = max(worst, assert_within_rounding_but_adam_flips(a, b, jax.tree_util.keystr(path)))
    print(f"seeds: max |weight together - weight alone| after 20 steps = {worst:.2e}")
    assert not np.allclose(together.params["classifier"]["kernel"][0], together.params["classifier"]["kernel"][1])


def test_a_checkpoint_is_read_once_for_all_models(tmp_path, monkeypatch):
    """The weights of a pretrained folder load once; each model draws only its fresh heads."""
    import transformers

    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3,
    ))  # fmt: skip
    hf.save_pretrained(tmp_path)
    config = BertConfig.from_json_file(tmp_path / "config.json", num_labels=2)  # the file's 3-label head is of no use
    reads, read = [], convert.read_state_dict
    monkeypatch.setattr(convert, "read_state_dict", lambda path: reads.append(path) or read(path))
    init_keys, _ = Models.of_seeds((1, 2, 3)).keys()
    params, report = convert.load_pretrained_models(tmp_path, config, init_keys)
    assert len(reads) == 1 and len(params) == 3 and report.fresh_heads == ("classifier",)
    np.testing.assert_array_equal(params[0]["bert"]["pooler"]["dense"]["kernel"], params[2]["bert"]["pooler"]["dense"]["kernel"])
    assert not np.allclose(params[0]["classifier"]["kernel"], params[1]["classifier"]["kernel"])
    alone, _ = convert.load_pretrained(tmp_path, config, init_keys[1])  # model 1 as a run of its own seed
    jax.tree.map(np.testing.assert_array_equal, alone, params[1])


def test_too_many_models_for_the_device_is_a_clear_error():
    state = {"w": jax.ShapeDtypeStruct((8, 1024, 1024), jnp.float32)}  # 32 MiB
    device = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 16 * 2**20})
    mesh = types.SimpleNamespace(devices=np.array([device]), shape={distributed.MODELS_AXIS: 1, distributed.DATA_AXIS: 1})
    models = Models.of_seeds(tuple(range(8)))
    with pytest.raises(InputError, match=r"sweep.\*: the train states of 8 model\(s\) need 0.0 GiB per device .* 0.0 GiB"):
        models.check_fits(state, mesh)
    roomy = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 2**30})]), shape={})
    models.check_fits(state, roomy)  # fits: no error
    cpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(memory_stats=lambda: None)]), shape={})
    models.check_fits(state, cpu)  # no memory figure: nothing to check


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory, bert_base_chinese_dir):
    """bert-base-chinese's folder with initializer_range 0.3: from-scratch models whose logits are
    O(1) and whose predictions are mixed, so that comparisons of predictions mean something."""
    folder = tmp_path_factory.mktemp("varied")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copyfile(bert_base_chinese_dir / name, folder / name)
    config = json.loads((bert_base_chinese_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "initializer_range": 0.3}))
    return folder


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, varied_model_dir):
    workdir = tmp_path_factory.mktemp("seeds") / "run"
    train_in_process(workdir, two_seeds_overrides(varied_model_dir))
    return workdir


def two_seeds_overrides(model_dir):
    return {**RUN, "sweep.seed": SEEDS, "train.per_model_predictions": True, "train.eval_all_params": True, "model.dir": model_dir}


def _logits(workdir, params, encoded):
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    model = BertForSequenceClassification(config)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["token_type_ids"], b["attention_mask"]))
    batches = input_pipeline.eval_batches(encoded, batch_size=512, bucket_lengths=(64,))
    return np.concatenate([np.asarray(apply(params, b))[b["weights"] > 0] for b in batches])


def test_per_model_mean_std_and_ensemble_metrics_are_what_the_logits_say(two_seeds, bert_base_chinese_dir):
    workdir = two_seeds
    scored = next(r for r in read_records(workdir, "dev") if r["step"] == 12 and r["params"] == "student")  # no eval EMA yet
    for key in ("accuracy", "f1", "loss"):
        values = np.array([m[key] for m in scored["models"]])
        assert scored[key] == pytest.approx(values.mean(), abs=1e-12)
        assert scored["std"][key] == pytest.approx(values.std(), abs=1e-12)
    # Each model's and the ensemble's (the mean of the two students' logits), from the step-12 checkpoint.
    state = checkpoints.read_train_state(Workdir(workdir).train_checkpoints, 12)
    dev = splits.read_split(settings_of(RUN).data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    per_model = [_logits(workdir, jax.tree.map(lambda x, i=i: x[i], state["params"]), dev) for i in range(len(SEEDS))]
    for i in range(len(SEEDS)):
        assert scored["models"][i]["accuracy"] == pytest.approx(float(np.mean(per_model[i].argmax(-1) == dev.labels)), abs=1e-12)
    ensemble = np.mean(per_model, axis=0)
    assert scored["ensemble"]["accuracy"] == pytest.approx(float(np.mean(ensemble.argmax(-1) == dev.labels)), abs=1e-12)
    shifted = ensemble - ensemble.max(-1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(dev.labels)), dev.labels]))
    assert scored["ensemble"]["loss"] == pytest.approx(loss, rel=1e-5)
    # Train records: the mean over the models, and each model's.
    record = next(r for r in read_records(workdir, "train") if r["step"] == 12)
    assert len(record["models"]) == 2
    assert record["loss"] == pytest.approx(np.mean([m["loss"] for m in record["models"]]), rel=1e-6)


def test_summary_and_ensemble_predictions(two_seeds, bert_base_chinese_dir):
    workdir = two_seeds
    summary = json.loads((workdir / "summary.json").read_text())
    assert [m["seed"] for m in summary["models"]] == list(SEEDS) and [m["model"] for m in summary["models"]] == [0, 1]
    accuracies = [m["best_dev_accuracy"] for m in summary["models"]]
    assert summary["best_dev_accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["best_dev_accuracy_std"] == pytest.approx(np.std(accuracies))
    assert "ensemble_dev_accuracy" in summary
    # Each model kept its own best checkpoint.
    assert sorted(p.name for p in (workdir / "checkpoints" / "best").iterdir()) == ["model_0", "model_1"]
    # Predictions: each seed's best eval EMA, and the argmax of their mean logits.
    test = splits.read_split(settings_of(RUN).data, "test", tokenization.load_tokenizer(bert_base_chinese_dir))
    logits = []
    for seed in SEEDS:
        params, _ = export.restore_best(workdir, "eval_ema", seed)
        logits.append(_logits(workdir, params, test))
        written = [json.loads(line)["label"] for line in (workdir / f"afqmc_predict.model{SEEDS.index(seed)}.json").read_text().splitlines()]
        assert [int(x) for x in written] == logits[-1].argmax(-1).tolist()
    ensemble = np.mean(logits, axis=0).argmax(-1)
    written = [int(json.loads(line)["label"]) for line in (workdir / "afqmc_predict.json").read_text().splitlines()]
    assert written == ensemble.tolist() and len(written) == AFQMC_CUT_ROWS["test"]
    # Not a trivial agreement: the seeds disagree on some rows, and the ensemble predicts both classes.
    assert (logits[0].argmax(-1) != logits[1].argmax(-1)).any() and 0 < ensemble.sum() < len(ensemble)


def test_one_model_exports_the_ensemble_does_not(two_seeds, tmp_path, cli):
    workdir = two_seeds
    run = lambda *args: cli.run("sda_jax.export", f"--workdir={workdir}", *args, timeout=300)
    refused = run(f"--out={tmp_path / 'all'}")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "trained 2 models (model=0, seed=2021; model=1, seed=2022)" in refused.stderr and "--seed S, --model I" in refused.stderr
    assert "trained no model of {'seed': 7}" in run(f"--out={tmp_path / 'x'}", "--seed=7").stderr
    exported = run(f"--out={tmp_path / 'one'}", "--seed=2022")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "of model 1 (seed 2022)" in exported.stdout
    assert json.loads((tmp_path / "one" / "sda_jax_export.json").read_text())["seed"] == 2022
    by_index = export.export(workdir, tmp_path / "by_index", model=1)
    assert (by_index["model"], by_index["seed"]) == (1, 2022)
    assert not (tmp_path / "all").exists()


# --- Through the command line: other device counts, signals ---------------------------------------


def test_two_seeds_on_four_devices_match_one_device(two_seeds, varied_model_dir, tmp_path, cli):
    """2 model groups × 2 data shards: the same runs as the one-device `two_seeds` up to the order
    of the gradient sums (as the one-model cross-device tests)."""
    result = cli.run("sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={tmp_path / '4'}",
                     *flags_of(two_seeds_overrides(varied_model_dir)), devices=4, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 x cpu" in json.loads((tmp_path / "4" / "summary.json").read_text())["devices"]
    losses = lambda w: [(r["step"], [m["loss"] for m in r["models"]]) for r in read_records(w, "train")]
    one, four = losses(two_seeds), losses(tmp_path / "4")
    assert [x[0] for x in one] == [x[0] for x in four]
    np.testing.assert_allclose([x[1] for x in four], [x[1] for x in one], rtol=1e-4, atol=1e-5)
    a, b = load_train_state(two_seeds, 12), load_train_state(tmp_path / "4", 12)
    assert a.keys() == b.keys()
    for key in a:
        if not moved_by_rounding_alone(key):
            # Adam normalises each update: an element whose gradient is near zero in both runs (a
            # word row the batches barely touch) steps by up to the learning rate (1e-4) wherever
            # the sums' rounding points it. A machine's vector width decides where: one element in
            # 1.35M of the word embeddings here, 4.2e-5 apart.
            far = ~np.isclose(b[key], a[key], rtol=1e-4, atol=1e-5)
            assert far.sum() <= max(1, far.size // 100_000), (key, int(far.sum()))
            assert np.all(np.abs(b[key] - a[key])[far] <= 1e-4), key


def test_a_sweep_resumes_bit_identically_after_sigkill(tmp_path, monkeypatch):
    """2 seeds × 2 distillation weights: 4 models, killed at a random step and resumed."""
    sweep = {"sweep.seed": SEEDS, "sweep.sda.kd_coeff": (0.5, 1.0)}
    monkeypatch.setattr(resume_runs, "TINY", flags_of({**resume_runs.RUN, **sweep}))
    uninterrupted = tmp_path / "uninterrupted"
    train_in_process(uninterrupted, {**resume_runs.RUN, **sweep})  # as test_resume's: in this process
    killed = tmp_path / "killed"
    code, _ = resume_runs.start_and_signal(killed, signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = resume_runs.run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step" in resumed.stdout
    resume_runs.assert_same_run(uninterrupted, killed)
    assert np.shape(load_train_state(killed, 40)["['step']"]) == (4,)  # the state really has four models
