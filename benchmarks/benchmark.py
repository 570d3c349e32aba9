"""Throughput and memory of the train step and the samplers, for any config on any devices.

  python benchmarks/benchmark.py train  --config=configs/s2.py --batch=32 [--set model.dtype=float32 ...]
  python benchmarks/benchmark.py sample --config=configs/s2.py --batch=8 --sampler=ddim --steps=50 --cfg=4
  python benchmarks/benchmark.py matmul           # this machine's dense matmul FLOP/s (a CPU 'peak')
  python benchmarks/input_pipeline.py             # the input pipeline alone

`train` builds the real train state and jitted step (sharded over a ('data', 'fsdp') mesh,
donated state) on synthetic latents of the config's shape, and reports: compile time, the
median over --repeats timed windows of --steps steps (warm-up excluded) as steps/s and
images/s, achieved TFLOP/s and MFU (3 x forward flops from the Gflops counter, a multiply-add
= 2 flops), and peak device memory (allocator statistics where the backend has them, else
XLA's compiled memory analysis). `sample` does the same for a whole compiled sampling loop
(the guided batch doubled in one forward). Config overrides take `--set key=value` (dotted
config paths: model.dtype, model.remat, model.attention, mesh.fsdp, ...). `--json` appends
the figures as one JSON line to a file.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def load_config(path: str, overrides: list[str]):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare string
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def build_model(config, image_size: int | None):
    from dit_jax import workdir

    size = image_size or config.data.image_size
    down = 1 if config.sample.autoencoder.startswith("identity") else 8
    channels = 1 if down == 1 else 4
    meta = {
        "latent_shape": (size // down, size // down, channels),
        "num_classes": 10 if down == 1 else 1000,
    }
    return workdir.model_for_dataset(config, meta)


def device_summary() -> dict:
    d = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": d.device_kind,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "host": platform.machine(),
        "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
    }


def peak_memory(compiled) -> tuple[float | None, str]:
    """Peak bytes: the allocator's high-water mark on GPU/TPU; XLA's static estimate elsewhere."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "allocator peak"
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        return float(total), "XLA estimate (args + outputs + temps - aliased)"
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None, "unavailable"


def timed_windows(run, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of run() (which must block until done)."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        out.append(time.perf_counter() - start)
    return out


def bench_train(args) -> dict:
    import flax.linen as nn
    from dit_jax import flops, sharding, train

    config = load_config(args.config, args.set)
    config.batch_size = args.batch
    model = build_model(config, args.image_size)
    devices = jax.devices()[: config.mesh.num_devices or None]
    if args.batch % len(devices):
        raise SystemExit(
            f"error: --batch {args.batch} is not divisible by the {len(devices)} devices."
        )
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    tx = train.make_optimizer(config)
    init, _, state_sharding = train.train_state_shardings(config, model, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)(
        jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(0)
    shape = (args.batch, model.input_size, model.input_size, model.in_channels)
    batch = {
        "latents": jax.device_put(rng.standard_normal(shape, np.float32), batch_sharding),
        "labels": jax.device_put(
            rng.integers(0, model.num_classes, args.batch).astype(np.int32), batch_sharding
        ),
    }
    step_fn = train.jit_train_step(config, model, tx, state_sharding, batch_sharding)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run():
        s = holder[0]
        for _ in range(args.steps):
            s, metrics = compiled(s, batch)
        jax.block_until_ready((s, metrics))
        holder[0] = s

    run()  # warm-up
    if args.profile_dir:
        jax.profiler.start_trace(args.profile_dir)
        run()
        jax.profiler.stop_trace()
    seconds = statistics.median(timed_windows(run, args.repeats))
    steps_per_s = args.steps / seconds
    train_flops = 3 * 2 * flops.forward_flops(model) * args.batch
    mem, mem_kind = peak_memory(compiled)
    return dict(
        kind="train",
        config=args.config,
        overrides=args.set,
        model=_model_desc(model),
        batch=args.batch,
        dtype=config.model.dtype,
        remat=config.model.remat,
        attention=config.model.attention,
        mesh=dict(mesh.shape),
        compile_s=compile_s,
        steps_per_s=steps_per_s,
        images_per_s=steps_per_s * args.batch,
        achieved_tflops=train_flops * steps_per_s / 1e12,
        peak_memory_gb=None if mem is None else mem / 2**30,
        memory_source=mem_kind,
    )


def bench_sample(args) -> dict:
    from dit_jax import flops, models, sampling

    config = load_config(args.config, args.set)
    model = build_model(config, args.image_size)
    params = models.init_params(model, jax.random.key(0))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    labels = jax.device_put(np.arange(args.batch, dtype=np.int32) % model.num_classes, split)
    noise = jax.device_put(
        np.random.default_rng(0).standard_normal(
            (args.batch, model.input_size, model.input_size, model.in_channels), np.float32
        ),
        split,
    )
    kw = dict(
        sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, guidance_channels=3, noise=noise
    )
    run = lambda: jax.block_until_ready(
        sampling.sample_latents(model, params, labels, jax.random.key(1), **kw)
    )
    start = time.perf_counter()
    run()  # compile + first run
    first_s = time.perf_counter() - start
    seconds = statistics.median(timed_windows(run, args.repeats))
    forwards = args.batch * args.steps * (2 if args.cfg > 1 else 1)
    return dict(
        kind="sample",
        config=args.config,
        overrides=args.set,
        model=_model_desc(model),
        batch=args.batch,
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
        dtype=str(jnp.dtype(model.dtype)),
        first_call_s=first_s,
        seconds=seconds,
        images_per_s=args.batch / seconds,
        achieved_tflops=2 * flops.forward_flops(model) * forwards / seconds / 1e12,
    )


def bench_matmul(args) -> dict:
    n = args.size
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), args.dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    seconds = statistics.median(timed_windows(lambda: jax.block_until_ready(f(a)), args.repeats))
    return dict(kind="matmul", size=n, dtype=args.dtype, achieved_tflops=2 * n**3 / seconds / 1e12)


def _model_desc(model) -> str:
    return (
        f"depth {model.depth} width {model.hidden_size} heads {model.num_heads} patch {model.patch_size} "
        f"input {model.input_size}x{model.input_size}x{model.in_channels}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for name in ("train", "sample"):
        p = sub.add_parser(name)
        p.add_argument("--config", default="configs/s2.py")
        p.add_argument(
            "--set", action="append", default=[], help="config override key=value (repeatable)"
        )
        p.add_argument("--batch", type=int, default=32, help="global batch")
        p.add_argument(
            "--image_size", type=int, default=None, help="override config.data.image_size"
        )
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument(
            "--peak_tflops",
            type=float,
            default=None,
            help="per-device peak for MFU (default: table)",
        )
        p.add_argument("--json", default=None, help="append the result as a JSON line here")
    t = sub.choices["train"]
    t.add_argument("--steps", type=int, default=10, help="steps per timed window")
    t.add_argument(
        "--profile_dir", default=None, help="write a jax.profiler trace of one window here"
    )
    s = sub.choices["sample"]
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    s.add_argument("--steps", type=int, default=250)
    s.add_argument("--cfg", type=float, default=4.0)
    m = sub.add_parser("matmul")
    m.add_argument("--size", type=int, default=2048)
    m.add_argument("--dtype", default="float32")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--json", default=None)
    m.add_argument("--peak_tflops", type=float, default=None)
    args = parser.parse_args()

    result = {"train": bench_train, "sample": bench_sample, "matmul": bench_matmul}[args.kind](args)
    result.update(device_summary())
    peak = args.peak_tflops
    if peak is None:
        from dit_jax import flops

        peak = flops.peak_flops_per_device(jax.devices()[0])
        peak = peak / 1e12 if peak else None
    if peak and args.kind != "matmul":
        result["mfu"] = result["achieved_tflops"] / (peak * result["num_devices"])
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main()
