"""The preemption guard: a signal becomes a stop at the next checkpoint, and once every process has
agreed to stop, SIGTERM (what srun sends the other tasks when the first one exits 138) is ignored
until the process ends, so that it exits with its own code."""

from __future__ import annotations

import os
import signal

from sda_jax.run.preemption import PreemptionGuard


def test_a_signal_is_a_stop_and_sigterm_is_ignored_once_stopping():
    before = signal.getsignal(signal.SIGTERM)
    try:
        with PreemptionGuard() as guard:
            assert not guard.should_stop(multi_process=False)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.received == signal.SIGUSR1
            # Between the signal and the stop, a second signal acts as usual (an impatient user).
            assert signal.getsignal(signal.SIGTERM) == before
            assert guard.should_stop(multi_process=False)
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test process lives on
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # and stays so until the process ends
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.received == signal.SIGUSR1
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_run_that_was_not_stopped_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGTERM) != before
        assert not guard.should_stop(multi_process=False)
    assert signal.getsignal(signal.SIGTERM) == before
