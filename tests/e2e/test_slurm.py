"""Under a real SLURM (slurm/cluster.sh start), jobs of slurm/train.sbatch on the 1-layer tiny run
(tests/conftest.py's TINY_RUN, on its cut of AFQMC), 2 CPU tasks:
- SLURM's early-warning signal and `scontrol requeue`: every task checkpoints the same step, the job
  runs again and resumes; requeued twice, bit-identical to an uninterrupted run, export included;
- a task SIGKILLed (the job ends at once; a resubmission resumes bit-exactly on 2 tasks, or on 1 with
  the same result to rounding and a one-line note) or frozen by SIGSTOP (the other ends within 60 s
  with one line naming it; a resubmission on 4 tasks resumes from the last complete checkpoint);
- a CLUE grid as a job array, its tables merged.
One file, so that one worker runs the jobs one after another and they share one uninterrupted job.
Skipped where no SLURM answers (SDA_REQUIRE_SLURM=1 makes that a failure)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sda_jax import merge_sweeps
from tests.conftest import REPO_ROOT, TINY_RUN, flags_of
from tests.e2e.resume_runs import assert_close_run, assert_same_run, train_steps

slurm = pytest.mark.slurm

STEPS = 60
RUN = {**TINY_RUN, "train.max_steps": STEPS, "train.log_every": 5, "train.eval_every": 30, "train.checkpoint_every": 10}
DEFAULT_CONF = "/var/tmp/sda-jax-slurm/slurm.conf"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The running SLURM: its environment."""

    env: dict[str, str]

    def run(self, *args: str) -> str:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=True).stdout

    def submit(self, workdir: pathlib.Path, log: pathlib.Path, tasks: int = 2) -> str:
        """A job of slurm/train.sbatch (RUN) on `tasks` tasks of the one node; its id."""
        return self.run(
            "sbatch", "--parsable", f"--ntasks={tasks}", f"--ntasks-per-node={tasks}", f"--output={log}",
            f"--chdir={REPO_ROOT}", "--time=00:20:00", "slurm/train.sbatch", "configs/afqmc_small.py",
            f"--workdir={workdir}", *flags_of(RUN),
        ).strip().split(";")[0]  # fmt: skip

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        show = ["scontrol", "-o", "show", "job", job_id]
        out = subprocess.run(show, env=self.env, capture_output=True, text=True, timeout=60, check=False).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_done(self, job_id: str, timeout: float = 400) -> dict[str, str]:
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        return wait_for(f"job {job_id} to end", lambda: (info := self.job(job_id)).get("JobState") in ended and info,
                        timeout, lambda: self.job(job_id))  # fmt: skip


@pytest.fixture(scope="module", name="cluster")
def cluster_fixture() -> Cluster:
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
    return Cluster(env)


def wait_for(what, condition, timeout: float, job_info=None):
    deadline = time.time() + timeout
    while not (value := condition()):
        if time.time() > deadline:
            pytest.fail(f"waited {timeout} s for {what}; job: {job_info() if job_info else ''}")
        time.sleep(0.2)
    return value


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


NOISE = ("Traceback", "Fatal Python error", "Stack dump", "*** Begin stack trace", "Check failure")


@pytest.fixture(scope="module", name="uninterrupted")
def uninterrupted_fixture(cluster, tmp_path_factory):
    """An undisturbed 2-task job of the same run."""
    folder = tmp_path_factory.mktemp("slurm-uninterrupted")
    job_id = cluster.submit(folder / "run", folder / "log")
    info = cluster.wait_done(job_id)
    assert info["JobState"] == "COMPLETED", (folder / "log").read_text()[-3000:]
    return folder / "run"


@slurm
def test_signal_then_requeue_resume_bit_identical(cluster, uninterrupted, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "log"
    job_id = cluster.submit(workdir, log)
    info = lambda: cluster.job(job_id)
    text = lambda: log.read_text() if log.exists() else ""
    # 1. SLURM's early warning (what --signal=USR1@300 sends before the time limit): the script requeues.
    wait_for("the first checkpoint", lambda: train_steps(workdir), 300, info)
    cluster.run("scancel", "--signal=USR1", job_id)
    wait_for("the stop on SIGUSR1", lambda: "stopped by SIGUSR1 at step" in text(), 120, info)
    wait_for("the first restart's first step", lambda: text().count("Restarted: first new step") >= 1, 300, info)
    # 2. scontrol requeue (an admin, a preemption with PreemptMode=REQUEUE): SLURM requeues. At once,
    # so that the signal comes well before the tiny run's last step.
    requeued_at = time.time()
    cluster.run("scontrol", "requeue", job_id)
    wait_for("the second restart's first step", lambda: text().count("Restarted: first new step") >= 2, 400, info)
    print(f"\nscontrol requeue -> first new step: {time.time() - requeued_at:.1f} s")
    final = cluster.wait_done(job_id)
    out = text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "2", (final, out[-3000:])
    assert "stopped by SIGTERM at step" in out and "requeue" in out
    assert len(re.findall(r"Resuming from the checkpoint of step \d+", out)) == 2
    assert not any(noise in out for noise in NOISE), out[-3000:]
    assert_same_run(workdir, uninterrupted, STEPS)
    # What the user takes away: the exported model, byte for byte.
    for run, out_dir in ((workdir, tmp_path / "exported"), (uninterrupted, tmp_path / "exported-uninterrupted")):
        export = subprocess.run(
            [sys.executable, "-m", "sda_jax.export", f"--workdir={run}", f"--out={out_dir}"],
            cwd=REPO_ROOT, env=cluster.env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert export.returncode == 0, export.stderr[-3000:]
    exported, reference = (tmp_path / name / "model.safetensors" for name in ("exported", "exported-uninterrupted"))
    assert exported.read_bytes() == reference.read_bytes()


@slurm
def test_grid_as_a_job_array_and_its_merged_table(cluster, tmp_path):
    """slurm/clue_grid.sbatch, two of its array tasks (batch sizes 16 and 32), each a sweep of two
    learning rates; merge_sweeps makes one table of the four combinations."""
    grid = tmp_path / "grid"
    short = {
        **TINY_RUN,
        "train.max_steps": 10,
        "train.log_every": 5,
        "train.eval_every": 10,
        "train.checkpoint_every": 10,
    }
    sweep = {"sweep.optim.learning_rate": (1e-3, 2e-3), "sweep.seed": (1,)}
    array_id = cluster.run(
        "sbatch", "--parsable", "--array=0-1", "--ntasks=1", f"--output={tmp_path}/log-%a", f"--chdir={REPO_ROOT}",
        "slurm/clue_grid.sbatch", "configs/afqmc_small.py", f"--workdir={grid}", *flags_of({**short, **sweep}),
    ).strip().split(";")[0]  # fmt: skip
    for task in (0, 1):
        info = cluster.wait_done(f"{array_id}_{task}")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"log-{task}").read_text()[-3000:]
    assert sorted(p.name for p in grid.iterdir()) == ["bs16", "bs32"]
    merge_sweeps.main(["--out", str(grid), str(grid / "bs16"), str(grid / "bs32")])
    rows = (grid / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("train.batch_size,workdir,optim.learning_rate,")
    assert [row.split(",")[0] for row in rows[1:]] == ["16", "16", "32", "32"]


def _start_and_hit_one_task(cluster, workdir, log, sig) -> tuple[str, float, dict[int, int]]:
    job_id = cluster.submit(workdir, log)
    # The tasks first, so that the signal follows the first checkpoint closely (the tiny run is quick).
    pids = wait_for("both tasks", lambda: len(p := task_pids(job_id)) == 2 and p, 120, lambda: cluster.job(job_id))
    wait_for("the first checkpoint", lambda: train_steps(workdir), 300, lambda: cluster.job(job_id))
    os.kill(pids[1], sig)
    return job_id, time.time(), pids


@slurm
def test_killed_task_ends_the_job_and_resubmissions_resume(cluster, uninterrupted, tmp_path):
    """SIGKILL of one task: srun --kill-on-bad-exit ends the other; resubmitted on 2 tasks the run
    ends bit-identical, on 1 task the same to rounding (and says so in one line)."""
    workdir, log = tmp_path / "run", tmp_path / "log"
    job_id, hit, pids = _start_and_hit_one_task(cluster, workdir, log, signal.SIGKILL)
    wait_for("the other task to end", lambda: not alive(pids[0]), 60)
    print(f"\nSIGKILL of task 1 -> task 0 gone after {time.time() - hit:.1f} s")
    assert cluster.wait_done(job_id, timeout=120)["JobState"] == "FAILED"
    out = log.read_text()
    assert not any(noise in out for noise in NOISE), out[-3000:]
    assert "a task failed" in out  # the script's last line, not "requeue"
    one_task = tmp_path / "one-task"
    shutil.copytree(workdir, one_task)
    # The same command again, on 2 tasks: bit-identical.
    again = cluster.submit(workdir, log)
    assert cluster.wait_done(again)["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert "Resuming from the checkpoint of step" in log.read_text()
    assert_same_run(workdir, uninterrupted, STEPS)
    # On 1 task (a requeued job may get less): the same to rounding, and one line says why not exact.
    job_id = cluster.submit(one_task, tmp_path / "log1", tasks=1)
    assert cluster.wait_done(job_id)["JobState"] == "COMPLETED", (tmp_path / "log1").read_text()[-3000:]
    assert "written on 2 devices (2 processes) and resumes on 1 (1)" in (tmp_path / "log1").read_text()
    assert_close_run(one_task, uninterrupted, STEPS)


@slurm
def test_frozen_task_ends_the_others_within_60s_with_one_line(cluster, uninterrupted, tmp_path):
    """SIGSTOP of one task (a hung node, a network partition): the other ends within 60 s with one
    line naming it; resubmitted on 4 tasks, the run resumes from the last complete checkpoint."""
    workdir, log = tmp_path / "run", tmp_path / "log"
    job_id, hit, pids = _start_and_hit_one_task(cluster, workdir, log, signal.SIGSTOP)
    try:
        wait_for("the other task to end", lambda: not alive(pids[0]), 60)
        print(f"\nSIGSTOP of task 1 -> task 0 gone after {time.time() - hit:.1f} s")
        final = cluster.wait_done(job_id, timeout=120)
        print(f"SIGSTOP of task 1 -> job {final['JobState']} after {time.time() - hit:.1f} s")
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    out = log.read_text()
    assert "error: lost process 1 of 2: no heartbeat for" in out, out[-3000:]
    assert "lost the coordinator" not in out, out[-3000:]  # the frozen task, thawed, blames no one
    assert not any(noise in out for noise in NOISE), out[-3000:]
    job_id = cluster.submit(workdir, log, tasks=4)
    assert cluster.wait_done(job_id, timeout=600)["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert "written on 2 devices (2 processes) and resumes on 4 (4)" in log.read_text()
    assert_close_run(workdir, uninterrupted, STEPS)
