"""End to end: a 2-layer BERT trains on the real AFQMC files (in this process), and runs that share
their compiled programs through the command line."""

import contextlib
import io
import json
import re

import numpy as np
import pytest

from sda_jax.errors import InputError
from sda_jax.parallel import distributed
from tests.conftest import TINY_RUN_FLAGS, read_records, train_in_process

TINY = {
    "model.num_hidden_layers": 2,
    "model.hidden_size": 64,
    "model.num_attention_heads": 2,
    "model.intermediate_size": 128,
    "optim.learning_rate": 0.0005,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "small"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = train_in_process(
            workdir, {**TINY, "train.max_steps": 300, "train.eval_every": 150, "train.log_every": 10, "train.batch_size": 32}
        )
    return workdir, summary, printed.getvalue()


def test_training_loss_falls(trained):
    workdir, *_ = trained
    losses = [r["loss"] for r in read_records(workdir, "train")]
    assert len(losses) == 30
    assert all(np.isfinite(losses))
    # The first 10-step window starts at the untrained model's loss (about ln 2); the last ones
    # are well below it.
    assert np.mean(losses[-5:]) < losses[0] - 0.03, losses


def test_compiles_at_most_once_per_bucket(trained):
    workdir, summary, printed = trained
    assert summary == json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 300
    # The shipped configs let the cost model pick the bucket lengths; each compiles at most once.
    assert 1 <= summary["train_step_compilations"] <= summary["num_buckets"] == len(summary["bucket_lengths"])
    assert summary["bucket_lengths"][-1] == 64 and summary["bucket_lengths"] == sorted(set(summary["bucket_lengths"]))
    assert summary["bucket_choice"] == "cost model"
    assert "Bucket lengths for cpu by the cost model (" in printed and f"): {summary['bucket_lengths']} (" in printed
    assert re.search(rf"compiled programs +{summary['train_step_compilations']} train \+ ", printed)
    # Evaluation runs in the train step's shapes: per bucket length one eval program for dev
    # (the student and the teacher; the eval EMA, which starts at step 500, is the student) and
    # one for prediction and the ensemble's dev pass (the best eval EMA alone), no more.
    assert summary["eval_step_compilations"] == 2 * summary["num_buckets"]


def test_dev_metrics_and_best_checkpoint(trained):
    workdir, summary, _ = trained
    records = read_records(workdir, "dev")
    assert [(r["step"], r["params"]) for r in records] == [
        (step, name) for step in (150, 300) for name in ("student", "eval_ema", "teacher")
    ]
    dev = [r for r in records if r["params"] == "student"]  # the eval EMA starts at step 500
    for record in dev:
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["f1"] <= 1.0 and record["loss"] > 0
        # One model: its own record, the mean over the models, and their ensemble are the same.
        assert record["models"] == [{k: record[k] for k in ("accuracy", "f1", "loss")}] and record["std"]["accuracy"] == 0
        assert record["ensemble"]["accuracy"] == record["accuracy"]
    assert summary["best_dev_accuracy"] == max(r["accuracy"] for r in dev)
    assert summary["models"][0]["best_dev_accuracy"] == summary["best_dev_accuracy"] and summary["best_dev_accuracy_std"] == 0
    best_steps = sorted(p.name for p in (workdir / "checkpoints" / "best" / "model_0").iterdir() if p.name.isdigit())
    assert best_steps == [str(summary["models"][0]["best_step"])]


def test_prediction_file_covers_test_set_in_order(trained, afqmc_dir):
    workdir, *_ = trained
    rows = [json.loads(line) for line in (workdir / "afqmc_predict.json").read_text().splitlines()]
    test_ids = [json.loads(line)["id"] for line in (afqmc_dir / "test.json").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(test_ids) == 3861
    assert [r["id"] for r in rows] == test_ids
    assert {r["label"] for r in rows} <= {"0", "1"}
    assert all(set(r) == {"id", "label"} for r in rows)


def test_tensorboard_events_and_curves_png(trained):
    workdir, *_ = trained
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    png = (workdir / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_batch_size_not_divisible_by_devices():
    class FourDevices:
        shape = {distributed.DATA_AXIS: 4}

    with pytest.raises(InputError, match=r"train.batch_size: 30 does not divide by the 4 devices"):
        distributed.check_batch_size(30, FourDevices())
    distributed.check_batch_size(32, FourDevices())


def test_runs_of_other_lengths_share_their_compiled_programs(tmp_path, cli):
    """The schedule's step counts are arrays in the state, not constants of the programs: a run of
    another length (or learning rate) finds every program in the persistent compilation cache."""
    cache = tmp_path / "xla-cache"

    def run(workdir, *overrides):
        result = cli.run("sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", *TINY_RUN_FLAGS,
                         *overrides, env={"JAX_COMPILATION_CACHE_DIR": str(cache)}, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return sorted(p.name for p in cache.iterdir())

    first = run(tmp_path / "a", "--config.train.max_steps=4", "--config.train.eval_every=4")
    assert len(first) >= 2  # train and eval programs at least
    second = run(tmp_path / "b", "--config.train.max_steps=7", "--config.train.eval_every=7", "--config.optim.learning_rate=0.003")
    assert second == first, (first, second)
    # TINY_RUN turns the curves off: the run's other outputs are there, the PNG is not.
    assert (tmp_path / "b" / "summary.json").is_file() and not (tmp_path / "b" / "training_curves.png").exists()
