"""Where a run's wall time goes: named phases, timed with `with stopwatch.phase(name):`.

The summary and the benchmark report these phases (startup, data, model, compile, train loop,
evaluation, prediction, checkpointing), so that a slow run says what it was slow at. Nested
phases are subtracted from the enclosing one, so the phases add up to the wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Stopwatch:
    """Seconds per phase since `start` (a `time.perf_counter()` reading, default now)."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}
        self._open: list[list] = []  # per open phase: [name, start, seconds its nested phases took]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        self._open.append([name, began, 0.0])
        try:
            yield
        finally:
            _, _, nested = self._open.pop()
            spent = time.perf_counter() - began
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - nested
            if self._open:
                self._open[-1][2] += spent

    def add(self, name: str, seconds: float) -> None:
        """Counts `seconds` measured elsewhere (e.g. compiling inside a step call) towards `name`,
        and takes them off the phase that is open now."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self._open:
            self._open[-1][2] += seconds

    def wall(self) -> float:
        return time.perf_counter() - self.start

    def breakdown(self) -> dict[str, float]:
        """Every phase's seconds (an open one's so far), plus `other` (the rest of the wall time) and `wall`."""
        now = time.perf_counter()
        seconds = dict(self.seconds)
        inner = 0.0  # what the phases opened inside an open phase took
        for name, began, nested in reversed(self._open):
            own = now - began - nested - inner
            seconds[name] = seconds.get(name, 0.0) + own
            inner = now - began
        wall = now - self.start
        return {**seconds, "other": max(wall - sum(seconds.values()), 0.0), "wall": wall}


def format_phases(seconds: dict[str, float]) -> str:
    """'startup 2.3, data 0.7, ...': a breakdown's phases of 0.05 s or more (its `wall` left out)."""
    return ", ".join(f"{name} {value:.1f}" for name, value in seconds.items() if name != "wall" and value >= 0.05)
