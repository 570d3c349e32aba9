"""The plan table of BENCHMARKS.md: the 12 DiT models compiled ahead of time (dit_jax.planning)
for TPU topologies and GPU nodes at a global batch, one JSON line per (model, topology)
appended to --out, and the Markdown table printed from all lines in --out (so an interrupted
run resumes).

  python benchmarks/plan_table.py --topologies=v5p-8,v4-32,v5e-16,v6e-8,h100x8 --batch=256 \\
      --out=benchmarks/plan_search.jsonl --search --fsdp=1,all --remat=off,dots,nothing \\
      --scan=True
  python benchmarks/plan_table.py --out=benchmarks/plan_search.jsonl --table_only

  python benchmarks/plan_table.py --topologies=v5e-16 --out=benchmarks/plan_fixed.jsonl \\
      --plan=mesh.fsdp=all,model.scan_blocks=True,model.remat=True,model.remat_policy=dots

Without --search each cell is the config as it is (fsdp 1, remat off, looped blocks) with the
--plan overrides; with
--search the fastest fitting plan of the given fsdp x remat x scan choices ('all' in --fsdp:
every chip of the topology). Time figures are estimates: XLA's cost model on TPU, a roofline
bound on GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import libtpu  # noqa: E402,F401  (the version goes into the table)

from configs import default  # noqa: E402
from dit_jax import planning  # noqa: E402

MODELS = [f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def cell(model: str, topology: str, args) -> dict:
    config = planning.with_overrides(
        default.get_config(), {"model.name": f"DiT-{model}", "batch_size": args.batch}
    )
    start = time.perf_counter()
    if args.search:
        n = planning.parse_topology(topology).num_devices
        fsdp = sorted({n if f == "all" else int(f) for f in args.fsdp}) if args.fsdp else None
        best, plans = planning.search(
            config,
            topology,
            fsdp=fsdp,
            remat=args.remat,
            scan=args.scan,
            attention=args.attention,
        )
        plan = best or plans[0]
        tried = len(plans)
    else:
        n = planning.parse_topology(topology).num_devices
        fixed = planning.parse_overrides(args.plan.split(",") if args.plan else [])
        fixed = {k: n if v == "all" else v for k, v in fixed.items()}
        plan, tried = planning.plan_train(planning.with_overrides(config, fixed), topology), 1
    row = plan.to_json()
    row.update(
        model=model,
        wall_seconds=time.perf_counter() - start,
        candidates_tried=tried,
        jax=jax.__version__,
        libtpu=getattr(libtpu, "__version__", "?"),
        cuda_plugin=_version("jax-cuda12-plugin"),
    )
    return row


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _estimated_by(kind: str) -> str:
    """'XLA cost model, looped program ... extrapolated' -> 'XLA'; 'roofline bound' -> 'roofline'."""
    base = "XLA" if kind.startswith("XLA") else "roofline" if kind.startswith("roofline") else "-"
    return base + (" (extrap.)" if "extrapolated" in kind else "")


def table(rows: list[dict]) -> str:
    gib = 2**30
    lines = [
        "| model | topology | fits | plan | peak GiB/chip (of HBM) | est. img/s/chip | "
        "est. MFU | estimated by | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = {k.split("=")[0].removeprefix("--config."): k.split("=")[1] for k in r["overrides"]}
        remat = o.get("model.remat_policy", "nothing") if o["model.remat"] == "True" else "off"
        scan = ", scan" if o.get("model.scan_blocks") == "True" else ""
        plan = f"fsdp {o['mesh.fsdp']}, remat {remat}{scan}"
        peak = r["peak_bytes_per_device"] or r.get("required_bytes_per_device")
        peak_txt = f"{peak / gib:.1f} ({r['hbm_bytes_per_device'] / gib:.0f})" if peak else "?"
        ips = r.get("estimated_images_per_second_per_device")
        mfu = r.get("estimated_mfu")
        fits = "yes" if r["fits"] else "no"
        lines.append(
            f"| {r['model']} | {r['topology']} | {fits} | {plan} | "
            f"{peak_txt} | {f'{ips:.0f}' if ips else '-'} | "
            f"{f'{mfu:.0%}' if mfu else '-'} | {_estimated_by(r.get('estimate', ''))} | "
            f"{r['compile_seconds']:.0f} |"
        )
    return "\n".join(lines)


def pivot(rows: list[dict]) -> str:
    """Models down, topologies across; each cell: estimated images/s per chip, estimated MFU,
    peak GiB per chip (or 'does not fit')."""
    topologies = list(dict.fromkeys(r["topology"] for r in rows))
    cells = {(r["model"], r["topology"]): r for r in rows}
    lines = [
        "| model | " + " | ".join(topologies) + " |",
        "|---|" + "---|" * len(topologies),
    ]
    for model in MODELS:
        out = []
        for t in topologies:
            r = cells.get((model, t))
            if r is None:
                out.append("not run")
            elif not r["fits"]:
                out.append("does not fit")
            else:
                ips, mfu = r.get("estimated_images_per_second_per_device"), r.get("estimated_mfu")
                peak = r["peak_bytes_per_device"] / 2**30
                est = f"{ips:.0f} img/s, {mfu:.0%}" if ips and mfu else "no estimate"
                out.append(f"{est}, {peak:.1f} GiB")
        if any(c != "not run" for c in out):
            lines.append(f"| {model} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--topologies", default="v5p-8,v4-32,v5e-16,v6e-8")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--search", action="store_true")
    p.add_argument("--fsdp", type=lambda s: s.split(","), default=None)
    p.add_argument("--remat", type=lambda s: s.split(","), default=list(planning.REMAT_CHOICES))
    p.add_argument(
        "--scan", type=lambda s: [x == "True" for x in s.split(",")], default=[False, True]
    )
    p.add_argument("--attention", type=lambda s: s.split(","), default=["einsum"])
    p.add_argument(
        "--plan",
        default="",
        help="without --search: fixed overrides, e.g. mesh.fsdp=all,model.scan_blocks=True "
        "('all': every chip of the topology)",
    )
    p.add_argument("--out", default="benchmarks/plan_table.jsonl")
    p.add_argument("--table_only", action="store_true")
    p.add_argument("--pivot", action="store_true", help="models down, topologies across")
    args = p.parse_args()
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["model"], r["topology"]) for r in map(json.loads, f)}
    if not args.table_only:
        for topology in args.topologies.split(","):
            for model in args.models.split(","):
                if (model, topology) in done:
                    continue
                try:
                    row = cell(model, topology, args)
                except Exception as e:  # noqa: BLE001  (one failed cell must not stop the table)
                    print(
                        f"{model} {topology}: FAILED {type(e).__name__}: "
                        + " ".join(str(e).split())[:300],
                        flush=True,
                    )
                    continue
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{model} {topology}: fits={row['fits']} {row['wall_seconds']:.0f}s", flush=True
                )
    with open(args.out) as f:
        rows = [json.loads(line) for line in f]
    topologies = list(dict.fromkeys(r["topology"] for r in rows))
    rows.sort(key=lambda r: (MODELS.index(r["model"]), topologies.index(r["topology"])))
    print(pivot(rows) if args.pivot else table(rows))


if __name__ == "__main__":
    main()
