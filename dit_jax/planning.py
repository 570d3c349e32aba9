"""Plan a pod before paying for it: the real train step (and the sampling loop) compiled ahead
of time for a TPU topology or a GPU node on any machine, CPU included, with what the compiler
says about it.

The program compiled is the very one training runs: `train.train_state_shardings` and
`train.jit_train_step` under the config's logical-axis rules, the state donated, the global
batch split over the ('data', 'fsdp') mesh as `sharding.batch_sharding` splits it. Nothing
runs: the devices are libtpu's (TPU) or the CUDA plugin's (GPU, from a GpuTargetConfigProto
built from `GPUS`) compile-only description of the topology.

Every time and throughput figure here is an estimate, not a measurement: XLA's cost model
(`optimal_seconds`) where it gives one (TPU), else a roofline bound (XLA's flops at the chip's
peak, XLA's bytes at its memory bandwidth, whichever is slower): on GPU, where a compile-only
executable has no cost analysis, and on TPU programs libtpu's cost model gives up on.
XLA's cost analysis counts a loop body once, so for `model.scan_blocks` the flops and the time
come from the looped program at depth 1 and 2, extrapolated to the model's depth. Memory
figures are the compiler's buffer assignment for one chip.

  plan = planning.plan_train(config, "v5p-8")          # one configuration
  best, plans = planning.search(config, "v5e-16")      # fsdp x remat x scan x attention
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import itertools
import math
import os
import re
import shutil
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from dit_jax import flops, models, sampling, sharding, train
from dit_jax import workdir as workdir_lib

GIB = 2**30
F, T = False, True

# ----------------------------------------------------------------------------------------
# Topologies: names as users type them -> what libtpu's topology description needs
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
    """One accelerator generation: how its slice names map to libtpu's topology description."""

    platform: str  # 'tpu'
    prefix: str  # libtpu's topology name prefix ('v5' in 'v5:2x2x1')
    chip_config: str  # 'megacore' (v4, v5p: one device per chip) or 'default'
    cores_per_chip: int  # what one unit of the name counts: v4/v5p names count TensorCores
    hbm_bytes: int  # HBM per chip (vendor figure)
    hbm_bandwidth: float  # bytes/s per chip (vendor figure; the roofline fallback)
    device_kind: str  # key into flops.PEAK_FLOPS
    slices: dict  # chips -> (topology shape, chips-per-host bounds, wraparound)


def _cube(shape, host=(2, 2, 1)):
    return shape, host, (T, T, T) if min(shape) >= 4 else (F, F, F)


_CUBES = {
    4: _cube((2, 2, 1)),
    8: _cube((2, 2, 2)),
    16: _cube((2, 2, 4)),
    32: _cube((2, 4, 4)),
    64: _cube((4, 4, 4)),
    128: _cube((4, 4, 8)),
    256: _cube((4, 8, 8)),
    512: _cube((8, 8, 8)),
    1024: _cube((8, 8, 16)),
    2048: _cube((8, 16, 16)),
    4096: _cube((16, 16, 16)),
}
_PLANES = {
    1: ((1, 1), (1, 1, 1), (F, F, F)),
    4: ((2, 2), (2, 2, 1), (F, F, F)),
    8: ((2, 4), (2, 4, 1), (F, F, F)),
    16: ((4, 4), (2, 2, 1), (F, F, F)),
    32: ((4, 8), (2, 2, 1), (F, F, F)),
    64: ((8, 8), (2, 2, 1), (F, F, F)),
    128: ((8, 16), (2, 2, 1), (F, F, F)),
    256: ((16, 16), (2, 2, 1), (T, T, F)),
}

#: THE table: generation (as typed in slice names) -> everything a topology needs.
GENERATIONS = {
    "v4": Generation(
        "tpu",
        "v4",
        "megacore",
        2,
        32 * GIB,
        1.2e12,
        "TPU v4",
        {k: v for k, v in _CUBES.items() if k <= 2048},
    ),
    "v5p": Generation("tpu", "v5", "megacore", 2, 95 * GIB, 2.765e12, "TPU v5p", _CUBES),
    "v5e": Generation("tpu", "v5e", "default", 1, 16 * GIB, 8.19e11, "TPU v5e", _PLANES),
    "v6e": Generation("tpu", "v6e", "default", 1, 32 * GIB, 1.64e12, "TPU v6e", _PLANES),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
_NAME = re.compile(r"^(?:(\d+)x)?([a-z0-9]+)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model as XLA's compiler needs to see it (the essentials of its
    GpuTargetConfigProto: what the device reports about itself)."""

    description: str  # the device's name, e.g. 'NVIDIA H100 80GB HBM3'
    memory_bytes: int  # device memory the driver reports
    memory_bandwidth: float  # bytes/s
    l2_cache_bytes: int
    core_count: int  # streaming multiprocessors
    clock_ghz: float
    compute_capability: tuple  # (major, minor)
    device_kind: str  # key into flops.PEAK_FLOPS


#: GPU nodes plan-able by name: '<gpu>x<gpus per node>', several nodes as '4xh100x8'.
GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 84_942_979_072, 3.35232e12, 50 * 2**20, 132, 1.98,
                (9, 0), "NVIDIA H100"),
    "h200": Gpu("NVIDIA H200 141GB HBM3e", 151_397_597_184, 4.8e12, 50 * 2**20, 132, 1.98,
                (9, 0), "NVIDIA H200"),
}  # fmt: skip
_GPU_NAME = re.compile(r"^(?:(\d+)x)?([a-z0-9]+)x(\d+)$")


def gpu_target_config(gpu: Gpu) -> str:
    """The GpuTargetConfigProto (text format) XLA compiles for, from `gpu`'s figures and the
    limits every CUDA GPU since Volta shares."""
    major, minor = gpu.compute_capability
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: {gpu.core_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.memory_bandwidth)}
  l2_cache_size: {gpu.l2_cache_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{gpu.description}"
"""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. '2xv5p-128'
    generation: str  # 'v5p'
    num_slices: int
    chips_per_slice: int
    topology_name: str  # libtpu's, e.g. 'v5:4x4x4'
    chip_config: str
    host_bounds: tuple
    wrap: tuple
    hbm_bytes: int
    peak_flops: Optional[float]
    platform: str = "tpu"  # or 'cuda'
    memory_bandwidth: Optional[float] = None  # bytes/s per chip (the roofline bound)
    target_config: str = ""  # GPU: the GpuTargetConfigProto text

    @property
    def num_devices(self) -> int:
        return self.num_slices * self.chips_per_slice


def valid_forms() -> str:
    parts = []
    for gen, g in GENERATIONS.items():
        sizes = sorted(c * g.cores_per_chip for c in g.slices)
        parts.append(f"{gen}-{{{','.join(str(s) for s in sizes)}}}")
    return (
        "valid topologies: " + "; ".join(parts) + " (v5e is also spelt v5litepod; v4/v5p "
        "count TensorCores, 2 per chip); several slices as Nx<slice>, e.g. 2xv5p-128; GPU nodes "
        f"as <gpu>x<1-8>, <gpu> one of {', '.join(GPUS)}, several nodes as Nx<node>, e.g. "
        "4xh100x8"
    )


def _parse_gpu_topology(name: str) -> Optional[Topology]:
    m = _GPU_NAME.match((name or "").strip().lower())
    if not m or m.group(2) not in GPUS:
        return None
    gpu = GPUS[m.group(2)]
    nodes, per_node = int(m.group(1) or 1), int(m.group(3))
    if nodes < 1 or not 1 <= per_node <= 8:
        raise ValueError(f"unknown topology {name!r}; {valid_forms()}.")
    return Topology(
        name=name,
        generation=m.group(2),
        num_slices=nodes,
        chips_per_slice=per_node,
        topology_name=f"1x{nodes}x{per_node}",  # slices x hosts x GPUs per host
        chip_config="",
        host_bounds=(),
        wrap=(),
        hbm_bytes=gpu.memory_bytes,
        peak_flops=flops.PEAK_FLOPS.get(gpu.device_kind),
        platform="cuda",
        memory_bandwidth=gpu.memory_bandwidth,
        target_config=gpu_target_config(gpu),
    )


def parse_topology(name: str) -> Topology:
    """'v5p-8' (4 chips), 'v5e-16', 'v5litepod-16', '2xv5p-128', 'h100x8', '4xh200x8' -> a
    Topology. ValueError (listing the valid forms) for anything else."""
    gpu = _parse_gpu_topology(name)
    if gpu is not None:
        return gpu
    m = _NAME.match((name or "").strip().lower())
    gen = ALIASES.get(m.group(2), m.group(2)) if m else None
    if not m or gen not in GENERATIONS:
        raise ValueError(f"unknown topology {name!r}; {valid_forms()}.")
    g = GENERATIONS[gen]
    slices, units = int(m.group(1) or 1), int(m.group(3))
    chips = units // g.cores_per_chip
    if slices < 1 or units % g.cores_per_chip or chips not in g.slices:
        raise ValueError(f"unknown topology {name!r}; {valid_forms()}.")
    shape, host, wrap = g.slices[chips]
    host = tuple(min(h, s) for h, s in zip(host, shape + (1,) * (3 - len(shape))))
    return Topology(
        name=name,
        generation=gen,
        num_slices=slices,
        chips_per_slice=chips,
        topology_name=f"{g.prefix}:{'x'.join(map(str, shape))}",
        chip_config=g.chip_config,
        host_bounds=host,
        wrap=wrap,
        hbm_bytes=g.hbm_bytes,
        peak_flops=flops.PEAK_FLOPS.get(g.device_kind),
        platform=g.platform,
        memory_bandwidth=g.hbm_bandwidth,
    )


@functools.lru_cache(maxsize=None)
def _topology_devices(topology_name, chip_config, host_bounds, num_slices, wrap):
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences a libtpu warning
    # Compile-only: no chip is opened, so plans may run beside each other (and beside a job).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology_name,
        chip_config_name=chip_config,
        chips_per_host_bounds=host_bounds,
        num_slices=num_slices,
        wrap=wrap,
    )
    return tuple(desc.devices)


@functools.lru_cache(maxsize=None)
def _gpu_devices(topology: str, target_config: str):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver, no GPU: fine
    desc = topologies.get_topology_desc(
        platform="cuda", topology_name="", target_config=target_config, topology=topology
    )
    return tuple(desc.devices)


def _find_ptxas() -> Optional[str]:
    """ptxas on PATH, else the one the nvidia-cuda-nvcc-cu12 wheel ships (added to PATH, where
    XLA looks for it)."""
    found = shutil.which("ptxas")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia.cuda_nvcc") if _has_module("nvidia") else None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "bin", "ptxas")
        if os.access(path, os.X_OK):
            os.environ["PATH"] = os.path.dirname(path) + os.pathsep + os.environ.get("PATH", "")
            return path
    return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def topology_devices(topology: Topology) -> list:
    """The compile-only devices of the topology (slice by slice, node by node)."""
    if topology.platform == "cuda":
        if not _has_module("jax_plugins.xla_cuda12"):
            raise ValueError(
                f"cannot compile for {topology.name} here: the CUDA plugin is not installed "
                "(pip install -e '.[plan-gpu]'; it needs no GPU)."
            )
        if _find_ptxas() is None:
            raise ValueError(
                f"cannot compile for {topology.name} here: no ptxas (pip install "
                "nvidia-cuda-nvcc-cu12, or put CUDA's bin directory on PATH)."
            )
        try:
            return list(_gpu_devices(topology.topology_name, topology.target_config))
        except RuntimeError as e:
            raise ValueError(
                f"the CUDA plugin cannot describe {topology.name}: " + " ".join(str(e).split())
            ) from None
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"cannot compile for {topology.name} here: libtpu is not installed "
            "(pip install 'jax[tpu]'; it needs no TPU)."
        )
    try:
        return list(
            _topology_devices(
                topology.topology_name,
                topology.chip_config,
                topology.host_bounds,
                topology.num_slices,
                topology.wrap,
            )
        )
    except RuntimeError as e:  # XlaRuntimeError
        raise ValueError(
            f"libtpu cannot describe {topology.name} ({topology.topology_name}): "
            + " ".join(str(e).split())
        ) from None


# ----------------------------------------------------------------------------------------
# What a compiled program says
# ----------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SIZE = re.compile(r"([\d.]+)\s*([KMGT]?)i?B?\b")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def collective_counts(hlo_text: str) -> dict:
    """Collective ops in compiled HLO text by kind (an async start counts once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _COLLECTIVE.finditer(hlo_text):
        counts[m.group(1)] += 1
    return counts


def parse_oom(message: str) -> tuple[Optional[float], Optional[float]]:
    """(required, available) bytes from XLA's RESOURCE_EXHAUSTED message, e.g. '... HLO
    temporaries (18.16G) exceeds available HBM (15.75G)' or 'Used 20.5G of 15.75G hbm'."""
    msg = " ".join(message.split())
    pats = [
        r"\(([\d.]+[KMGT]?)\)\s*exceeds available HBM \(([\d.]+[KMGT]?)\)",
        r"[Uu]sed ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm",
        r"required[^(]*\(([\d.]+[KMGT]?)\).*?available[^(]*\(([\d.]+[KMGT]?)\)",
    ]
    for pat in pats:
        m = re.search(pat, msg)
        if m:
            return _bytes(m.group(1)), _bytes(m.group(2))
    return None, None


def _bytes(text: str) -> float:
    m = re.match(r"([\d.]+)([KMGT]?)", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def is_oom(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of abstract arrays under their shardings."""
    total = 0
    for a, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
    return total


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    args, out = m.argument_size_in_bytes, m.output_size_in_bytes
    alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
    # temp_size can be 0 while the peak is not: take the larger of XLA's peak and the sum.
    peak = max(int(getattr(m, "peak_memory_in_bytes", 0) or 0), args + out - alias + temp)
    return dict(
        argument=args,
        output=out,
        alias=alias,
        temp=temp,
        peak=peak,
        code=m.generated_code_size_in_bytes,
    )


def _cost(compiled, topology: Topology) -> dict:
    """flops, bytes accessed and an estimated step time per chip, and how the time was
    estimated: XLA's cost model where it gives one (TPU), else the roofline bound
    max(flops / peak, bytes / memory bandwidth) from XLA's counts (GPU, where a compile-only
    executable has no cost analysis, and TPU programs libtpu's cost model gives up on)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost and topology.platform == "cuda":
        cost = _hlo_cost(compiled)
    cost = dict(cost or {})
    flops_, moved = cost.get("flops"), cost.get("bytes accessed")
    seconds, kind = cost.get("optimal_seconds"), "XLA cost model"
    if seconds is not None and seconds <= 0:  # libtpu's cost model gives up on some programs
        seconds = None
    if seconds is None and flops_ and moved and topology.peak_flops and topology.memory_bandwidth:
        seconds = max(flops_ / topology.peak_flops, moved / topology.memory_bandwidth)
        kind = "roofline bound"
    return dict(flops=flops_, seconds=seconds, bytes_accessed=moved, kind=kind)


def _hlo_cost(compiled) -> dict:
    """XLA's HloCostAnalysis of a compiled module (platform-independent counts), or {}."""
    try:
        from jax._src import xla_bridge
        from jax._src.lib import xla_client

        module = compiled.runtime_executable().hlo_modules()[0]
        return dict(xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))
    except Exception:  # noqa: BLE001  (a private API: no figure rather than no plan)
        return {}


# ----------------------------------------------------------------------------------------
# The train step, compiled for a topology
# ----------------------------------------------------------------------------------------


def dataset_meta(config) -> dict:
    """The dataset metadata a config implies, without the dataset: latents image_size/8 x 4
    channels and 1000 classes (an SD-VAE ImageNet set), or pixels with 1 channel and 10
    classes (an 'identity' autoencoder, the embedded digits)."""
    size = config.data.image_size
    pixels = config.data.dir == "embedded" or config.sample.autoencoder.startswith("identity")
    down, channels, classes = (1, 1, 10) if pixels else (8, 4, 1000)
    return {
        "image_size": size,
        "latent_shape": (size // down, size // down, channels),
        "num_classes": classes,
    }


@dataclasses.dataclass
class Plan:
    """One configuration compiled (or refused) for one topology; bytes and flops per chip."""

    topology: str
    num_devices: int
    fits: bool
    overrides: dict  # config key -> value of this configuration
    global_batch: int
    hbm_bytes: int
    peak_flops: Optional[float]
    mesh: dict = dataclasses.field(default_factory=dict)
    state_bytes: dict = dataclasses.field(default_factory=dict)  # params / ema / opt_state
    memory: dict = dataclasses.field(default_factory=dict)  # XLA's buffer assignment
    required_bytes: Optional[float] = None  # from an out-of-memory error
    available_bytes: Optional[float] = None
    flops_xla: Optional[float] = None  # XLA's cost analysis, per chip
    flops_counter: Optional[float] = None  # 3 x forward (dit_jax.flops), 2 per multiply-add
    estimated_step_seconds: Optional[float] = None  # an estimate; `estimate` says which
    estimate: str = ""  # how estimated_step_seconds was obtained
    collectives: dict = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    error: str = ""
    notes: list = dataclasses.field(default_factory=list)
    sample: Optional[dict] = None

    @property
    def peak_bytes(self) -> Optional[float]:
        return self.memory.get("peak", self.required_bytes)

    @property
    def per_chip_batch(self) -> float:
        return self.global_batch / self.num_devices

    @property
    def images_per_second_per_chip(self) -> Optional[float]:
        s = self.estimated_step_seconds
        return self.per_chip_batch / s if s else None

    @property
    def mfu(self) -> Optional[float]:
        s, peak = self.estimated_step_seconds, self.peak_flops
        return self.flops_counter / s / peak if s and peak and self.flops_counter else None

    def flag_overrides(self) -> list[str]:
        return [f"--config.{k}={v}" for k, v in self.overrides.items()]

    def to_json(self) -> dict:
        return {
            "topology": self.topology,
            "num_devices": self.num_devices,
            "fits": self.fits,
            "hbm_bytes_per_device": self.hbm_bytes,
            "peak_bytes_per_device": self.peak_bytes,
            "argument_bytes_per_device": self.memory.get("argument"),
            "flops_per_device": self.flops_xla,
            "estimated_step_seconds": self.estimated_step_seconds,
            "overrides": self.flag_overrides(),
            "estimate": self.estimate,
            "notes": self.notes,
            "global_batch": self.global_batch,
            "mesh": self.mesh,
            "state_bytes_per_device": self.state_bytes,
            "memory_bytes_per_device": self.memory,
            "required_bytes_per_device": self.required_bytes,
            "available_bytes_per_device": self.available_bytes,
            "counter_flops_per_device": self.flops_counter,
            "estimated_images_per_second_per_device": self.images_per_second_per_chip,
            "estimated_mfu": self.mfu,
            "collectives": self.collectives,
            "compile_seconds": self.compile_seconds,
            "error": self.error,
            "sample": self.sample,
        }


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _lower_train_step(config, topo: Topology, devices):
    """(model, abstract state, its shardings, batch sharding, the lowered train step) of
    `config` on `devices`, exactly as training builds them."""
    meta = dataset_meta(config)
    train.validate_config(config, meta, len(devices))
    model = workdir_lib.model_for_dataset(config, meta)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    tx = train.make_optimizer(config)
    _, abstract, state_sharding = train.train_state_shardings(config, model, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    b = config.batch_size
    h, w, c = meta["latent_shape"]
    batch = {
        "latents": jax.ShapeDtypeStruct((b, h, w, c), jnp.float32, sharding=batch_sharding),
        "labels": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding),
    }
    step = train.jit_train_step(config, model, tx, state_sharding, batch_sharding)
    lowered = step.lower(_abstract(abstract, state_sharding), batch)
    return model, abstract, state_sharding, batch_sharding, lowered


#: XLA's GPU compiler without a device cannot autotune, and for some dots its Triton GEMM
#: emitter then finds no tiling ("Couldn't find output tile sizes"); cuBLAS GEMMs compile.
_NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}
TRITON_NOTE = (
    "compiled with xla_gpu_enable_triton_gemm=false: without a GPU to autotune on, XLA's "
    "Triton GEMM emitter found no tiling for a matmul; cuBLAS GEMMs were compiled instead"
)


def _compile(lowered, topology: Topology, notes: Optional[list] = None):
    """lowered.compile(); on GPU, once more without Triton GEMMs when XLA finds no tiling for
    one (the note is appended to `notes`)."""
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001
        if topology.platform != "cuda" or "tile sizes" not in str(e):
            raise
    if notes is not None and TRITON_NOTE not in notes:
        notes.append(TRITON_NOTE)
    return lowered.compile(compiler_options=_NO_TRITON_GEMM)


def _looped_cost(config, topo: Topology, devices, depth: int) -> dict:
    """The cost of the looped program at `depth` blocks, from compiles at depth 1 and 2: XLA
    counts a scan's body once, so a scanned program's own cost analysis undercounts."""
    costs = []
    for d in (1, 2):
        small = with_overrides(config, {"model.depth": d, "model.scan_blocks": False})
        costs.append(_cost(_compile(_lower_train_step(small, topo, devices)[-1], topo), topo))
    out = {}
    for key in ("flops", "seconds", "bytes_accessed"):
        one, two = costs[0][key], costs[1][key]
        out[key] = one + (depth - 1) * (two - one) if one is not None and two is not None else None
    out["kind"] = costs[1]["kind"] + ", looped program at depth 1 and 2 extrapolated"
    return out


def plan_train(
    config, topology: str | Topology, *, sample_batch: int = 0, sample_steps: int = 2
) -> Plan:
    """Compiles `config`'s train step (global batch config.batch_size) for `topology` and
    reports what XLA says per chip. A program that does not fit is a Plan with fits=False and
    the required/available bytes of the compiler's message; other errors propagate.
    sample_batch > 0 also compiles the sampling loop (sample_steps steps, the config's
    sampler and guidance) at that global batch with the EMA parameters' sharding."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topo)
    start = time.perf_counter()
    model, abstract, state_sharding, batch_sharding, lowered = _lower_train_step(
        config, topo, devices
    )
    b = config.batch_size
    plan = Plan(
        topology=topo.name,
        num_devices=len(devices),
        fits=False,
        overrides=plan_overrides(config),
        global_batch=b,
        hbm_bytes=topo.hbm_bytes,
        peak_flops=topo.peak_flops,
        mesh={k: int(v) for k, v in batch_sharding.mesh.shape.items()},
        flops_counter=3 * 2 * flops.forward_flops(model) * b / len(devices),
    )
    cudnn = models.attention_implementation(model.attention, "gpu") == "cudnn"
    if topo.platform == "cuda" and cudnn and model.dtype != jnp.float32:
        plan.notes.append(
            "attention compiled with XLA: cuDNN flash attention (what 'auto' runs on a GPU) "
            "cannot be compiled without a GPU; XLA's attention holds the [N, heads, T, T] "
            "logits, so this memory is an upper bound for the cuDNN run"
        )
    plan.state_bytes = {
        k: per_device_bytes(getattr(abstract, k), getattr(state_sharding, k))
        for k in ("params", "ema_params", "opt_state")
    }
    try:
        compiled = _compile(lowered, topo, plan.notes)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError: only out-of-memory is a verdict)
        if not is_oom(e):
            raise
        plan.compile_seconds = time.perf_counter() - start
        plan.required_bytes, plan.available_bytes = parse_oom(str(e))
        plan.error = _first_line(e)
        return plan
    plan.compile_seconds = time.perf_counter() - start
    plan.fits = True
    plan.memory = _memory(compiled)
    # XLA counts a scan's body once: a scanned plan's cost comes from the looped program
    cost = (
        _looped_cost(config, topo, devices, model.depth)
        if model.scan_blocks
        else _cost(compiled, topo)
    )
    plan.estimate = cost["kind"] if cost["seconds"] else ""
    plan.flops_xla, plan.estimated_step_seconds = cost["flops"], cost["seconds"]
    plan.collectives = collective_counts(compiled.as_text())
    if plan.memory["peak"] > topo.hbm_bytes:  # backends that only warn
        plan.fits = False
        plan.required_bytes, plan.available_bytes = plan.memory["peak"], topo.hbm_bytes
    if sample_batch:
        plan.sample = plan_sampling(
            config,
            model,
            abstract.ema_params,
            state_sharding.ema_params,
            batch_sharding,
            sample_batch,
            sample_steps,
            topo,
        )
    return plan


def plan_sampling(
    config,
    model,
    abstract_params,
    param_sharding,
    batch_sharding,
    batch: int,
    steps: int,
    topology: Topology,
) -> dict:
    """The sampling loop of config.sample compiled for `steps` model evaluations at a global
    `batch` (labels and noise split like training batches)."""
    if batch % batch_sharding.mesh.size:
        raise ValueError(
            f"--sample_batch {batch} is not divisible by the {batch_sharding.mesh.size} devices."
        )
    s = config.sample
    h = model.input_size
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
    noise = jax.ShapeDtypeStruct(
        (batch, h, h, model.in_channels), jnp.float32, sharding=batch_sharding
    )
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    lowered = sampling.lower_sample_latents(
        model,
        _abstract(abstract_params, param_sharding),
        labels,
        key,
        noise=noise,
        sampler=s.sampler,
        steps=steps,
        cfg_scale=s.cfg_scale,
        guidance_channels=sampling.guidance_channels(s.guidance),
        clip_denoised=s.clip_denoised,
        noise_schedule=config.diffusion.noise_schedule,
        diffusion_steps=config.diffusion.steps,
        guidance_interval=tuple(s.guidance_interval) or None,
    )
    out = {"batch": batch, "steps": steps, "sampler": s.sampler, "cfg_scale": s.cfg_scale}
    start = time.perf_counter()
    notes: list = []
    out["notes"] = notes
    try:
        compiled = _compile(lowered, topology, notes)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        req, avail = parse_oom(str(e))
        out.update(fits=False, required_bytes=req, available_bytes=avail, error=_first_line(e))
        return out
    cost = _cost(compiled, topology)
    out.update(
        estimate=cost["kind"] if cost["seconds"] else "",
        fits=True,
        compile_seconds=time.perf_counter() - start,
        memory=_memory(compiled),
        flops=cost["flops"],
        estimated_seconds=cost["seconds"],
    )
    return out


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400]


# ----------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------

SEARCH_KEYS = (
    "mesh.fsdp",
    "model.remat",
    "model.remat_policy",
    "model.scan_blocks",
    "batch_size",
    "model.attention",
)
#: the remat choices of a search: off, or on with one of the model's policies
REMAT_CHOICES = ("off", *models.REMAT_POLICIES)


def plan_overrides(config) -> dict:
    """The searched config fields of `config` as dotted key -> value."""
    m = config.model
    return {
        "mesh.fsdp": config.mesh.fsdp,
        "mesh.data": config.mesh.data,
        "model.remat": m.remat,
        "model.remat_policy": m.remat_policy,
        "model.scan_blocks": m.scan_blocks,
        "batch_size": config.batch_size,
        "model.attention": m.attention,
    }


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def attention_choices(topology: Topology) -> list[str]:
    """Attention implementations a plan can compile: `attend` ('einsum', what 'auto' runs on
    TPU) and XLA's. cuDNN flash attention needs a GPU to compile, so it is not among them."""
    return ["einsum", "xla"]


def candidates(
    config,
    topology: Topology,
    *,
    fixed_batch: bool,
    per_chip_batches: Sequence[int] = (8, 16, 32, 64, 128),
    fsdp: Optional[Sequence[int]] = None,
    remat: Sequence[str] = REMAT_CHOICES,
    scan: Sequence[bool] = (False, True),
    attention: Optional[Sequence[str]] = None,
) -> list[dict]:
    """Configurations to try: fsdp over every divisor of the device count, remat off or on
    with each policy, looped or scanned blocks, the per-chip batch when the global batch is
    not fixed, the attention implementations."""
    n = topology.num_devices
    batches = [config.batch_size] if fixed_batch else [p * n for p in per_chip_batches]
    out = []
    for f, r, sc, b, a in itertools.product(
        fsdp or divisors(n), remat, scan, batches, attention or attention_choices(topology)
    ):
        if n % f:
            continue
        if r not in REMAT_CHOICES:
            raise ValueError(f"remat choice {r!r}: expected one of {REMAT_CHOICES}.")
        out.append(
            {
                "mesh.fsdp": f,
                "mesh.data": -1,
                "model.remat": r != "off",
                "model.remat_policy": "nothing" if r == "off" else r,
                "model.scan_blocks": sc,
                "batch_size": b,
                "model.attention": a,
            }
        )
    return out


def parse_overrides(items: Sequence[str]) -> dict:
    """['model.remat=True', 'mesh.fsdp=8'] -> {dotted key: value}, values read as Python
    literals, else kept as strings. ValueError for an item without '='."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. model.remat=True.")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        overrides[key.strip().removeprefix("config.")] = value
    return overrides


def with_overrides(config, overrides: dict):
    """A copy of `config` with dotted-key overrides applied."""
    new = config.copy_and_resolve_references()
    with new.unlocked():
        for key, value in overrides.items():
            node = new
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return new


def rank_key(plan: Plan):
    """Fitting plans first, by estimated throughput per chip (for a fixed global batch: by
    estimated step time), then by less memory."""
    ips = plan.images_per_second_per_chip or 0.0
    return (not plan.fits, -ips, plan.peak_bytes or 0)


def search(
    config, topology: str | Topology, *, fixed_batch: bool = True, log=None, **choices
) -> tuple[Optional[Plan], list[Plan]]:
    """Compiles every candidate (see `candidates`), returns (the best fitting plan or None,
    every plan ranked)."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    plans = []
    for overrides in candidates(config, topo, fixed_batch=fixed_batch, **choices):
        plan = plan_train(with_overrides(config, overrides), topo)
        plans.append(plan)
        if log:
            log(plan)
    plans.sort(key=rank_key)
    best = plans[0] if plans and plans[0].fits else None
    return best, plans


# ----------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------


def _gib(x) -> str:
    return "?" if x is None else f"{x / GIB:.2f} GiB"


def format_plan(plan: Plan) -> str:
    """A human-readable report of one plan (per chip; estimates labelled as such)."""
    lines = [
        f"topology {plan.topology}: {plan.num_devices} chips, mesh "
        + " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
        + f", global batch {plan.global_batch} ({plan.per_chip_batch:g} per chip)",
        "config: " + " ".join(plan.flag_overrides()),
    ]
    sb = plan.state_bytes
    if sb:
        lines.append(
            f"per chip, state: params {_gib(sb['params'])} + EMA {_gib(sb['ema_params'])}"
            f" + optimizer {_gib(sb['opt_state'])} = {_gib(sum(sb.values()))}"
        )
    hbm = plan.hbm_bytes
    if plan.fits:
        m = plan.memory
        lines.append(
            f"per chip, compiled: arguments {_gib(m['argument'])}, temporaries "
            f"{_gib(m['temp'])}, outputs {_gib(m['output'])} (aliased "
            f"{_gib(m['alias'])}), peak {_gib(m['peak'])}"
        )
        lines.append(
            f"fits: yes, peak {_gib(m['peak'])} of {_gib(hbm)} HBM "
            f"({_gib(hbm - m['peak'])} to spare)"
        )
    else:
        req, avail = plan.required_bytes, plan.available_bytes
        over = f", over by {_gib(req - avail)}" if req and avail else ""
        lines.append(f"fits: NO, the compiler needs {_gib(req)} of {_gib(avail or hbm)} HBM{over}")
        return "\n".join(lines)
    fx, fc = plan.flops_xla, plan.flops_counter
    lines.append(
        f"flops per chip per step: XLA {fx / 1e12 if fx else float('nan'):.2f} T, "
        f"Gflops counter (3 x forward) {fc / 1e12:.2f} T"
    )
    lines.append("collectives: " + ", ".join(f"{k} {v}" for k, v in plan.collectives.items()))
    s = plan.estimated_step_seconds
    if s:
        mfu = f", MFU {plan.mfu:.1%}" if plan.mfu is not None else ""
        lines.append(
            f"estimate ({plan.estimate}; not a measurement): "
            f"step {s * 1e3:.1f} ms,"
            f" {plan.images_per_second_per_chip:.1f} images/s per chip{mfu}"
        )
    lines.append(f"compiled in {plan.compile_seconds:.1f} s")
    lines += [f"note: {n}" for n in plan.notes]
    if plan.sample:
        sp = plan.sample
        if sp["fits"]:
            est = sp.get("estimated_seconds")
            est_txt = (
                f", estimated {est / sp['steps'] * 1e3:.1f} ms per model evaluation" if est else ""
            )
            lines.append(
                f"sampling ({sp['sampler']}, batch {sp['batch']}, cfg {sp['cfg_scale']}): "
                f"peak {_gib(sp['memory']['peak'])} per chip, fits{est_txt}"
            )
        else:
            lines.append(
                f"sampling (batch {sp['batch']}): does NOT fit, needs "
                f"{_gib(sp.get('required_bytes'))} of {_gib(sp.get('available_bytes'))}"
            )
    return "\n".join(lines)


def format_candidates(plans: Sequence[Plan]) -> str:
    lines = [
        f"{'fsdp':>5} {'remat':>7} {'scan':>5} {'batch':>6} {'attention':>9} {'fits':>5} "
        f"{'peak':>11} {'est. step':>10} {'est. img/s/chip':>15} {'compile':>8}"
    ]
    for p in plans:
        o = p.overrides
        remat = o["model.remat_policy"] if o["model.remat"] else "off"
        step = f"{p.estimated_step_seconds * 1e3:.1f} ms" if p.estimated_step_seconds else "-"
        ips = f"{p.images_per_second_per_chip:.1f}" if p.images_per_second_per_chip else "-"
        lines.append(
            f"{o['mesh.fsdp']:>5} {remat:>7} {str(o['model.scan_blocks']):>5} "
            f"{o['batch_size']:>6} {o['model.attention']:>9} {'yes' if p.fits else 'no':>5} "
            f"{_gib(p.peak_bytes):>11} {step:>10} {ips:>15} {p.compile_seconds:>7.0f}s"
        )
    kinds = sorted({p.estimate for p in plans if p.estimate})
    lines.append(f"(est.: {'; '.join(kinds) or 'estimates'}; not measurements)")
    return "\n".join(lines)
