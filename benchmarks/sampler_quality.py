"""Sample quality against the number of model evaluations, per sampler, on demo runs (embedded
digits): the digit classifier's accuracy on the requested labels and FD-digits (Frechet distance
of its penultimate features to the 500 held-out real digits), with the sampling rate.

  python benchmarks/sampler_quality.py --workdir=workdir/demo --workdir=workdir/sit_demo \\
      --steps=10,20,50,250 --per_class=50 --cfg_scale=2 --out=docs/samplers
  # guidance intervals on one sampler (lo,hi in the model's timesteps; "none": always)
  python benchmarks/sampler_quality.py --workdir=workdir/demo --samplers=dpm++2m --steps=20 \\
      --guidance_intervals="none;0,500;0,800;200,1000" --out=docs/samplers/interval

`--combine=a/results.json,b/results.json --out=DIR` merges earlier results into one table and plot.
Each workdir is sampled with every sampler of its objective (DDPM: ddpm, ddim, dpm++2m,
dpm++3m; interpolant: euler, heun, sde-euler, sde-heun, and dopri5 once) from the same labels
and seed. Images/s is timed on a second call with a batch of 100 (compile excluded), guided
(two forwards per evaluation). Writes results.json, results.md and quality_vs_nfe.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dit_jax import sampling  # noqa: E402
from dit_jax.evaluation import digits  # noqa: E402


def sample_images(g, labels, seed, **kwargs):
    return g.sample_images(labels, jax.random.key(seed), **kwargs)


def images_per_second(g, seed, **kwargs) -> float:
    labels = np.arange(100, dtype=np.int32) % g.model.num_classes
    sample_images(g, labels, seed, **kwargs)  # compile
    start = time.perf_counter()
    sample_images(g, labels, seed, **kwargs)
    return len(labels) / (time.perf_counter() - start)


def parse_intervals(text: str):
    out = []
    for part in text.split(";"):
        part = part.strip()
        out.append(None if part in ("", "none") else tuple(float(v) for v in part.split(",")))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", action="append", default=[])
    parser.add_argument(
        "--combine",
        default="",
        help="comma list of results.json to merge into one table and plot (no sampling)",
    )
    parser.add_argument("--samplers", default="", help="comma list (default: all of each run's)")
    parser.add_argument("--steps", default="10,20,50,250")
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--guidance", default="all", choices=sampling.GUIDANCE)
    parser.add_argument("--guidance_intervals", default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_timing", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine.split(","), args.out)
    if not args.workdir:
        parser.error("give --workdir (or --combine)")
    os.makedirs(args.out, exist_ok=True)
    steps_list = [int(s) for s in args.steps.split(",")]
    rows = []
    scorer = None
    for workdir in args.workdir:
        g = sampling.generator_from_workdir(workdir)
        if scorer is None:
            scorer = digits.DigitScorer(g.image_size)
            print(
                f"classifier held-out accuracy {scorer.classifier_accuracy:.1%}; FD floor "
                f"{scorer.floor:.2f}",
                flush=True,
            )
        labels = np.repeat(np.arange(g.model.num_classes, dtype=np.int32), args.per_class)
        names = [
            s
            for s in (
                args.samplers.split(",") if args.samplers else sampling.samplers_for(g.interpolant)
            )
        ]
        objective = "ddpm" if g.interpolant is None else "interpolant"
        for name in names:
            if name not in sampling.samplers_for(g.interpolant):
                continue
            for steps in [0] if name == "dopri5" else steps_list:
                for interval in parse_intervals(args.guidance_intervals):
                    kwargs = dict(
                        sampler=name,
                        steps=max(steps, 1),
                        cfg_scale=args.cfg_scale,
                        guidance_channels=sampling.guidance_channels(args.guidance),
                        guidance_interval=interval,
                    )
                    start = time.perf_counter()
                    images = sample_images(g, labels, args.seed, **kwargs)
                    seconds = time.perf_counter() - start
                    row = dict(
                        workdir=workdir,
                        step=g.step,
                        objective=objective,
                        sampler=name,
                        nfe=steps if steps else None,
                        cfg_scale=args.cfg_scale,
                        guidance_interval=interval,
                        samples=len(labels),
                        seconds_with_compile=seconds,
                        **scorer.score(images, labels),
                    )
                    if not args.no_timing:
                        row["images_per_s"] = images_per_second(g, args.seed, **kwargs)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        classifier_held_out_accuracy=scorer.classifier_accuracy,
        fd_floor=scorer.floor,
    )
    write_outputs(rows, meta, args.out)


def write_outputs(rows: list, meta: dict, out: str) -> None:
    """results.json, results.md (a table) and quality_vs_nfe.png (FD-digits and accuracy against
    model evaluations, one line per run kind and sampler) in `out`."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        "| run | sampler | model evaluations | guidance interval | digit accuracy | FD-digits "
        "| images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{r['images_per_s']:.1f}" if "images_per_s" in r else ""
        interval = "all" if r["guidance_interval"] is None else str(tuple(r["guidance_interval"]))
        nfe = "adaptive" if r["nfe"] is None else r["nfe"]
        lines.append(
            f"| {r['objective']} | {r['sampler']} | {nfe} | {interval} | "
            f"{r['digit_accuracy']:.1%} | {r['fd_digits']:.1f} | {rate} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for objective, name in sorted({(r["objective"], r["sampler"]) for r in rows}):
        pts = sorted(
            (r["nfe"], r["fd_digits"], r["digit_accuracy"])
            for r in rows
            if r["sampler"] == name
            and r["objective"] == objective
            and r["nfe"]
            and r["guidance_interval"] is None
        )
        if not pts:
            continue
        style = "-" if objective == "ddpm" else "--"
        label = f"{'DiT (DDPM)' if objective == 'ddpm' else 'SiT (flow)'} {name}"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        axes[1].plot([p[0] for p in pts], [100 * p[2] for p in pts], style, marker="o", label=label)
    for ax, what in zip(
        axes, ("FD-digits (lower is better)", "digit accuracy % (higher is better)")
    ):
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations per sample")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].axhline(meta["fd_floor"], color="gray", lw=0.8, ls=":", label="real digits (floor)")
    axes[0].legend(fontsize=7)
    cfg = sorted({r["cfg_scale"] for r in rows})
    samples = sorted({r["samples"] for r in rows})
    fig.suptitle(
        f"Demo samplers at cfg {', '.join(f'{c:g}' for c in cfg)} "
        f"({', '.join(map(str, samples))} samples each)"
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality_vs_nfe.png"), dpi=110)


def combine(paths: list, out: str) -> None:
    """One table and plot from several results.json files (e.g. a DDPM and a SiT run)."""
    results = [json.load(open(p)) for p in paths]
    os.makedirs(out, exist_ok=True)
    write_outputs([r for res in results for r in res["rows"]], results[0]["meta"], out)


if __name__ == "__main__":
    main()
