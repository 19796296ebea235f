"""Device mesh and the shardings of batches and parameters.

We build meshes with `AxisType.Auto` axes (the classic GSPMD mode), not jax 0.10's default
Explicit axes: the model code stays free of sharding annotations and XLA propagates shardings
from the explicit `in_shardings`/`out_shardings` of the jitted step. The only place that needs
per-device control, the global-batch contrastive loss, uses `jax.shard_map` explicitly.

Mesh axes: `data` (pure data parallel) and `fsdp` (data parallel whose devices also shard the
parameters). The batch is always sharded over both axes together.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def create_mesh(data: int = -1, fsdp: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D (`data`, `fsdp`) mesh over `devices` (default: every device of every process).

    One of `data` / `fsdp` may be -1, meaning "all remaining devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} available "
                         f"devices")
    try:
        # Topology-aware device order on TPU/GPU slices; falls back below on odd device sets.
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS),
                axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (those of BATCH_AXES the mesh has)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every data-parallel axis, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def state_shardings(mesh: Mesh, abstract_state):
    """Sharding of every train-state leaf. Parameters and optimizer state are replicated over
    the mesh (pure data parallelism)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
