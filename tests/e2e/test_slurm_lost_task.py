"""Under a real SLURM, a task of a 2-task job SIGKILLed (the job ends at once, a resubmission resumes
bit-exactly on 2 tasks, or on 1 with the same result to rounding and a one-line note) or frozen by
SIGSTOP (the other ends within 60 s with one line naming it; a resubmission on 4 tasks resumes from
the last complete checkpoint). Skipped where no SLURM answers."""


from __future__ import annotations

import os
import shutil
import signal
import time

from tests.e2e.slurm_jobs import (  # noqa: F401 (env_fixture, uninterrupted_fixture: the fixtures env and uninterrupted)
    FLAGS,
    NOISE,
    RUN,
    STEPS,
    _slurm,
    alive,
    assert_close_run,
    assert_same_run,
    checkpoints,
    env_fixture,
    job,
    slurm,
    submit,
    task_pids,
    uninterrupted_fixture,
    wait_done,
    wait_for,
)


def _start_and_hit_one_task(env, workdir, log, sig) -> tuple[str, float, dict[int, int]]:
    job_id = submit(env, workdir, log)
    wait_for("the first checkpoint", lambda: checkpoints(workdir), 300, lambda: job(env, job_id))
    pids = wait_for("both tasks", lambda: len(p := task_pids(job_id)) == 2 and p, 30)
    os.kill(pids[1], sig)
    return job_id, time.time(), pids


@slurm
def test_killed_task_ends_the_job_and_resubmissions_resume(env, uninterrupted, tmp_path):
    """SIGKILL of one task: srun --kill-on-bad-exit ends the other; resubmitted on 2 tasks the run
    ends bit-identical, on 1 task the same to rounding (and says so in one line)."""
    workdir, log = tmp_path / "run", tmp_path / "log"
    job_id, hit, pids = _start_and_hit_one_task(env, workdir, log, signal.SIGKILL)
    wait_for("the other task to end", lambda: not alive(pids[0]), 60)
    print(f"\nSIGKILL of task 1 -> task 0 gone after {time.time() - hit:.1f} s")
    assert wait_done(env, job_id, timeout=120)["JobState"] == "FAILED"
    out = log.read_text()
    assert not any(noise in out for noise in NOISE), out[-3000:]
    assert "a task failed" in out  # the script's last line, not "requeue"
    one_task = tmp_path / "one-task"
    shutil.copytree(workdir, one_task)
    # The same command again, on 2 tasks: bit-identical.
    again = submit(env, workdir, log)
    assert wait_done(env, again)["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert "Resuming from the checkpoint of step" in log.read_text()
    assert_same_run(workdir, uninterrupted)
    # On 1 task (a requeued job may get less): the same to rounding, and one line says why not exact.
    job_id = submit(env, one_task, tmp_path / "log1", tasks=1)
    assert wait_done(env, job_id)["JobState"] == "COMPLETED", (tmp_path / "log1").read_text()[-3000:]
    assert "written on 2 devices (2 processes) and resumes on 1 (1)" in (tmp_path / "log1").read_text()
    assert_close_run(one_task, uninterrupted)


@slurm
def test_frozen_task_ends_the_others_within_60s_with_one_line(env, uninterrupted, tmp_path):
    """SIGSTOP of one task (a hung node, a network partition): the other ends within 60 s with one
    line naming it; resubmitted on 4 tasks, the run resumes from the last complete checkpoint."""
    workdir, log = tmp_path / "run", tmp_path / "log"
    job_id, hit, pids = _start_and_hit_one_task(env, workdir, log, signal.SIGSTOP)
    try:
        wait_for("the other task to end", lambda: not alive(pids[0]), 60)
        print(f"\nSIGSTOP of task 1 -> task 0 gone after {time.time() - hit:.1f} s")
        final = wait_done(env, job_id, timeout=120)
        print(f"SIGSTOP of task 1 -> job {final['JobState']} after {time.time() - hit:.1f} s")
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    out = log.read_text()
    assert "error: lost process 1 of 2: no heartbeat for" in out, out[-3000:]
    assert "lost the coordinator" not in out, out[-3000:]  # the frozen task, thawed, blames no one
    assert not any(noise in out for noise in NOISE), out[-3000:]
    job_id = submit(env, workdir, log, tasks=4)
    assert wait_done(env, job_id, timeout=600)["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert "written on 2 devices (2 processes) and resumes on 4 (4)" in log.read_text()
    assert_close_run(workdir, uninterrupted)


