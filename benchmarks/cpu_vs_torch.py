"""Side by side: dit_jax's train step against the PyTorch baseline, alternating, on this machine.

  python benchmarks/cpu_vs_torch.py --model=S/2 --batch=8              # dit_jax vs PyTorch
  python benchmarks/cpu_vs_torch.py --model=B/4 --batch=16
  python benchmarks/cpu_vs_torch.py --a=jax --b=jax --b_env=XLA_FLAGS=--xla_foo=true  # two jaxes

Each program lives in its own worker process (compiled/warmed once), and the parent asks them for
timed windows in turn, A, B, A, B, ..., so that load from other jobs on a shared machine falls on
both alike. Both run the same step: DiT of the given size on 32x32x4 latents, 1000 classes,
float32, the hybrid loss, AdamW (lr 1e-4, no weight decay), EMA 0.9999. dit_jax's is the real
jitted `train.train_step` (with its non-finite guard); PyTorch's is `torch_baseline.TrainStep`.
Prints each window, then images/s medians and the ratio A / B (> 1: A is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def jax_step(model_name: str, batch: int, overrides: list[str]):
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import benchmark  # benchmarks/benchmark.py
    import flax.linen as nn
    import jax
    import numpy as np
    from dit_jax import sharding, train
    config = benchmark.load_config(os.path.join(ROOT, "configs", "default.py"),
                                   [f"model.name={model_name}", "model.dtype=float32",
                                    *overrides])
    config.batch_size = batch
    model = benchmark.build_model(config, 256)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    tx = train.make_optimizer(config)
    init, _, state_sharding = train.train_state_shardings(config, model, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)(
        jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    data = {"latents": jax.device_put(rng.standard_normal((batch, 32, 32, 4), np.float32),
                                      batch_sharding),
            "labels": jax.device_put(rng.integers(0, 1000, batch).astype(np.int32),
                                     batch_sharding)}
    compiled = train.jit_train_step(config, model, tx, state_sharding, batch_sharding).lower(
        state, data).compile()
    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], data)
        return float(metrics["loss"])  # blocks
    return step


def torch_step(model_name: str, batch: int, attention: str):
    sys.path.insert(0, HERE)
    import torch_baseline
    return torch_baseline.TrainStep(model_name, batch, attention)


def worker(args):
    if args.worker == "jax":
        step = jax_step(args.model, args.batch, args.set)
    else:
        step = torch_step(args.model, args.batch, args.torch_attention)
    step()  # warm-up (and compile)
    step()
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        start = time.perf_counter()
        for _ in range(n):
            step()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def spawn(kind: str, env_items: list[str], args) -> subprocess.Popen:
    env = dict(os.environ)
    for item in env_items:
        key, _, value = item.partition("=")
        env[key] = value
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--model={args.model}",
           f"--batch={args.batch}", f"--torch_attention={args.torch_attention}"]
    cmd += [f"--set={s}" for s in args.set]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc


def wait_ready(proc: subprocess.Popen, label: str):
    for line in proc.stdout:
        if line.strip() == "ready":
            return
    raise SystemExit(f"worker {label} exited with {proc.wait()} before it was ready")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="S/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=5, help="A, B windows each")
    parser.add_argument("--a", default="jax", choices=("jax", "torch"))
    parser.add_argument("--b", default="torch", choices=("jax", "torch"))
    parser.add_argument("--a_env", action="append", default=[], help="KEY=VALUE for A only")
    parser.add_argument("--b_env", action="append", default=[], help="KEY=VALUE for B only")
    parser.add_argument("--set", action="append", default=[], help="dit_jax config override")
    parser.add_argument("--torch_attention", default="sdpa", choices=("sdpa", "explicit"))
    parser.add_argument("--json", default=None, help="append the result as a JSON line here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    labels = [f"A ({args.a}{' ' + ' '.join(args.a_env) if args.a_env else ''})",
              f"B ({args.b}{' ' + ' '.join(args.b_env) if args.b_env else ''})"]
    procs = []
    for kind, env, label in ((args.a, args.a_env, labels[0]), (args.b, args.b_env, labels[1])):
        procs.append(spawn(kind, env, args))
        wait_ready(procs[-1], label)  # one compile at a time
    rates = [[], []]
    try:
        for r in range(args.rounds):
            for i, proc in enumerate(procs):
                proc.stdin.write(f"{args.steps}\n")
                proc.stdin.flush()
                seconds = json.loads(proc.stdout.readline())["seconds"]
                rates[i].append(args.steps * args.batch / seconds)
            print(f"round {r}: A {rates[0][-1]:.2f} img/s  B {rates[1][-1]:.2f} img/s  "
                  f"A/B {rates[0][-1] / rates[1][-1]:.2f}", flush=True)
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()
    med = [statistics.median(r) for r in rates]
    ratios = [a / b for a, b in zip(*rates)]
    result = dict(model=f"DiT-{args.model}", batch=args.batch, a=labels[0], b=labels[1],
                  a_img_s=med[0], b_img_s=med[1], ratio_of_medians=med[0] / med[1],
                  median_ratio=statistics.median(ratios), rounds=args.rounds, steps=args.steps,
                  a_windows=rates[0], b_windows=rates[1])
    print(f"DiT-{args.model} batch {args.batch}: {labels[0]} {med[0]:.2f} img/s, "
          f"{labels[1]} {med[1]:.2f} img/s, A/B {med[0] / med[1]:.3f} "
          f"(median of per-round ratios {statistics.median(ratios):.3f})")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
