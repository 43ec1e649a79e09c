"""Resuming on another allocation: a checkpoint written by N processes (D devices) read by M.

A requeued SLURM job may get other hosts, fewer of them or fewer GPUs. The train state is saved
whole (orbax, each array in full), and the batch order and dropout keys depend on the step and
the seeds alone, so any device count resumes the same run; but the gradient of each step is a
sum over the devices' shares of the batch, added in another order on another device count, so
the result matches an uninterrupted run to rounding, not bit for bit. `note` is the one line a
resumed run prints when that is so; the checkpoint's `position` records what wrote it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any


def written_by(devices: int, processes: int) -> dict[str, Any]:
    """What a train checkpoint's position records of the allocation that wrote it."""
    return {"devices": devices, "processes": processes}


def note(step_dir: pathlib.Path, devices: int, processes: int) -> str | None:
    """One line if the checkpoint in `step_dir` was written on another device count, else None
    (the same count, or a checkpoint from before positions recorded it)."""
    try:
        position = json.loads((step_dir / "position" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    then_devices, then_processes = position.get("devices"), position.get("processes")
    if then_devices is None or then_devices == devices:
        return None
    return (
        f"note: the checkpoint of step {position.get('step')} was written on {then_devices} devices "
        f"({then_processes} processes) and resumes on {devices} ({processes}): the same run up to the order in which "
        "the devices' gradients are summed, not bit-identical to an uninterrupted run (resume on "
        f"{then_devices} devices for that)"
    )
