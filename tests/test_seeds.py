"""Several seeds in one program (`train.seeds`): each seed is its own run, side by side on a seed axis.

What is held: a seed trained among others equals that seed trained alone; one seed in
`train.seeds` is today's run bit for bit; per-seed, mean ± std and ensemble dev metrics are what
the per-seed logits say; predictions come from the ensemble of the seeds' best; a SIGKILLed run of
two seeds resumes bit-identically; 2 seeds × 2 data shards on 4 devices match 1 device; one seed
exports, the ensemble does not; too many seeds for the device is a clear error before training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from sda_jax import export, input_pipeline, optim, parallel, splits, tokenization, train
from sda_jax.bert_config import BertConfig
from sda_jax.checkpoints import read_train_state
from sda_jax.errors import InputError
from sda_jax.models import BertForSequenceClassification, init_params
from sda_jax.settings import Settings
from tests import test_resume
from tests.conftest import REPO_ROOT, TINY_RUN_FLAGS, load_train_state, moved_by_rounding_alone

SEEDS = (2021, 2022)
CONFIG = BertConfig(
    vocab_size=21128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64,
)  # fmt: skip
RUN = [*TINY_RUN_FLAGS, "--config.train.max_steps=12", "--config.train.eval_every=6", "--config.train.log_every=3"]


# --- In process: a seed among others is the seed alone ------------------------------------------


def test_a_seed_trained_among_others_equals_that_seed_alone(bert_base_chinese_dir):
    """20 steps with dropout on. vmap batches every matmul over the seed axis, which XLA:CPU may
    sum in another order, so the comparison is to float32 rounding (1e-6 per weight), not bits."""
    config = default.get_config()
    config.optim.learning_rate, config.optim.warmup_ratio = 1e-3, 0.0
    settings = Settings.from_config(config)
    dev = splits.read_split(settings.data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    stream = input_pipeline.eval_batches(dev, batch_size=16, bucket_lengths=(32, 64))
    batches = [next(stream) for _ in range(20)]
    model = BertForSequenceClassification(CONFIG)
    schedule = optim.Schedule.create(settings.optim, total_steps=100)
    keys = [jax.random.split(jax.random.key(seed)) for seed in SEEDS]
    params = [init_params(CONFIG, key[0]) for key in keys]

    mesh = parallel.make_seeds_mesh(len(SEEDS))
    abstract = train.abstract_train_state(jax.tree.map(lambda *p: jnp.stack(p), *params), settings, 100, jnp.float32, mesh, 2)
    together = jax.vmap(lambda p: train.create_train_state(p, schedule, settings, compute_dtype=jnp.float32))(
        jax.tree.map(lambda *p: jnp.stack(p), *params)
    )
    step_together = train.jit_train_step(model, settings, mesh, jax.tree.map(lambda x: x.sharding, abstract), 2)
    rngs = jnp.stack([key[1] for key in keys])
    alone = [train.create_train_state(p, schedule, settings, compute_dtype=jnp.float32) for p in params]
    step_alone = jax.jit(lambda s, b, r: train.train_step(s, b, r, model=model, settings=settings))
    for batch in batches:
        together, metrics = step_together(together, batch, rngs)
        for i in range(len(SEEDS)):
            alone[i], alone_metrics = step_alone(alone[i], batch, keys[i][1])
            np.testing.assert_allclose(metrics["loss"][i], alone_metrics["loss"], rtol=1e-5)
    worst = 0.0
    for i in range(len(SEEDS)):
        mine = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda x, i=i: np.asarray(x[i]), together.params))[0]
        for (path, a), b in zip(mine, jax.tree.leaves(alone[i].params), strict=True):
            if not moved_by_rounding_alone(jax.tree_util.keystr(path)):
                worst = max(worst, float(np.abs(a - np.asarray(b)).max()))
    print(f"seeds: max |weight together - weight alone| after 20 steps = {worst:.2e}")
    assert worst <= 1e-6
    assert not np.allclose(together.params["classifier"]["kernel"][0], together.params["classifier"]["kernel"][1])


def test_too_many_seeds_for_the_device_is_a_clear_error():
    state = {"w": jax.ShapeDtypeStruct((8, 1024, 1024), jnp.float32)}  # 32 MiB
    device = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 16 * 2**20})
    mesh = types.SimpleNamespace(devices=np.array([device]), shape={parallel.SEEDS_AXIS: 1, parallel.DATA_AXIS: 1})
    with pytest.raises(InputError, match=r"train.seeds: 8 seeds' train states need 0.0 GiB per device .* 0.0 GiB"):
        train.check_state_fits(state, mesh, 8)
    roomy = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 2**30})]), shape={})
    train.check_state_fits(state, roomy, 8)  # fits: no error
    cpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(memory_stats=lambda: None)]), shape={})
    train.check_state_fits(state, cpu, 8)  # no memory figure: nothing to check


# --- Through the command line -----------------------------------------------------------------


def _env(devices: int = 1) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _train(workdir, *extra, devices=1, model_dir=None):
    args = ["--config", "configs/afqmc_small.py", f"--workdir={workdir}", *RUN, *extra]
    if model_dir is not None:
        args.append(f"--config.model.dir={model_dir}")
    return subprocess.run(
        [sys.executable, "-m", "sda_jax.train", *args], cwd=REPO_ROOT, env=_env(devices), capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip


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
    result = _train(
        workdir, f"--config.train.seeds={SEEDS}", "--config.train.per_seed_predictions=True",
        "--config.train.eval_all_params=True", model_dir=varied_model_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def _records(workdir, split):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_per_seed_mean_std_and_ensemble_metrics_are_what_the_logits_say(two_seeds, bert_base_chinese_dir):
    workdir, result = two_seeds
    dev_records = [r for r in _records(workdir, "dev") if r["step"] == 12]
    scored = {r["seed"]: r for r in dev_records if r["params"] == "student"}  # the eval EMA has not started
    assert set(scored) == {*SEEDS, "mean", "std"}
    for key in ("accuracy", "f1", "loss"):
        values = np.array([scored[seed][key] for seed in SEEDS])
        assert scored["mean"][key] == pytest.approx(values.mean(), abs=1e-12)
        assert scored["std"][key] == pytest.approx(values.std(), abs=1e-12)
    # The ensemble: the mean of the two students' logits, from the step-12 checkpoint.
    state = read_train_state(workdir, 12)
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    model = BertForSequenceClassification(config)
    data = Settings.from_config(default.get_config()).data
    dev = splits.read_split(data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["token_type_ids"], b["attention_mask"]))
    per_seed = []
    for i in range(len(SEEDS)):
        params = jax.tree.map(lambda x, i=i: x[i], state["params"])
        batches = input_pipeline.eval_batches(dev, batch_size=256, bucket_lengths=(64,))
        per_seed.append(np.concatenate([np.asarray(apply(params, b))[b["weights"] > 0] for b in batches]))
    for i, seed in enumerate(SEEDS):
        assert scored[seed]["accuracy"] == pytest.approx(float(np.mean(per_seed[i].argmax(-1) == dev.labels)), abs=1e-12)
    ensemble = np.mean(per_seed, axis=0)
    logged = next(r for r in dev_records if r["params"] == "ensemble")
    assert logged["accuracy"] == pytest.approx(float(np.mean(ensemble.argmax(-1) == dev.labels)), abs=1e-12)
    shifted = ensemble - ensemble.max(-1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(dev.labels)), dev.labels]))
    assert logged["loss"] == pytest.approx(loss, rel=1e-5)
    assert "(student, mean ± std over seeds), ensemble accuracy" in result.stdout
    # Train records: one per seed and their mean.
    train_records = [r for r in _records(workdir, "train") if r["step"] == 12]
    by_seed = {r.get("seed"): r["loss"] for r in train_records}
    assert set(by_seed) == {None, *SEEDS}
    assert by_seed[None] == pytest.approx(np.mean([by_seed[s] for s in SEEDS]), rel=1e-6)


def test_summary_and_ensemble_predictions(two_seeds, bert_base_chinese_dir):
    workdir, result = two_seeds
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["seeds"] == list(SEEDS) and [s["seed"] for s in summary["per_seed"]] == list(SEEDS)
    accuracies = [s["best_dev_accuracy"] for s in summary["per_seed"]]
    assert summary["best_dev_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert summary["best_dev_accuracy_std"] == pytest.approx(np.std(accuracies))
    assert "ensemble_dev_accuracy" in summary and "ensemble" in result.stdout and "mean ± std" in result.stdout
    # Each seed kept its own best checkpoint.
    assert sorted(p.name for p in (workdir / "checkpoints" / "best").iterdir()) == [f"seed_{s}" for s in SEEDS]
    # Predictions: each seed's best eval EMA, and the argmax of their mean logits.
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    model = BertForSequenceClassification(config)
    data = Settings.from_config(default.get_config()).data
    test = splits.read_split(data, "test", tokenization.load_tokenizer(bert_base_chinese_dir))
    logits = []
    for seed in SEEDS:
        params, _ = export.restore_best(workdir, "eval_ema", seed)
        batches = input_pipeline.eval_batches(test, batch_size=512, bucket_lengths=(64,))
        logits.append(np.concatenate([
            np.asarray(model.apply({"params": params}, b["input_ids"], b["token_type_ids"], b["attention_mask"]))[b["weights"] > 0]
            for b in batches
        ]))  # fmt: skip
        written = [json.loads(line)["label"] for line in (workdir / f"afqmc_predict.seed{seed}.json").read_text().splitlines()]
        assert [int(x) for x in written] == logits[-1].argmax(-1).tolist()
    ensemble = np.mean(logits, axis=0).argmax(-1)
    written = [int(json.loads(line)["label"]) for line in (workdir / "afqmc_predict.json").read_text().splitlines()]
    assert written == ensemble.tolist() and len(written) == 3861
    # Not a trivial agreement: the seeds disagree on some rows, and the ensemble predicts both classes.
    assert (logits[0].argmax(-1) != logits[1].argmax(-1)).any() and 0 < ensemble.sum() < len(ensemble)


def test_one_seed_exports_the_ensemble_does_not(two_seeds, tmp_path):
    workdir, _ = two_seeds
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "sda_jax.export", f"--workdir={workdir}", *args], cwd=REPO_ROOT, env=_env(),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    refused = run(f"--out={tmp_path / 'all'}")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "trained 2 seeds (2021, 2022)" in refused.stderr and "--seed S" in refused.stderr
    assert "not" in run(f"--out={tmp_path / 'x'}", "--seed=7").stderr
    exported = run(f"--out={tmp_path / 'one'}", "--seed=2022")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "of seed 2022" in exported.stdout
    assert json.loads((tmp_path / "one" / "sda_jax_export.json").read_text())["seed"] == 2022
    assert not (tmp_path / "all").exists()


def test_one_seed_in_train_seeds_is_todays_run_bit_for_bit(tmp_path):
    today = _train(tmp_path / "today", "--config.seed=2022")
    listed = _train(tmp_path / "listed", "--config.seed=2022", "--config.train.seeds=(2022,)")
    assert today.returncode == 0 and listed.returncode == 0, (today.stderr[-2000:], listed.stderr[-2000:])
    a, b = load_train_state(tmp_path / "today", 12), load_train_state(tmp_path / "listed", 12)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (tmp_path / "today" / "metrics.jsonl").read_text() == (tmp_path / "listed" / "metrics.jsonl").read_text()
    assert (tmp_path / "today" / "afqmc_predict.json").read_text() == (tmp_path / "listed" / "afqmc_predict.json").read_text()


def test_two_seeds_on_four_devices_match_one_device(tmp_path):
    """2 seed groups × 2 data shards: the same runs up to the order of the gradient sums (as the
    one-seed cross-device tests, with BERT's usual initialisation)."""
    runs = {}
    for devices in (1, 4):
        result = _train(tmp_path / str(devices), f"--config.train.seeds={SEEDS}", devices=devices)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[devices] = tmp_path / str(devices)
    assert "4 x cpu" in json.loads((runs[4] / "summary.json").read_text())["devices"]
    losses = lambda w: [(r["step"], r.get("seed"), r["loss"]) for r in _records(w, "train")]
    one, four = losses(runs[1]), losses(runs[4])
    assert [x[:2] for x in one] == [x[:2] for x in four]
    np.testing.assert_allclose([x[2] for x in four], [x[2] for x in one], rtol=1e-4, atol=1e-5)
    a, b = load_train_state(runs[1], 12), load_train_state(runs[4], 12)
    assert a.keys() == b.keys()
    for key in a:
        if not moved_by_rounding_alone(key):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_two_seeds_resume_bit_identically_after_sigkill(tmp_path, monkeypatch):
    flags = [f"--config.train.seeds={SEEDS}"]
    monkeypatch.setattr(test_resume, "TINY", [*test_resume.TINY, *flags])
    uninterrupted = tmp_path / "uninterrupted"
    result = test_resume.run(uninterrupted)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path / "killed"
    code, _ = test_resume.start_and_signal(killed, signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = test_resume.run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step" in resumed.stdout
    test_resume.assert_same_run(uninterrupted, killed)
    assert np.shape(load_train_state(killed, 40)["['step']"]) == (2,)  # the state really has two seeds
