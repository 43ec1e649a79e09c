"""Ahead-of-time compilation of a jitted function once per bucket shape, counted and timed.

Host-side bucketing guarantees batches come in a handful of padded shapes; this wrapper makes the
consequence visible: it compiles each shape explicitly once, reports how many programs exist and
how long compiling took, and never lets a stray shape recompile silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class BucketedJit:
    """Calls `jitted(*args)` through one compiled executable per distinct `key(*args)`."""

    def __init__(self, jitted: Any, key: Callable[..., tuple]):
        self._jitted = jitted
        self._key = key
        self._executables: dict[tuple, Any] = {}
        self.compile_seconds = 0.0

    @property
    def num_compilations(self) -> int:
        return len(self._executables)

    def __call__(self, *args):
        key = self._key(*args)
        executable = self._executables.get(key)
        if executable is None:
            start = time.perf_counter()
            executable = self._jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            self._executables[key] = executable
        return executable(*args)


def batch_shape_key(*args) -> tuple:
    """The key of train/eval steps: the padded (rows, length) of the batch argument's input ids."""
    batch = next(arg for arg in args if isinstance(arg, dict) and "input_ids" in arg)
    return tuple(batch["input_ids"].shape)
