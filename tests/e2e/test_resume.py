"""Resume after a crash or preemption ends bit-identical to an uninterrupted run; numerics guards.

Each run is a real `python -m sda_jax.train` process on a 1-layer BERT with a single bucket
length (one compilation), killed with SIGKILL or SIGTERM at a random step and started again.
"""

import json
import os
import shutil
import signal

import numpy as np
import pytest

from tests.conftest import load_train_state, read_records, train_in_process
from tests.e2e.resume_runs import (
    RUN,
    assert_close_run,
    assert_same_run,
    run,
    start_and_signal,
    train_steps,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The undisturbed run, in this process: a command-line run compiles the same programs, so the
    runs of the tests below, killed and resumed through the command line, must end bit-identical to it."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_in_process(workdir, RUN)
    return workdir


def test_checkpoint_holds_everything(uninterrupted):
    state = load_train_state(uninterrupted, 40)
    tops = {key.split("'")[1] for key in state}
    assert {"step", "params", "opt_state", "teacher", "eval_ema", "hyper", "skipped_steps"} <= tops
    assert int(state["['step']"]) == 40
    position = json.loads((uninterrupted / "checkpoints/train/40/position/metadata").read_text())
    assert position["step"] == 40 and position["seed"] == 2021
    assert train_steps(uninterrupted) == [30, 40]  # keep_checkpoints=2


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run SIGKILLed at a random step after its first checkpoint; each test resumes a copy."""
    workdir = tmp_path_factory.mktemp("killed") / "run"
    code, _ = start_and_signal(workdir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    return workdir


def test_sigkill_then_resume_is_bit_identical(uninterrupted, killed, tmp_path):
    workdir = shutil.copytree(killed, tmp_path / "run", symlinks=True)
    assert (workdir / ".lock").exists()  # the killed run's lock file stays; its flock died with it
    resumed = run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step" in resumed.stdout
    restarted = next(line for line in resumed.stdout.splitlines() if line.startswith("Restarted: first new step after "))
    assert "startup" in restarted and "compile" in restarted, restarted  # the restart's cost by phase
    assert_same_run(uninterrupted, workdir)


def test_sigterm_checkpoints_and_exits_cleanly(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    code, stderr = start_and_signal(workdir, signal.SIGTERM)
    if code == 0:  # the run finished before the signal landed: nothing to resume
        pytest.fail("the run ended before SIGTERM; make the run longer")
    assert code == 143, stderr[-2000:]
    assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr
    stopped_at = int(stderr.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at in train_steps(workdir) and stopped_at % 5 == 0  # a log boundary
    resumed = run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, workdir)


@pytest.mark.soak
def test_soak_many_kills_end_identical(uninterrupted, tmp_path):
    """Kill cycles, each after one more checkpoint (at most 3 fit in the 40-step run): SDA_SOAK_CYCLES, CI 2."""
    workdir = tmp_path / "run"
    cycles = int(os.environ.get("SDA_SOAK_CYCLES", "2"))
    for _ in range(cycles):
        steps = train_steps(workdir)
        if steps and steps[-1] >= 30:
            break
        start_and_signal(workdir, signal.SIGKILL, after_checkpoint_steps=(steps[-1] if steps else 0) + 10)
    result = run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(uninterrupted, workdir)


def test_workdir_with_other_settings_refuses_then_fresh_replaces(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    (workdir).mkdir()
    (workdir / "settings.json").write_text((uninterrupted / "settings.json").read_text())
    refused = run(workdir, "--config.optim.learning_rate=0.002")
    assert refused.returncode == 2
    assert "optim.learning_rate" in refused.stderr.strip().splitlines()[-1]
    assert "--fresh" in refused.stderr.strip().splitlines()[-1]
    replaced = run(workdir, "--config.optim.learning_rate=0.002", "--config.train.max_steps=5", "--fresh")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((workdir / "settings.json").read_text())["optim"]["learning_rate"] == 0.002


def test_diverged_run_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    result = run(workdir, "--config.optim.learning_rate=1e30", "--config.optim.warmup_ratio=0.0")
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("diverged" in last or "non-finite" in last)
    for step in train_steps(workdir):
        for key, value in load_train_state(workdir, step).items():
            assert np.all(np.isfinite(value)), (step, key)


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path):
    workdir = tmp_path / "run"
    result = run(workdir, "--config.model.dtype=float16", "--config.fp16.initial_loss_scale=1e30", "--config.train.max_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert train[-1]["skipped_steps"] >= 1
    assert train[-1]["loss_scale"] < 1e30
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["skipped_steps"] == train[-1]["skipped_steps"]
    for key, value in load_train_state(workdir, 10).items():
        assert np.all(np.isfinite(value)), key


def test_resume_on_another_device_count(uninterrupted, killed, tmp_path):
    workdir = shutil.copytree(killed, tmp_path / "run", symlinks=True)
    resumed = run(workdir, devices=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "4 x cpu" in json.loads((workdir / "summary.json").read_text())["devices"]
    assert_close_run(workdir, uninterrupted)  # the same run up to the order of the gradient sums


@pytest.mark.api_surface
def test_four_devices_agree_with_one(uninterrupted, tmp_path):
    """The same run from scratch on 4 devices: the logged losses, the dev figures and the final
    state of the one-device `uninterrupted`, up to the order of the gradient sums."""
    workdir = tmp_path / "run"
    result = run(workdir, devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 x cpu" in json.loads((workdir / "summary.json").read_text())["devices"]
    losses_one = [r["loss"] for r in read_records(uninterrupted, "train")]
    losses_four = [r["loss"] for r in read_records(workdir, "train")]
    assert len(losses_one) == len(losses_four) == 8  # every 5 of the 40 steps
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-4, atol=1e-5)
    dev_one, dev_four = read_records(uninterrupted, "dev")[-1], read_records(workdir, "dev")[-1]
    assert dev_one["step"] == dev_four["step"] == 40
    np.testing.assert_allclose(dev_four["loss"], dev_one["loss"], rtol=1e-4)
    assert_close_run(workdir, uninterrupted)
