"""A lost or hung process of a multi-process run ends the others within ~30 s, with one line.

JAX's coordination service already notices a process that stops sending heartbeats, but it
reports it by aborting every other process with a C++ stack dump (`missed_heartbeat_callback`
cannot be replaced from Python: jaxlib 0.10 fails to pass it the status, std::bad_cast), and a
collective with a dead peer either raises a Gloo traceback (CPU) or may never return (GPU). So
each process runs a small watchdog beside the training thread:

- a beat thread writes a counter to the coordination service's key-value store every
  `BEAT_S` seconds (`sda/peers/<process>`) and reads everyone's;
- a judge thread, which needs nothing but the clock, ends the process with one line and
  `LOST_PEER_EXIT` when a peer's counter has not moved for `timeout_s()` seconds (SIGKILL, OOM,
  SIGSTOP, a frozen host, a network partition), or when the coordination service itself (on
  process 0) has not answered for that long. A process that ends normally (training done, or
  stopped by a signal after its checkpoint) writes "done" first, so waiting for it is not a loss.
  A process whose own judge was not scheduled for a while was frozen itself: that time does not
  count against its peers, and if it was nearly the timeout (its peers may have ended it, as they
  do from a beat read up to `BEAT_S` before the freeze) it says so in one line and ends, blaming
  no one.

The beat and judge are plain Python threads that need the GIL for microseconds every second or
two: a busy healthy run keeps beating (XLA computations and compilations, checkpoint writes and a
key-value call blocked on a frozen coordinator all run without the GIL; nothing in a healthy run
holds it for seconds). JAX's own heartbeat timeout (`JAX_HEARTBEAT_TIMEOUT_S`) stays as a backstop well
beyond ours, so that the one-line ending comes first. `os._exit` skips JAX's shutdown barrier,
which would otherwise wait for the lost peer until that backstop and then abort with stack dumps.
A checkpoint that a lost peer left half-written has no manifest (checkpoints.py) and is never
taken for a whole one: a resubmission resumes from the last complete one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time

BEAT_S = 2.0
JUDGE_S = 1.0
DEFAULT_TIMEOUT_S = 30.0
# jax.distributed.initialize(heartbeat_timeout_seconds=...), JAX's default 100: a backstop only. Its
# service declares a silent task lost after 0.6-0.8 of it (measured with jaxlib 0.10.2: 7.8 s of 10,
# 29-40 s of 50), so it stays at least twice ours plus 30 s, for the one line to come first.
JAX_HEARTBEAT_TIMEOUT_S = 90
LOST_PEER_EXIT = 5
_PREFIX = "sda/peers/"


def timeout_s() -> float:
    """Seconds without a beat after which a peer is lost: $SDA_PEER_TIMEOUT_S, else 30."""
    return float(os.environ.get("SDA_PEER_TIMEOUT_S") or DEFAULT_TIMEOUT_S)


def jax_heartbeat_timeout_s() -> int:
    """JAX's own heartbeat timeout, the backstop: at least twice ours plus 30 s."""
    return max(JAX_HEARTBEAT_TIMEOUT_S, int(2 * timeout_s()) + 30)


class Watchdog:
    """Beats for this process and ends it when a peer stops beating; see the module docstring."""

    def __init__(self, client, process_id: int, num_processes: int, timeout: float):
        self.client, self.process_id, self.num_processes, self.timeout = client, process_id, num_processes, timeout
        self.seen: dict[int, tuple[str, float]] = {}  # process -> (its last value, when it changed, by our clock)
        self.call_started: float | None = None  # when the beat thread's current call to the service began
        self.last_answer = time.monotonic()
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def start(self) -> None:
        now = time.monotonic()
        self.seen = {p: ("", now) for p in range(self.num_processes) if p != self.process_id}
        threading.Thread(target=self._beat, name="sda-peers-beat", daemon=True).start()
        threading.Thread(target=self._judge, name="sda-peers-judge", daemon=True).start()
        atexit.register(self.finish)  # runs before JAX's shutdown barrier (registered when jax was imported)

    def finish(self) -> None:
        """Says this process ended normally, so that peers still at work do not count it as lost."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        with contextlib.suppress(Exception):  # the service may be gone already: nothing to tell
            self.client.key_value_set(f"{_PREFIX}{self.process_id}", "done", allow_overwrite=True)

    def _beat(self) -> None:
        count = 0
        while not self.stopped.is_set():
            count += 1
            try:
                self.call_started = time.monotonic()
                self.client.key_value_set(f"{_PREFIX}{self.process_id}", str(count), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(_PREFIX))
                self.call_started = None
                with self.lock:
                    self.last_answer = now = time.monotonic()
                    for key, value in values.items():
                        process = int(key.rsplit("/", 1)[1])
                        if process in self.seen and self.seen[process][0] != value:
                            self.seen[process] = (value, now)
            except Exception:  # noqa: BLE001 (an unreachable service: the judge decides from last_answer)
                self.call_started = None
            self.stopped.wait(BEAT_S)

    def _judge(self) -> None:
        tick = time.monotonic()
        while not self.stopped.wait(JUDGE_S):
            now = time.monotonic()
            self.judge(now, unscheduled=now - tick)
            tick = now

    def judge(self, now: float, unscheduled: float) -> None:
        """Ends this process if a peer is lost or if it was frozen itself for about as long as its
        peers wait; `unscheduled` is the time since the judge last ran (JUDGE_S when all is well)."""
        # Frozen itself (SIGSTOP, a hung host) for about the timeout: its peers may have ended. Never
        # less than three of the judge's own ticks, so that a short $SDA_PEER_TIMEOUT_S stays usable.
        if unscheduled > max(self.timeout - 2 * BEAT_S, 3 * JUDGE_S):
            end_frozen(unscheduled, self.process_id, self.num_processes, self.timeout)
        if unscheduled > 2 * JUDGE_S:  # frozen itself for a while: its own silence, not its peers'
            shifted = lambda when: min(now, when + unscheduled - JUDGE_S)  # noqa: E731
            with self.lock:
                self.last_answer = shifted(self.last_answer)
                self.seen = {p: (value, shifted(changed)) for p, (value, changed) in self.seen.items()}
        lost = self.lost(now)
        if lost is not None and not self.stopped.is_set():
            end_lost(lost, self.process_id, self.num_processes, self.timeout)

    def lost(self, now: float) -> int | None:
        """The lost process, if any: the service's host (0) if it has not answered for the timeout,
        else the lowest-numbered peer whose counter has not moved for the timeout (not one that is done)."""
        with self.lock:
            if now - self.last_answer > self.timeout:
                return 0
            for process, (value, changed) in sorted(self.seen.items()):
                if value != "done" and now - changed > self.timeout:
                    return process
        return None


def end_lost(lost: int, process_id: int, num_processes: int, timeout: float) -> None:
    """The one line, then the exit: no traceback, no shutdown barrier, no checkpoint."""
    what = "the coordinator, process 0," if lost == 0 and process_id != 0 else f"process {lost}"
    print(
        f"\nerror: lost {what} of {num_processes}: no heartbeat for {timeout:.0f} s (it died, hung, or its host is cut "
        f"off); process {process_id} ends too. Resubmit: the run resumes from its last complete checkpoint.",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    os._exit(LOST_PEER_EXIT)


def end_frozen(seconds: float, process_id: int, num_processes: int, timeout: float) -> None:
    """The one line of a process that was itself frozen about as long as its peers wait, then the exit."""
    print(
        f"\nerror: process {process_id} of {num_processes} was frozen for {seconds:.0f} s (SIGSTOP, a hung host or a "
        f"network partition), about as long as its peers wait ({timeout:.0f} s): they end, and so does it.",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    os._exit(LOST_PEER_EXIT)


_watchdog: Watchdog | None = None


def start_watchdog() -> None:
    """Starts the watchdog of this process if it is one of several (after jax.distributed.initialize)."""
    global _watchdog
    from jax._src import distributed

    state = distributed.global_state
    if state.client is None or state.num_processes < 2 or _watchdog is not None:
        return
    _watchdog = Watchdog(state.client, state.process_id, state.num_processes, timeout_s())
    _watchdog.start()


# What a collective with a dead peer raises (a JaxRuntimeError, or a ValueError: "UNKNOWN: Gloo
# AllGather failed: ... Connection reset by peer"); on GPUs NCCL's errors and the coordination
# service's deadlines.
_COLLECTIVE_ERRORS = ("gloo", "nccl", "connection reset", "connection closed", "unavailable", "deadline_exceeded")


def collective_failed(err: BaseException) -> bool:
    """Whether `err` looks like a collective that lost a peer (then `await_verdict`, not a traceback)."""
    return _watchdog is not None and any(word in str(err).lower() for word in _COLLECTIVE_ERRORS)


def await_verdict(err: BaseException) -> None:
    """After a collective failed in a multi-process run (a Gloo 'connection closed by peer', say):
    waits for the watchdog to name the lost process and end this one; if none is lost after the
    timeout, the failure was something else and ends the process with its first line."""
    if _watchdog is None:
        return
    deadline = time.monotonic() + _watchdog.timeout + 2 * BEAT_S + 2
    while time.monotonic() < deadline:
        time.sleep(0.5)  # the judge thread ends the process from under this loop
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"error: a collective failed and no peer was lost: {first}", file=sys.stderr, flush=True)
    os._exit(LOST_PEER_EXIT)
