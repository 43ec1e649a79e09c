"""The kill test of the reliability issue: SIGKILL a training run at random intervals, restart it,
and print where each restart resumed and what it cost before its first new step.

    python -m benchmarks.kill_test runs/kill --steps 180 --kills 4      # small config, ~10 min on 2 cores

Each start trains `configs/afqmc_small.py` (checkpoints every 15 steps and every 20 s) until it
is killed after a seeded 30–70 s, or, the last, until it ends; the lines printed are the run's
own (`Resuming from ...`, `Restarted: first new step after ... s (...)`). Figures in
benchmarks/RESULTS.md (2026-12-01, the kill test).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--steps", type=int, default=180, help="train.max_steps of the run")
    parser.add_argument("--kills", type=int, default=4, help="starts killed before the last runs to the end")
    parser.add_argument("--seed", type=int, default=0, help="of the kill intervals")
    args = parser.parse_args()
    command = [
        sys.executable, "-m", "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={args.workdir}",
        f"--config.train.max_steps={args.steps}", "--config.train.checkpoint_every=15",
        "--config.train.checkpoint_every_seconds=20", "--config.train.log_every=5", "--config.train.eval_every=1000000",
        "--config.train.keep_checkpoints=2",
    ]  # fmt: skip
    intervals = random.Random(args.seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a killed run's buffered lines would be lost
    for start in range(args.kills + 1):
        last = start == args.kills
        wait = None if last else intervals.uniform(30, 70)
        began = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            out, _ = proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate()
        said = [line for line in re.split(r"[\r\n]", out) if line.startswith(("Resuming", "Restarted", "checkpoints/"))]
        killed = f"killed after {wait:.1f} s" if wait else "to the end"
        print(
            f"start {start}: {killed}, ran {time.perf_counter() - began:.1f} s, exit {proc.returncode}: {said}",
            flush=True,
        )
    if proc.returncode != 0:
        sys.exit(f"the last start ended with exit {proc.returncode}:\n{out[-3000:]}")


if __name__ == "__main__":
    main()
