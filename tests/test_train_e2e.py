"""End to end: a 2-layer BERT trains on the real AFQMC files through the command line.

Runs `python -m sda_jax.train` in subprocesses, as a user would, so that the 4-device run can set
XLA_FLAGS before JAX starts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TINY_RUN_FLAGS

TINY = [
    "--config.model.num_hidden_layers=2",
    "--config.model.hidden_size=64",
    "--config.model.num_attention_heads=2",
    "--config.model.intermediate_size=128",
    "--config.optim.learning_rate=0.0005",
]


def run_train(workdir, *overrides, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", *TINY, *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, check=False, text=True, timeout=900,
    )  # fmt: skip


def read_metrics(workdir, split):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, afqmc_dir):
    workdir = tmp_path_factory.mktemp("run") / "small"
    result = run_train(
        workdir, "--config.train.max_steps=300", "--config.train.eval_every=150", "--config.train.log_every=10",
        "--config.train.batch_size=32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_training_loss_falls(trained):
    workdir, _ = trained
    losses = [r["loss"] for r in read_metrics(workdir, "train")]
    assert len(losses) == 30
    assert all(np.isfinite(losses))
    # The first 10-step window starts at the untrained model's loss (about ln 2); the last ones
    # are well below it.
    assert np.mean(losses[-5:]) < losses[0] - 0.03, losses


def test_compiles_at_most_once_per_bucket(trained):
    workdir, result = trained
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 300
    # The shipped configs let the cost model pick the bucket lengths; each compiles at most once.
    assert 1 <= summary["train_step_compilations"] <= summary["num_buckets"] == len(summary["bucket_lengths"])
    assert summary["bucket_lengths"][-1] == 64 and summary["bucket_lengths"] == sorted(set(summary["bucket_lengths"]))
    assert summary["bucket_choice"] == "cost model"
    assert "Bucket lengths for cpu by the cost model (" in result.stdout
    assert f"): {summary['bucket_lengths']} (" in result.stdout
    assert f"compiled programs  {summary['train_step_compilations']} train + " in result.stdout
    # Evaluation runs in the train step's shapes: per bucket length one eval program for dev
    # (student, teacher and the not-yet-started eval EMA, which is the student: 2 members) and
    # one for test prediction (the best eval EMA alone), no more.
    assert summary["eval_step_compilations"] == 2 * summary["num_buckets"]


def test_dev_metrics_and_best_checkpoint(trained):
    workdir, _ = trained
    records = read_metrics(workdir, "dev")
    assert [(r["step"], r["params"]) for r in records] == [
        (step, name) for step in (150, 300) for name in ("student", "eval_ema", "teacher")
    ]
    dev = [r for r in records if r["params"] == "student"]  # the eval EMA starts at step 500
    for record in dev:
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["f1"] <= 1.0 and record["loss"] > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["best_dev_accuracy"] == max(r["accuracy"] for r in dev)
    best_steps = sorted(p.name for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit())
    assert best_steps == [str(summary["best_step"])]


def test_prediction_file_covers_test_set_in_order(trained, afqmc_dir):
    workdir, _ = trained
    rows = [json.loads(line) for line in (workdir / "afqmc_predict.json").read_text().splitlines()]
    test_ids = [json.loads(line)["id"] for line in (afqmc_dir / "test.json").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(test_ids) == 3861
    assert [r["id"] for r in rows] == test_ids
    assert {r["label"] for r in rows} <= {"0", "1"}
    assert all(set(r) == {"id", "label"} for r in rows)


def test_four_devices_agree_with_one(tmp_path):
    overrides = ["--config.train.max_steps=30", "--config.train.log_every=1", "--config.train.eval_every=30",
                 "--config.data.bucket_lengths=(32,64)"]  # fmt: skip
    one = run_train(tmp_path / "one", *overrides, devices=1)
    four = run_train(tmp_path / "four", *overrides, devices=4)
    assert one.returncode == 0, one.stderr[-3000:]
    assert four.returncode == 0, four.stderr[-3000:]
    assert "4 x cpu" in json.loads((tmp_path / "four" / "summary.json").read_text())["devices"]
    losses_one = [r["loss"] for r in read_metrics(tmp_path / "one", "train")]
    losses_four = [r["loss"] for r in read_metrics(tmp_path / "four", "train")]
    assert len(losses_one) == len(losses_four) == 30
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-4, atol=1e-5)
    dev_one, dev_four = read_metrics(tmp_path / "one", "dev")[-1], read_metrics(tmp_path / "four", "dev")[-1]
    np.testing.assert_allclose(dev_four["loss"], dev_one["loss"], rtol=1e-4)


def test_batch_size_not_divisible_by_devices(tmp_path):
    result = run_train(tmp_path / "w", "--config.train.batch_size=30", "--config.train.max_steps=2", devices=4)
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w").exists()


def test_tensorboard_events_and_curves_png(trained):
    workdir, _ = trained
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    png = (workdir / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_runs_of_other_lengths_share_their_compiled_programs(tmp_path):
    """The schedule's step counts are arrays in the state, not constants of the programs: a run of
    another length (or learning rate) finds every program in the persistent compilation cache."""
    cache = tmp_path / "xla-cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), XLA_FLAGS="--xla_force_host_platform_device_count=1")

    def run(workdir, *overrides):
        args = [
            sys.executable, "-m", "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}",
            *TINY_RUN_FLAGS, *overrides,
        ]  # fmt: skip
        result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, check=False, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return sorted(p.name for p in cache.iterdir())

    first = run(tmp_path / "a", "--config.train.max_steps=4", "--config.train.eval_every=4")
    assert len(first) >= 3  # train, eval and stacking programs at least
    second = run(tmp_path / "b", "--config.train.max_steps=7", "--config.train.eval_every=7", "--config.optim.learning_rate=0.003")
    assert second == first, (first, second)
