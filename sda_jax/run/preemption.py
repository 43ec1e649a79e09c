"""SIGTERM/SIGINT become a request to stop at the next safe step, not a lost run.

Schedulers send SIGTERM before they reclaim a machine; Ctrl-C sends SIGINT. While the guard is
active, either signal only sets a flag: the train loop checkpoints at its next log boundary and
exits cleanly. A second signal restores the default behaviour, so an impatient user can still
kill the process outright. SIGUSR1 does the same: it is what slurm/train.sbatch asks SLURM to send
(`--signal=USR1@...`) before the time limit, and exit 138 tells the script to requeue the job.

Once the processes have agreed to stop, SIGTERM is ignored until the process ends: it is already
doing what SIGTERM asks. Under `srun --kill-on-bad-exit` the first process to exit 138 or 143 makes
srun send SIGTERM to the others, which would otherwise die of it while they exit and turn the
step's status from 138 (requeue) into 143.
"""

from __future__ import annotations

import os
import signal
import types

import numpy as np
from jax.experimental import multihost_utils

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 138}  # the shell's 128 + signal number
# Why a signal came, as said under SLURM (the job's log then tells why the run stopped).
SLURM_REASONS = {
    signal.SIGTERM: "SLURM: a requeue, a preemption or scancel; a requeued job resumes from this checkpoint",
    signal.SIGUSR1: "SLURM's --signal: the time limit is near; slurm/train.sbatch requeues the job",
}


class PreemptionGuard:
    """Context manager: `received` is the first signal caught while active, else None."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.stopping = False  # every process agreed to stop: SIGTERM is ignored from then on
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, _frame: types.FrameType | None) -> None:
        self.received = signal.Signals(signum)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # the next signal acts as usual

    def __enter__(self) -> PreemptionGuard:  # noqa: PYI034 (typing.Self needs Python 3.11)
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.stopping and sig == signal.SIGTERM else handler)

    def should_stop(self, multi_process: bool) -> bool:
        """Whether any process was signalled; every process must call this at the same steps."""
        stop = self.received is not None
        if multi_process:
            stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
        if stop:
            self.stopping = True
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return stop


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; restarting resumes it."""

    def __init__(self, sig: signal.Signals, step: int):
        why = f" ({SLURM_REASONS[sig]})" if sig in SLURM_REASONS and "SLURM_JOB_ID" in os.environ else ""
        super().__init__(f"stopped by {sig.name} at step {step}; checkpoint saved, rerun the same command to resume{why}")
        self.exit_code = EXIT_CODES[sig]
