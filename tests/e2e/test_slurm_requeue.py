"""Under a real SLURM (slurm/cluster.sh start), jobs of slurm/train.sbatch on the 1-layer tiny run, 2 CPU tasks:
SLURM's early-warning signal and `scontrol requeue` (every task checkpoints the same step, the job
runs again and resumes; requeued twice, bit-identical to an uninterrupted run), and a CLUE grid as a
job array, its tables merged. Skipped where no SLURM answers (SDA_REQUIRE_SLURM=1 makes that a failure)."""


from __future__ import annotations

import re
import subprocess
import sys
import time

from sda_jax import merge_sweeps
from tests.conftest import REPO_ROOT, TINY_RUN, flags_of
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


@slurm
def test_signal_then_requeue_resume_bit_identical(env, uninterrupted, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "log"
    job_id = submit(env, workdir, log)
    info = lambda: job(env, job_id)
    text = lambda: log.read_text() if log.exists() else ""
    # 1. SLURM's early warning (what --signal=USR1@300 sends before the time limit): the script requeues.
    wait_for("the first checkpoint", lambda: checkpoints(workdir), 300, info)
    _slurm(env, "scancel", "--signal=USR1", job_id)
    wait_for("the stop on SIGUSR1", lambda: "stopped by SIGUSR1 at step" in text(), 120, info)
    wait_for("the first restart's first step", lambda: text().count("Restarted: first new step") >= 1, 300, info)
    first_stop = int(re.search(r"stopped by SIGUSR1 at step (\d+)", text()).group(1))
    # 2. scontrol requeue (an admin, a preemption with PreemptMode=REQUEUE): SLURM requeues.
    wait_for("a checkpoint after the restart", lambda: checkpoints(workdir)[-1] > first_stop, 300, info)
    requeued_at = time.time()
    _slurm(env, "scontrol", "requeue", job_id)
    wait_for("the second restart's first step", lambda: text().count("Restarted: first new step") >= 2, 400, info)
    print(f"\nscontrol requeue -> first new step: {time.time() - requeued_at:.1f} s")
    final = wait_done(env, job_id)
    out = text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "2", (final, out[-3000:])
    assert "stopped by SIGTERM at step" in out and "requeue" in out
    assert len(re.findall(r"Resuming from the checkpoint of step \d+", out)) == 2
    assert not any(noise in out for noise in NOISE), out[-3000:]
    assert_same_run(workdir, uninterrupted)
    # What the user takes away: the exported model, byte for byte.
    for run, out_dir in ((workdir, tmp_path / "exported"), (uninterrupted, tmp_path / "exported-uninterrupted")):
        export = subprocess.run(
            [sys.executable, "-m", "sda_jax.export", f"--workdir={run}", f"--out={out_dir}"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert export.returncode == 0, export.stderr[-3000:]
    exported, reference = (tmp_path / name / "model.safetensors" for name in ("exported", "exported-uninterrupted"))
    assert exported.read_bytes() == reference.read_bytes()


@slurm
def test_grid_as_a_job_array_and_its_merged_table(env, tmp_path):
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
    array_id = _slurm(
        env, "sbatch", "--parsable", "--array=0-1", "--ntasks=1", f"--output={tmp_path}/log-%a", f"--chdir={REPO_ROOT}",
        "slurm/clue_grid.sbatch", "configs/afqmc_small.py", f"--workdir={grid}", *flags_of({**short, **sweep}),
    ).strip().split(";")[0]  # fmt: skip
    for task in (0, 1):
        info = wait_done(env, f"{array_id}_{task}")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"log-{task}").read_text()[-3000:]
    assert sorted(p.name for p in grid.iterdir()) == ["bs16", "bs32"]
    merge_sweeps.main(["--out", str(grid), str(grid / "bs16"), str(grid / "bs32")])
    rows = (grid / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("train.batch_size,workdir,optim.learning_rate,")
    assert [row.split(",")[0] for row in rows[1:]] == ["16", "16", "32", "32"]
