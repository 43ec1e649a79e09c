"""Data parallelism over a device Mesh: the mesh, batch shardings, host→device prefetch, processes.

The mesh has two axes, `models` × `data`, over every device of every process. The train state
carries N models on a leading axis (`model_axis`) split over the `models` axis: as many model
groups as divide both N and the device count, so models on different devices need no gradient
all-reduce between them at all; the `data` axis splits each batch within a group, and XLA inserts
the gradient all-reduce that `jax.jit` needs. One model on D devices is a 1 × D mesh. Each process
hands over only the rows of a global batch its devices hold (`make_array_from_process_local_data`),
which is what lets the same code run on one CPU or across hosts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sda_jax.errors import InputError
from sda_jax.parallel import peers

MODELS_AXIS = "models"
DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Joins a multi-process run when launch.sh or SLURM describes one; a no-op otherwise.

    launch.sh exports SDA_COORDINATOR_ADDRESS, SDA_NUM_PROCESSES and SDA_PROCESS_ID; under SLURM
    with more than one task, JAX reads the SLURM_* variables itself. Must run before any other
    JAX call. Several processes also start the lost-peer watchdog (`peers`).
    """
    if os.environ.get("SDA_COORDINATOR_ADDRESS"):
        try:
            num_processes, process_id = int(os.environ["SDA_NUM_PROCESSES"]), int(os.environ["SDA_PROCESS_ID"])
        except (KeyError, ValueError):
            raise InputError(
                "SDA_COORDINATOR_ADDRESS is set: SDA_NUM_PROCESSES and SDA_PROCESS_ID must be integers too"
            ) from None
        jax.distributed.initialize(
            coordinator_address=os.environ["SDA_COORDINATOR_ADDRESS"], num_processes=num_processes, process_id=process_id,
            heartbeat_timeout_seconds=peers.jax_heartbeat_timeout_s(),
        )  # fmt: skip
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize(heartbeat_timeout_seconds=peers.jax_heartbeat_timeout_s())
    peers.start_watchdog()  # a lost or hung peer ends this process with one line (sda_jax/parallel/peers.py)


def make_mesh(num_models: int = 1) -> Mesh:
    """A (`models`, `data`) mesh over all devices (global across processes): as many model groups
    as divide both the model count and the device count, the rest of the devices splitting the batch.

    Auto axes: the compiler propagates shardings from the inputs (the gather of the embedding
    lookup included), instead of requiring them spelled out in every op's type.
    """
    groups = math.gcd(num_models, jax.device_count())
    return jax.make_mesh(
        (groups, jax.device_count() // groups), (MODELS_AXIS, DATA_AXIS), axis_types=(AxisType.Auto, AxisType.Auto)
    )


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch is split evenly over the devices of the `data` axis."""
    devices = mesh.shape[DATA_AXIS]
    if batch_size % devices:
        raise InputError(
            f"config key train.batch_size: {batch_size} does not divide by the {devices} devices "
            f"that split each batch; pick a multiple of {devices}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def fetch(tree: Any) -> Any:
    """Device arrays as host numpy, also those split over several processes' devices (models whose
    group lives on other hosts), which every process must then fetch."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def agree(value: str | None) -> str | None:
    """Process 0's `value` (a message, or None) on every process: what process 0 alone decided (a
    refused workdir, a time to checkpoint) made the decision of all, so that none waits alone."""
    if jax.process_count() == 1:
        return value
    data = np.zeros(4096, np.uint8)
    if value is not None:
        encoded = value.encode("utf-8")[: data.size - 1]
        data[0], data[1 : 1 + len(encoded)] = 1, np.frombuffer(encoded, np.uint8)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(agreed[1:]).rstrip(b"\0").decode("utf-8", "replace") if agreed[0] else None


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of every global batch that this process's devices hold (contiguous)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [batch_size if index[0].stop is None else index[0].stop for index in indices]
    return slice(min(starts), max(stops))


def abstract_batch(batch_size: int, length: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and sharding of a device batch of `length` tokens, for compiling ahead."""
    sharding = batch_sharding(mesh)
    matrix = lambda dtype: jax.ShapeDtypeStruct((batch_size, length), dtype, sharding=sharding)
    row = lambda dtype: jax.ShapeDtypeStruct((batch_size,), dtype, sharding=sharding)
    return {
        "input_ids": matrix(np.int32), "token_type_ids": matrix(np.int32), "attention_mask": matrix(np.int32),
        "labels": row(np.int32), "weights": row(np.float32),
    }  # fmt: skip


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's rows of a global host batch as one sharded global array per key."""
    sharding = batch_sharding(mesh)
    rows = process_rows(len(batch["weights"]), mesh)
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
