"""Ahead-of-time compilation of a jitted function once per bucket shape, counted, timed, concurrent.

Host-side bucketing guarantees batches come in a handful of padded shapes; this wrapper makes the
consequence visible: it compiles each shape explicitly once, reports how many programs exist and
how long compiling took, and never lets a stray shape recompile silently. `compile_concurrently`
compiles a run's programs up front on threads (XLA compiles outside the GIL), so the wall time
is about the slowest program's rather than the sum.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sda_jax.stopwatch import Stopwatch


class BucketedJit:
    """Calls `jitted(*args)` through one compiled executable per distinct `key(*args)`.

    A compilation that happens on a call (a shape `precompile` did not see) is added to the
    `stopwatch`'s "compile" phase, if one is given, and taken off whatever phase is running.
    """

    def __init__(self, jitted: Any, key: Callable[..., tuple], stopwatch: Stopwatch | None = None):
        self._jitted = jitted
        self._key = key
        self._stopwatch = stopwatch
        self._executables: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.compile_seconds = 0.0  # summed over programs (CPU-side work, whatever ran in parallel)

    @property
    def jitted(self) -> Any:
        """The `jax.jit` function it compiles, for inspection (lowering, the optimized HLO)."""
        return self._jitted

    @property
    def num_compilations(self) -> int:
        return len(self._executables)

    def precompile(self, *args) -> float:
        """Compiles for these arguments (concrete or `jax.ShapeDtypeStruct`s) unless done; returns the seconds."""
        key = self._key(*args)
        if key in self._executables:
            return 0.0
        start = time.perf_counter()
        executable = self._jitted.lower(*args).compile()
        seconds = time.perf_counter() - start
        with self._lock:
            if key not in self._executables:
                self._executables[key] = executable
                self.compile_seconds += seconds
        return seconds

    def __call__(self, *args):
        executable = self._executables.get(self._key(*args))
        if executable is None:
            seconds = self.precompile(*args)
            if self._stopwatch is not None:
                self._stopwatch.add("compile", seconds)
            executable = self._executables[self._key(*args)]
        return executable(*args)


def compile_concurrently(tasks: Sequence[tuple[BucketedJit, tuple]], max_workers: int | None = None) -> float:
    """Compiles every (function, arguments) pair on a thread pool; returns the wall seconds."""
    start = time.perf_counter()
    workers = max_workers or min(len(tasks), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(fn.precompile, *args) for fn, args in tasks]:
            future.result()
    return time.perf_counter() - start


def batch_shape_key(*args) -> tuple:
    """The key of train/eval steps: the padded (rows, length) of the batch argument's input ids."""
    batch = next(arg for arg in args if isinstance(arg, dict) and "input_ids" in arg)
    return tuple(batch["input_ids"].shape)
