"""Device mesh and parameter sharding.

The mesh has axes ('data', 'fsdp'): the batch is split over both, parameters over 'fsdp'
(replicated when fsdp = 1). The model names parameter axes logically ('embed', 'mlp',
'vocab'); rules map logical names to mesh axes and live in the config (`config.mesh.rules`).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")


def make_mesh(
    data: int = -1, fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None
) -> Mesh:
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
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match the {n} devices."
        )
    slices = num_slices(devices)
    if slices > 1:
        # Data parallelism across slices (DCN), fsdp inside each slice (ICI).
        per_slice = n // slices
        if per_slice % fsdp or data % slices:
            raise ValueError(
                f"fsdp={fsdp} must divide the {per_slice} devices of one slice (the "
                f"devices span {slices} slices; fsdp stays inside a slice)."
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True
        )
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


#: JAX's port for Cloud TPU coordinators (process 0 of the slice listens on it).
TPU_COORDINATOR_PORT = 8482
_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def gce_metadata(key: str, timeout: float = 2.0) -> Optional[str]:
    """A GCE metadata attribute of this VM, or None when there is none (or no metadata server)."""
    import urllib.request

    request = urllib.request.Request(_METADATA_URL + key, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except OSError:
        return None


def _on_tpu_vm() -> bool:
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def tpu_slice_from_metadata(get_metadata: Callable[[str], Optional[str]]) -> Optional[dict]:
    """{coordinator_address, num_processes, process_id} of a multi-host Cloud TPU slice, read the
    way TPU VMs provide it (as jax's cloud_tpu_cluster does): the worker list from the metadata
    attribute `worker-network-endpoints` (hostnames, or name:id:ip triples; sorted by worker id),
    this worker from `agent-worker-number` or WORKER_ID in `tpu-env`. None on one host."""
    endpoints = get_metadata("worker-network-endpoints")
    if not endpoints:
        return None
    hosts = []
    for worker in endpoints.strip().split(","):
        parts = worker.strip().split(":")
        if len(parts) not in (1, 3):
            raise ValueError(f"unsupported worker-network-endpoints entry {worker!r}")
        hosts.append(parts[-1])
    if len(hosts) < 2:
        return None
    worker = get_metadata("agent-worker-number")
    if worker is None or not worker.strip().isdigit():
        for line in (get_metadata("tpu-env") or "").splitlines():  # lines like WORKER_ID: '1'
            key, _, value = line.partition(":")
            if key.strip() == "WORKER_ID":
                worker = value.strip().strip("'\"")
    if worker is None or not worker.strip().isdigit():
        raise ValueError(
            "a multi-host TPU slice whose metadata names no worker id "
            "(agent-worker-number, tpu-env WORKER_ID)"
        )
    return {
        "coordinator_address": f"{hosts[0]}:{TPU_COORDINATOR_PORT}",
        "num_processes": len(hosts),
        "process_id": int(worker),
    }


def distributed_settings(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    env=None,
    get_metadata=None,
    on_tpu_vm=None,
) -> Optional[dict]:
    """The arguments of jax.distributed.initialize for this run, {} to let jax detect them, or
    None for a single-process run. In order: explicit flags; JAX_COORDINATOR_ADDRESS with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (what launch.local sets); a SLURM job with several tasks
    or TPU_WORKER_HOSTNAMES listing several hosts (jax detects them); a Cloud TPU VM whose
    metadata lists several workers. `env`, `get_metadata` and `on_tpu_vm` are injectable."""
    env = os.environ if env is None else env
    number = lambda k: int(env[k]) if env.get(k, "").strip() else None
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator_address:
        n = num_processes if num_processes is not None else number("JAX_NUM_PROCESSES")
        i = process_id if process_id is not None else number("JAX_PROCESS_ID")
        return {
            k: v
            for k, v in (
                ("coordinator_address", coordinator_address),
                ("num_processes", n),
                ("process_id", i),
            )
            if v is not None
        }
    slurm = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
    tpu_hosts = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if slurm or tpu_hosts:
        return {}
    if (on_tpu_vm or _on_tpu_vm)():
        return tpu_slice_from_metadata(get_metadata or gce_metadata)
    return None


def wait_for_coordinator(address: str, timeout: float, what: str = "this process") -> None:
    """Returns once `address` (host:port) accepts connections; ConnectionError (one line) if it
    does not within `timeout` seconds. jax's own connect would abort the process instead."""
    import socket

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"{what} cannot reach the coordinator at {address} within {timeout:.0f}s "
                    f"({e.strerror or e}); is process 0 running and the address right?"
                ) from None
            time.sleep(0.25)


def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
    """jax.distributed.initialize when the run spans processes (see `distributed_settings`).
    A process other than 0 first waits for the coordinator for DIT_JAX_COORDINATOR_TIMEOUT
    seconds (default 300) and fails with one line if it never answers. Returns whether it
    initialised."""
    settings = distributed_settings(coordinator_address, num_processes, process_id)
    if settings is None:
        return False
    timeout = float(os.environ.get("DIT_JAX_COORDINATOR_TIMEOUT", "300"))
    if settings.get("coordinator_address") and settings.get("process_id", 0) != 0:
        n = settings.get("num_processes")
        wait_for_coordinator(
            settings["coordinator_address"],
            timeout,
            f"process {settings['process_id']}" + (f" of {n}" if n else ""),
        )
    jax.distributed.initialize(**settings, initialization_timeout=max(int(timeout), 1))
    return True
