"""Data parallelism over a device Mesh: shardings, batch placement and host→device prefetch.

One mesh axis, `data`, spans every device of every process. Batches are split along it; the
train state is replicated, and XLA inserts the gradient all-reduce that `jax.jit` needs. Each
process hands over only its own rows of a global batch (`make_array_from_process_local_data`),
which is what lets the same code run on one CPU or across hosts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sda_jax.errors import InputError

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Joins a multi-process run when launch.sh or SLURM describes one; a no-op otherwise.

    launch.sh exports SDA_COORDINATOR_ADDRESS, SDA_NUM_PROCESSES and SDA_PROCESS_ID; under SLURM
    with more than one task, JAX reads the SLURM_* variables itself. Must run before any other
    JAX call.
    """
    if os.environ.get("SDA_COORDINATOR_ADDRESS"):
        try:
            num_processes, process_id = int(os.environ["SDA_NUM_PROCESSES"]), int(os.environ["SDA_PROCESS_ID"])
        except (KeyError, ValueError):
            raise InputError(
                "SDA_COORDINATOR_ADDRESS is set: SDA_NUM_PROCESSES and SDA_PROCESS_ID must be integers too"
            ) from None
        jax.distributed.initialize(
            coordinator_address=os.environ["SDA_COORDINATOR_ADDRESS"], num_processes=num_processes, process_id=process_id
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (global across processes).

    Auto axis: the compiler propagates shardings from the inputs (the gather of the embedding
    lookup included), instead of requiring them spelled out in every op's type.
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch is split evenly over devices, and each process feeds whole rows."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise InputError(
            f"config key train.batch_size: {batch_size} does not divide by the {devices} devices "
            f"in use; pick a multiple of {devices}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def process_rows(batch_size: int) -> slice:
    """This process's contiguous share of the rows of every global batch."""
    per_process = batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's rows of a global host batch as one sharded global array per key."""
    sharding = batch_sharding(mesh)
    rows = process_rows(len(batch["weights"]))
    return {
        key: jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
        for key, value in batch.items()
    }


def prefetch_to_mesh(batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, depth: int = 2) -> Iterator[Any]:
    """Prepares and transfers the next `depth` batches in a thread while the device runs a step.

    Yields (host_batch, device_batch) pairs; the host batch's metadata (shape, weights) stays
    readable without a device sync.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:

        def prepare():
            host = next(batches, None)
            return None if host is None else (host, put_global_batch(host, mesh))

        pending = collections.deque(pool.submit(prepare) for _ in range(depth))
        while True:
            item = pending.popleft().result()
            if item is None:
                return
            pending.append(pool.submit(prepare))
            yield item
