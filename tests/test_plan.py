"""dit_jax.plan: the train step compiled ahead of time for TPU topologies (libtpu's
compile-only devices, no TPU) and GPU nodes (the CUDA plugin's, no GPU), its per-chip figures,
out-of-memory verdicts, scanned blocks, the search, the launchers' pre-flight, topology names
and multi-slice meshes. A tiny DiT keeps each compile short."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import pytest
from conftest import REPO

from configs import demo
from dit_jax import models, planning, sharding
from launch import common, gpu, tpu

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_plugins") is None
    or importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
    reason="the CUDA plugin is not installed (pip install -e '.[plan-gpu]'): no GPU to compile for",
)
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU topology to compile for",
)

TINY = {
    "model.depth": 2,
    "model.hidden_size": 128,
    "model.num_heads": 2,
    "model.patch_size": 8,
    "batch_size": 16,
    "sample.every_steps": 0,
}
#: ~1.4B parameters: 23 GB of state on one chip, a quarter of it with fsdp=4
HUGE = {
    "model.depth": 2,
    "model.hidden_size": 6144,
    "model.num_heads": 8,
    "model.patch_size": 8,
    "batch_size": 8,
    "sample.every_steps": 0,
}


def tiny(**overrides):
    return planning.with_overrides(demo.get_config(), {**TINY, **overrides})


def plan_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "dit_jax.plan", "--config=configs/demo.py", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )


def sets(overrides):
    return [f"--set={k}={v}" for k, v in overrides.items()]


# ----------------------------------------------------------------------------------------
# Topology names (no libtpu needed)
# ----------------------------------------------------------------------------------------


def test_topology_names():
    t = planning.parse_topology("v5p-8")
    assert (t.num_devices, t.topology_name, t.chip_config) == (4, "v5:2x2x1", "megacore")
    t = planning.parse_topology("v4-4096")
    assert (t.num_devices, t.topology_name, t.wrap) == (2048, "v4:8x16x16", (True,) * 3)
    alias = dataclasses.replace(planning.parse_topology("v5litepod-16"), name="v5e-16")
    assert alias == planning.parse_topology("v5e-16")
    t = planning.parse_topology("v5e-256")
    assert (t.topology_name, t.wrap, t.hbm_bytes) == ("v5e:16x16", (True, True, False), 16 * 2**30)
    t = planning.parse_topology("2xv5p-128")
    assert (t.num_slices, t.chips_per_slice, t.num_devices) == (2, 64, 128)
    assert t.topology_name == "v5:4x4x4"
    assert planning.parse_topology("v6e-8").peak_flops == 918e12
    t = planning.parse_topology("h100x8")
    assert (t.platform, t.num_devices, t.topology_name) == ("cuda", 8, "1x1x8")
    assert t.hbm_bytes == 84_942_979_072 and t.peak_flops == 989e12
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in t.target_config
    t = planning.parse_topology("4xh200x8")
    assert (t.num_slices, t.num_devices, t.topology_name) == (4, 32, "1x4x8")
    assert "device_memory_size: 151397597184" in t.target_config


@pytest.mark.parametrize(
    "name", ["v7-8", "v5p-6", "v5e-3", "h100", "", "v4-8192", "h100x9", "a100x8", "0xh100x8"]
)
def test_unknown_topology_is_one_clear_error(name):
    with pytest.raises(ValueError, match="valid topologies: v4-"):
        planning.parse_topology(name)


def own_lines(stderr: str) -> list[str]:
    """stderr without the C++ loggers' lines (libtpu's and, where installed, the CUDA
    plugin's, printed when jax loads them)."""
    noise = re.compile(r"^([IWEF]\d{4} |WARNING: (All log messages|Logging before)|===|learning/)")
    return [line for line in stderr.strip().splitlines() if line and not noise.match(line)]


def test_unknown_topology_cli():
    proc = plan_cli("--topology=v9-8")
    err = own_lines(proc.stderr)
    assert proc.returncode == 1 and len(err) == 1 and err[0].startswith("error: unknown topology")
    assert "v5p-" in err[0] and "2xv5p-128" in err[0] and "Traceback" not in proc.stderr


def test_gpu_compile_falls_back_from_triton_gemms_once():
    """Without a GPU to autotune on XLA may find no Triton tiling for a matmul; the GPU plan
    then compiles with cuBLAS GEMMs and says so. Other errors, and TPU plans, are not retried."""

    class Lowered:
        def __init__(self, message):
            self.message, self.calls = message, []

        def compile(self, compiler_options=None):
            self.calls.append(compiler_options)
            if compiler_options is None:
                raise RuntimeError(self.message)
            return "compiled"

    gpu_topology, notes = planning.parse_topology("h100x8"), []
    lowered = Lowered("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.1")
    assert planning._compile(lowered, gpu_topology, notes) == "compiled"
    assert lowered.calls == [None, {"xla_gpu_enable_triton_gemm": False}]
    assert notes == [planning.TRITON_NOTE]
    with pytest.raises(RuntimeError, match="tile sizes"):
        planning._compile(
            Lowered("Couldn't find output tile sizes"), planning.parse_topology("v5p-8")
        )
    with pytest.raises(RuntimeError, match="other"):
        planning._compile(Lowered("INTERNAL: other"), gpu_topology)


def test_oom_message_parsing():
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (18.16G) exceeds available HBM (15.75G)."
    )
    req, avail = planning.parse_oom(msg)
    assert req == pytest.approx(18.16 * 2**30) and avail == pytest.approx(15.75 * 2**30)
    assert planning.parse_oom("Used 20.5G of 15.75G hbm.")[0] == pytest.approx(20.5 * 2**30)


def test_collective_counts():
    hlo = (
        "%all-gather.1 = bf16[8] all-gather(%p), dimensions={0}\n"
        "%ar = f32[] all-reduce-start(%x)\n%ard = f32[] all-reduce-done(%ar)\n"
        "%rs = f32[2] reduce-scatter(%y)\n"
    )
    c = planning.collective_counts(hlo)
    assert c == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-to-all": 0,
        "collective-permute": 0,
    }


# ----------------------------------------------------------------------------------------
# Compiled for TPU topologies
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v5p_plans():
    return {f: planning.plan_train(tiny(**{"mesh.fsdp": f}), "v5p-8") for f in (1, 4)}


@needs_libtpu
def test_argument_bytes_match_params_and_sharding(v5p_plans):
    config = tiny()
    model = planning.workdir_lib.model_for_dataset(config, planning.dataset_meta(config))
    n_params = models.count_params(models.abstract_params(model))
    one, four = v5p_plans[1], v5p_plans[4]
    assert one.fits and four.fits and one.num_devices == 4 and four.mesh == {"data": 1, "fsdp": 4}
    s1, s4 = one.state_bytes, four.state_bytes
    assert s1["params"] == s1["ema_params"] == 4 * n_params  # float32, replicated
    assert s1["opt_state"] == pytest.approx(2 * s1["params"], abs=64)  # Adam's mu and nu
    # fsdp=4 quarters every parameter with a wide ('mlp') axis; the tables without one stay whole
    boxed = jax.eval_shape(
        lambda r: model.init({"params": r}, *models.dummy_inputs(model)), jax.random.PRNGKey(0)
    )["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    split = sum(4 * x.value.size for x in leaves if "mlp" in x.names)
    assert 0 < split and s4["params"] == split // 4 + (s1["params"] - split)
    assert s4["ema_params"] == s4["params"]
    for plan in (one, four):
        state = sum(plan.state_bytes.values())
        batch = 16 // 4 * (16 * 16 * 1 * 4 + 4)  # this chip's latents (float32) and labels
        # what XLA allocates for the arguments: the same, but for TPU tile padding of small dims
        assert state + batch <= plan.memory["argument"] <= 1.2 * (state + batch)
        assert plan.peak_bytes >= plan.memory["argument"] and plan.hbm_bytes == 95 * 2**30
        assert plan.flops_xla > 0 and plan.flops_counter > 0
    assert one.collectives["all-reduce"] >= 1  # the gradient mean over 'data'
    assert four.collectives["all-gather"] >= 1  # fsdp gathers its parameters


@needs_libtpu
def test_v5e_16_plan_and_sampling():
    plan = planning.plan_train(tiny(**{"mesh.fsdp": 4}), "v5e-16", sample_batch=16)
    assert plan.fits and plan.num_devices == 16 and plan.mesh == {"data": 4, "fsdp": 4}
    assert plan.hbm_bytes == 16 * 2**30 and plan.peak_bytes < plan.hbm_bytes
    assert plan.sample["fits"] and plan.sample["memory"]["peak"] > 0
    text = planning.format_plan(plan)
    if plan.estimated_step_seconds:  # a time is always labelled as an estimate
        assert "estimate (XLA cost model; not a measurement)" in text
    assert "fits: yes" in text


@needs_libtpu
def test_too_big_for_a_v5e_chip_does_not_fit():
    proc = plan_cli("--topology=v5e-1", "--json", *sets(HUGE))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fits"] is False and out["num_devices"] == 1
    assert out["required_bytes_per_device"] > out["available_bytes_per_device"] > 15 * 2**30
    assert {
        "topology",
        "hbm_bytes_per_device",
        "peak_bytes_per_device",
        "argument_bytes_per_device",
        "flops_per_device",
        "estimated_step_seconds",
        "overrides",
    } <= set(out)
    proc = plan_cli("--topology=v5e-1", *sets(HUGE))
    assert proc.returncode == 1 and "fits: NO" in proc.stdout and "Traceback" not in proc.stderr


@needs_libtpu
def test_search_finds_a_plan_that_fits():
    config = planning.with_overrides(demo.get_config(), HUGE)
    default = planning.plan_train(config, "v5e-4")
    assert not default.fits
    best, plans = planning.search(
        config, "v5e-4", fsdp=(1, 4), remat=("off",), scan=(False,), attention=("einsum",)
    )
    assert best is not None and best.fits and best.overrides["mesh.fsdp"] == 4
    assert "--config.mesh.fsdp=4" in best.flag_overrides()
    assert [p.fits for p in plans] == [True, False]  # ranked: what fits first


@needs_libtpu
def test_scanned_blocks_plan_like_looped_blocks():
    """A scanned model holds the same state and, through the depth-1/2 extrapolation, reports
    the flops and time of the looped program (XLA alone counts the loop body once)."""
    looped = planning.plan_train(tiny(**{"model.depth": 4, "mesh.fsdp": 4}), "v5p-8")
    scanned = planning.plan_train(
        tiny(**{"model.depth": 4, "mesh.fsdp": 4, "model.scan_blocks": True}), "v5p-8"
    )
    assert looped.fits and scanned.fits
    assert scanned.state_bytes == looped.state_bytes
    assert scanned.flops_xla == pytest.approx(looped.flops_xla, rel=0.02)
    assert scanned.estimated_step_seconds == pytest.approx(looped.estimated_step_seconds, rel=0.25)
    assert "extrapolated" in scanned.estimate and "extrapolated" not in looped.estimate
    assert scanned.overrides["model.scan_blocks"] is True
    assert "--config.model.scan_blocks=True" in scanned.flag_overrides()


@needs_cuda_plugin
def test_h100_node_plan():
    """An 8-GPU node compiled without a GPU: per-GPU state quartered by fsdp=4 on the wide
    axes, memory against the H100's 79 GiB, flops from XLA, a labelled roofline time, and a
    configuration over the GPU's memory reported as not fitting."""
    plan = planning.plan_train(tiny(**{"mesh.fsdp": 4}), "h100x8")
    assert plan.fits and plan.num_devices == 8 and plan.mesh == {"data": 2, "fsdp": 4}
    one = planning.plan_train(tiny(), "h100x8")
    assert plan.state_bytes["params"] < one.state_bytes["params"]
    assert plan.flops_xla > 0 and plan.estimated_step_seconds > 0
    assert plan.estimate == "roofline bound"
    assert "roofline bound; not a measurement" in planning.format_plan(plan)
    proc = plan_cli("--topology=h100x1", "--json", *sets({**HUGE, "model.hidden_size": 16384}))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fits"] is False and out["hbm_bytes_per_device"] == 84_942_979_072
    assert out["peak_bytes_per_device"] > out["hbm_bytes_per_device"]


@needs_cuda_plugin
def test_gpu_preflight_refuses_a_launch_that_cannot_fit(capsys):
    argv = [
        "slurm",
        "--config=configs/demo.py",
        "--workdir=/shared/x",
        "--gpu_type=h100",
        "--gpus_per_node=1",
        "--dry_run",
        *[f"--set={k}={v}" for k, v in {**HUGE, "model.hidden_size": 16384}.items()],
    ]
    with pytest.raises(SystemExit) as e:
        common.main_guard(gpu.main)(argv)
    out = capsys.readouterr()
    assert e.value.code == 1 and "sbatch" not in out.out
    err = own_lines(out.err)
    assert len(err) == 1 and "does not fit" in err[0] and "--no_preflight" in err[0], err
    assert "pre-flight (h100x1): does NOT fit" in out.out


@needs_libtpu
def test_preflight_refuses_a_launch_that_cannot_fit(capsys):
    argv = [
        "run",
        "--name=x",
        "--accelerator=v5e-1",
        "--config=configs/demo.py",
        "--workdir=gs://bkt/x",
        "--dry_run",
        *[f"--set={k}={v}" for k, v in HUGE.items()],
    ]
    with pytest.raises(SystemExit) as e:
        common.main_guard(tpu.main)(argv)
    out = capsys.readouterr()
    assert e.value.code == 1 and "gcloud" not in out.out
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "--no_preflight" in err[0], err
    assert "pre-flight (v5e-1): does NOT fit" in out.out  # the dry run prints the verdict


def test_preflight_command():
    cmd = common.plan_command(
        "python", "configs/xl2.py", "v5p-8", ["--config.batch_size=256", "--workdir_extra=x"]
    )
    assert cmd == [
        "python",
        "-m",
        "dit_jax.plan",
        "--config=configs/xl2.py",
        "--topology=v5p-8",
        "--json",
        "--config.batch_size=256",
    ]


# ----------------------------------------------------------------------------------------
# Multi-slice meshes
# ----------------------------------------------------------------------------------------


@needs_libtpu
def test_multislice_mesh_puts_data_across_slices():
    devices = planning.topology_devices(planning.parse_topology("2xv5p-16"))
    assert sharding.num_slices(devices) == 2
    mesh = sharding.make_mesh(-1, 4, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 4}
    rows = [{d.slice_index for d in row} for row in mesh.devices]
    assert rows == [{0}, {0}, {1}, {1}]  # each fsdp group inside one slice, data across slices
    with pytest.raises(ValueError, match="inside a slice"):
        sharding.make_mesh(-1, 16, devices)
