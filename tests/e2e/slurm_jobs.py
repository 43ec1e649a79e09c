"""The SLURM tests' jobs: the cluster's environment, submitting slurm/train.sbatch, waiting, and
comparing runs (shared by tests/e2e/test_slurm_*.py, so that two workers run their jobs side by side)."""


from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TINY_RUN, flags_of, load_train_state, moved_by_rounding_alone

slurm = pytest.mark.slurm

STEPS = 60
RUN = {**TINY_RUN, "train.max_steps": STEPS, "train.log_every": 5, "train.eval_every": 30, "train.checkpoint_every": 10}
FLAGS = flags_of(RUN)
DEFAULT_CONF = "/var/tmp/sda-jax-slurm/slurm.conf"


@pytest.fixture(scope="module", name="env")
def env_fixture():
    conf = os.environ.get("SLURM_CONF") or DEFAULT_CONF
    env = dict(os.environ, SLURM_CONF=conf, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # one CPU device per task
    up = (
        shutil.which("sbatch")
        and pathlib.Path(conf).is_file()  # sinfo would wait 60 s for a missing one
        and subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=30, check=False).returncode == 0
    )
    if not up:
        if os.environ.get("SDA_REQUIRE_SLURM"):
            pytest.fail(f"no SLURM answers (SLURM_CONF={conf}): start one with slurm/cluster.sh start")
        pytest.skip(f"no SLURM answers (SLURM_CONF={conf}): slurm/cluster.sh start starts one")
    return env


def _slurm(env, *args: str) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60, check=True).stdout


def submit(env, workdir: pathlib.Path, log: pathlib.Path, tasks: int = 2) -> str:
    """A job of slurm/train.sbatch on `tasks` tasks of the one node; its id."""
    return _slurm(
        env, "sbatch", "--parsable", f"--ntasks={tasks}", f"--ntasks-per-node={tasks}", f"--output={log}",
        f"--chdir={REPO_ROOT}", "--time=00:20:00", "slurm/train.sbatch", "configs/afqmc_small.py",
        f"--workdir={workdir}", *FLAGS,
    ).strip().split(";")[0]  # fmt: skip


def job(env, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=60, check=False
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(what, condition, timeout: float, job_info=None):
    deadline = time.time() + timeout
    while not (value := condition()):
        if time.time() > deadline:
            pytest.fail(f"waited {timeout} s for {what}; job: {job_info() if job_info else ''}")
        time.sleep(0.2)
    return value


def wait_done(env, job_id: str, timeout: float = 400) -> dict[str, str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_for(f"job {job_id} to end", lambda: (info := job(env, job_id)).get("JobState") in ended and info, timeout,
                    lambda: job(env, job_id))  # fmt: skip


def checkpoints(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints" / "train"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def task_pids(job_id: str) -> dict[int, int]:
    """{SLURM_PROCID: pid} of the job's training processes."""
    found = {}
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"sda_jax.train" not in (proc / "cmdline").read_bytes():
                continue
            environ = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if environ.get(b"SLURM_JOB_ID") == job_id.encode() and b"SLURM_PROCID" in environ:
            found[int(environ[b"SLURM_PROCID"])] = int(proc.name)
    return found


def alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def assert_same_run(a: pathlib.Path, b: pathlib.Path):
    flat_a, flat_b = load_train_state(a, STEPS), load_train_state(b, STEPS)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert (a / "afqmc_predict.json").read_text() == (b / "afqmc_predict.json").read_text()


def assert_close_run(a: pathlib.Path, b: pathlib.Path):
    """The same run up to the order of the gradient sums (another device count)."""
    flat_a, flat_b = load_train_state(a, STEPS), load_train_state(b, STEPS)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_b:
        if not moved_by_rounding_alone(key):
            np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=1e-4, atol=1e-5, err_msg=key)


NOISE = ("Traceback", "Fatal Python error", "Stack dump", "*** Begin stack trace", "Check failure")


@pytest.fixture(scope="module", name="uninterrupted")
def uninterrupted_fixture(env, tmp_path_factory):
    """An undisturbed 2-task job of the same run."""
    folder = tmp_path_factory.mktemp("slurm-uninterrupted")
    job_id = submit(env, folder / "run", folder / "log")
    info = wait_done(env, job_id)
    assert info["JobState"] == "COMPLETED", (folder / "log").read_text()[-3000:]
    return folder / "run"


