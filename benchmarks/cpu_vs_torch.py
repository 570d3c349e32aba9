"""Side by side: dit_jax's train step against the PyTorch baseline, alternating, on this machine.

  python benchmarks/cpu_vs_torch.py --model=S/2 --batch=8              # dit_jax vs PyTorch
  python benchmarks/cpu_vs_torch.py --model=B/4 --batch=16
  python benchmarks/cpu_vs_torch.py --a=jax --b=jax --b_env=XLA_FLAGS=--xla_foo=true  # two jaxes
  python benchmarks/cpu_vs_torch.py --b=jax --b_root=/tmp/old --c=torch  # vs an older export too

Each program lives in its own worker process (compiled/warmed once), and the parent asks them for
timed windows in turn, A, B, A, B, ..., so that load from other jobs on a shared machine falls on
both alike. Both run the same step: DiT of the given size on 32x32x4 latents, 1000 classes,
float32, the hybrid loss, AdamW (lr 1e-4, no weight decay), EMA 0.9999. dit_jax's is the real
jitted `train.train_step` (with its non-finite guard); PyTorch's is `torch_baseline.TrainStep`.
Prints each window, then images/s medians and the ratio A / B (> 1: A is faster), and A / C
when a third program C is given. `--X_root` runs program X from another copy of the repository
(e.g. `git archive <commit> | tar -x -C /tmp/old`), to measure a change against its parent.
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
    import dit_jax
    from dit_jax import sharding, train

    if not os.path.abspath(dit_jax.__file__).startswith(ROOT + os.sep):
        raise SystemExit(f"dit_jax imported from {dit_jax.__file__}, not from {ROOT}")
    config = benchmark.load_config(
        os.path.join(ROOT, "configs", "default.py"),
        [f"model.name={model_name}", "model.dtype=float32", *overrides],
    )
    config.batch_size = batch
    model = benchmark.build_model(config, 256)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    tx = train.make_optimizer(config)
    init, _, state_sharding = train.train_state_shardings(config, model, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)(
        jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(0)
    data = {
        "latents": jax.device_put(
            rng.standard_normal((batch, 32, 32, 4), np.float32), batch_sharding
        ),
        "labels": jax.device_put(rng.integers(0, 1000, batch).astype(np.int32), batch_sharding),
    }
    compiled = (
        train.jit_train_step(config, model, tx, state_sharding, batch_sharding)
        .lower(state, data)
        .compile()
    )
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


def spawn(kind: str, env_items: list[str], root: str, args) -> subprocess.Popen:
    env = dict(os.environ)
    for item in env_items:
        key, _, value = item.partition("=")
        env[key] = value
    script = os.path.join(os.path.abspath(root), "benchmarks", "cpu_vs_torch.py")
    cmd = [
        sys.executable,
        script,
        f"--worker={kind}",
        f"--model={args.model}",
        f"--batch={args.batch}",
        f"--torch_attention={args.torch_attention}",
    ]
    cmd += [f"--set={s}" for s in args.set]
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
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
    parser.add_argument("--c", default=None, choices=("jax", "torch"), help="optional third")
    parser.add_argument("--c_env", action="append", default=[], help="KEY=VALUE for C only")
    for x in "abc":
        parser.add_argument(f"--{x}_root", default=ROOT, help=f"repository copy {x.upper()} runs")
    parser.add_argument("--set", action="append", default=[], help="dit_jax config override")
    parser.add_argument("--torch_attention", default="sdpa", choices=("sdpa", "explicit"))
    parser.add_argument("--json", default=None, help="append the result as a JSON line here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    specs = [
        (x.upper(), getattr(args, x), getattr(args, f"{x}_env"), getattr(args, f"{x}_root"))
        for x in "abc"
        if getattr(args, x)
    ]
    labels = [
        f"{x} ({kind}{' ' + ' '.join(env) if env else ''}{'' if root == ROOT else ' from ' + root})"
        for x, kind, env, root in specs
    ]
    procs = []
    for (_, kind, env, root), label in zip(specs, labels):
        procs.append(spawn(kind, env, root, args))
        wait_ready(procs[-1], label)  # one compile at a time
    rates = [[] for _ in procs]
    try:
        for r in range(args.rounds):
            for i, proc in enumerate(procs):
                proc.stdin.write(f"{args.steps}\n")
                proc.stdin.flush()
                seconds = json.loads(proc.stdout.readline())["seconds"]
                rates[i].append(args.steps * args.batch / seconds)
            print(
                f"round {r}: "
                + "  ".join(f"{s[0]} {x[-1]:.2f} img/s" for s, x in zip(specs, rates))
                + f"  A/B {rates[0][-1] / rates[1][-1]:.2f}",
                flush=True,
            )
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()
    med = [statistics.median(r) for r in rates]
    result = dict(
        model=f"DiT-{args.model}",
        batch=args.batch,
        rounds=args.rounds,
        steps=args.steps,
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
    print(f"DiT-{args.model} batch {args.batch}:")
    for (x, *_), label, m, r in zip(specs, labels, med, rates):
        result.update({x.lower(): label, f"{x.lower()}_img_s": m, f"{x.lower()}_windows": r})
        print(f"  {label}: {m:.2f} img/s")
    for i in range(1, len(specs)):
        x = specs[i][0]
        ratios = [a / b for a, b in zip(rates[0], rates[i])]
        result[f"a_over_{x.lower()}"] = med[0] / med[i]
        result[f"median_ratio_a_over_{x.lower()}"] = statistics.median(ratios)
        print(
            f"  A/{x}: {med[0] / med[i]:.3f} (median of per-round ratios "
            f"{statistics.median(ratios):.3f})"
        )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
