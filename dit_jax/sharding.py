"""Device mesh and parameter sharding.

The mesh has axes ('data', 'fsdp'): the batch is split over both, parameters over 'fsdp'
(replicated when fsdp = 1). The model names parameter axes logically ('embed', 'mlp',
'vocab'); rules map logical names to mesh axes and live in the config (`config.mesh.rules`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")

def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all); data=-1 takes what fsdp leaves.
    Devices of several slices (multi-slice TPU) are arranged as
    `mesh_utils.create_hybrid_device_mesh` does: 'data' spans the slices, 'fsdp' stays in one."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must be a positive divisor of the {n} devices.")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match the {n} devices.")
    slices = num_slices(devices)
    if slices > 1:
        # Data parallelism across slices (DCN), fsdp inside each slice (ICI).
        per_slice = n // slices
        if per_slice % fsdp or data % slices:
            raise ValueError(f"fsdp={fsdp} must divide the {per_slice} devices of one slice (the "
                             f"devices span {slices} slices; fsdp stays inside a slice).")
        grid = mesh_utils.create_hybrid_device_mesh(
            (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many slices (multi-slice TPU: `slice_index`) the devices span; 1 elsewhere."""
    return len({getattr(d, "slice_index", None) or 0 for d in devices})


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(MESH_AXES))


def logical_rules(config) -> tuple:
    """`config.mesh.rules` as flax wants them: (logical axis, mesh axis or tuple of axes) pairs
    (a config read back from JSON holds lists)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)


def param_shardings(abstract_variables, mesh: Mesh, rules: Sequence):
    """NamedShardings for a boxed (logically annotated) variable tree from `jax.eval_shape(init)`."""
    specs = nn.get_partition_spec(abstract_variables)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
    """jax.distributed.initialize when the run spans processes: explicit coordinator flags, a
    SLURM job with several tasks, a multi-host Cloud TPU slice, or JAX_COORDINATOR_ADDRESS.
    Returns whether it initialised."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return True
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
    tpu_hosts = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if slurm or tpu_hosts or env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
        return True
    return False
