"""The scaling report of a sweep: one row per run (parameters, Gflops, training compute, loss,
an evaluation metric) as CSV and Markdown, and plots: metric vs training steps, vs Gflops and vs
training compute, plus the runs' latest sample grids side by side.

  python -m launch.report --root=workdir/sweep                 # metric: fid, else fd_digits
  python -m launch.report --root=workdir/toy_sweep --metric=fd_digits --out=docs/scaling
  python -m launch.report --root=gs://my-bucket/sweep --metric=fid --out=report   # reads the bucket

Runs are the directories under --root with a metrics.jsonl (written by training) or an
eval.jsonl (evaluations added afterwards, e.g. by launch.toy_sweep); both are read, and a metric
is taken from whichever holds it (one JSON object per line with a "step"). Gflops and parameters
come from dit_jax.flops on the model in the run's config.json; training compute follows the
paper: Gflops x batch size x steps x 3 (forward + backward).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from launch import common
from launch.common import LaunchError

METRIC_FILES = ("metrics.jsonl", "eval.jsonl")
AUTO_METRICS = ("fid", "fd_digits")
LOWER_IS_BETTER = True


@dataclass
class RunData:
    name: str
    workdir: str
    config: dict
    records: list[dict]
    samples: Optional[str] = None
    stats: dict = field(default_factory=dict)


def _path(p: str):
    """A local or gs:// path (etils.epath: the same calls for both)."""
    from etils import epath

    return epath.Path(p)


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file; a torn last line (a run still writing) is skipped."""
    out = []
    p = _path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "step" in obj:
            out.append(obj)
    return out


def _join(root: str, *parts: str) -> str:
    return (
        "/".join([root.rstrip("/"), *parts]) if common.is_gcs(root) else os.path.join(root, *parts)
    )


def latest_samples(workdir: str) -> Optional[str]:
    def step_of(name):
        m = re.search(r"(\d+)", name)
        return int(m.group(1)) if m else -1

    d = _path(_join(workdir, "samples"))
    if not d.is_dir():
        return None
    pngs = [p.name for p in d.iterdir() if p.name.endswith(".png")]
    return _join(workdir, "samples", max(pngs, key=step_of)) if pngs else None


def discover(root: str, names: Optional[Sequence[str]] = None) -> list[str]:
    r = _path(root)
    try:
        is_dir = r.is_dir()
    except Exception as e:  # e.g. no access to the bucket
        raise LaunchError(f"cannot read --root {root}: {type(e).__name__}: {e}") from None
    if not is_dir:
        raise LaunchError(f"--root {root} is not a directory.")
    found = sorted(
        d.name
        for d in r.iterdir()
        if d.is_dir() and any((d / f).is_file() for f in (*METRIC_FILES, "config.json"))
    )
    if names:
        missing = sorted(set(names) - set(found))
        if missing:
            raise LaunchError(
                f"--runs: no run {', '.join(missing)} under {root} (found: {', '.join(found) or 'none'})."
            )
        found = list(names)
    if not found:
        raise LaunchError(f"no runs under {root} (directories with metrics.jsonl or config.json).")
    return found


def load_run(root: str, name: str) -> RunData:
    workdir = _join(root, name)
    config = {}
    path = _path(_join(workdir, "config.json"))
    if path.is_file():
        config = json.loads(path.read_text())
    records = [r for f in METRIC_FILES for r in read_jsonl(_join(workdir, f))]
    return RunData(name, workdir, config, records, latest_samples(workdir))


# ----------------------------------------------------------------------------------------
# Model cost (dit_jax.flops on the run's model)
# ----------------------------------------------------------------------------------------


def _guess_meta(config) -> dict:
    """Dataset shape when the dataset is not on this machine: embedded MNIST (1 channel, 10
    classes), pixel space (identity autoencoder), or SD-VAE latents (image / 8, 4 channels)."""
    size = int(config.data.image_size)
    autoencoder = str(config.sample.get("autoencoder", "") or "")
    if config.data.dir == "embedded":
        return {"latent_shape": (size, size, 1), "num_classes": 10}
    if autoencoder.startswith("identity"):
        return {"latent_shape": (size, size, 3), "num_classes": 1000}
    return {"latent_shape": (size // 8, size // 8, 4), "num_classes": 1000}


def model_stats(config_dict: dict) -> dict:
    """{'params', 'gflops', 'tokens'} of the run's model ({} without a config)."""
    if not config_dict:
        return {}
    import ml_collections
    from dit_jax import flops, models, workdir
    from dit_jax.data import latents as latents_lib

    config = ml_collections.ConfigDict(config_dict)
    try:
        meta = latents_lib.read_metadata(workdir.dataset_dir(config))
    except Exception:  # dataset not here: its shape from the config
        meta = _guess_meta(config)
    model = workdir.model_for_dataset(config, meta)
    return {
        "params": models.count_params(models.abstract_params(model)),
        "gflops": flops.forward_flops(model) / 1e9,
        "tokens": model.num_patches,
        "patch_size": model.patch_size,
    }


def model_label(config: dict) -> str:
    m = config.get("model", {})
    if m.get("name"):
        return m["name"]
    return f"d{m.get('depth')}-w{m.get('hidden_size')}-h{m.get('num_heads')}-p{m.get('patch_size')}"


# ----------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; the last record of a step wins."""
    by_step = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[int(r["step"])] = float(v)
    return sorted(by_step.items())


def train_minutes(records: list[dict]) -> Optional[float]:
    """Time spent in train steps (from each logged window's steps/s; compile, start-up, sampling
    and evaluation excluded), in minutes."""
    logged = sorted(
        {
            int(r["step"]): float(r["steps_per_sec"])
            for r in records
            if isinstance(r.get("steps_per_sec"), (int, float)) and r["steps_per_sec"] > 0
        }.items()
    )
    if not logged:
        return None
    total, prev = 0.0, 0
    for step, rate in logged:
        total += max(step - prev, 0) / rate
        prev = step
    return total / 60


def pick_metric(runs: list[RunData], metric: str) -> Optional[str]:
    if metric != "auto":
        return metric
    for m in AUTO_METRICS:
        if any(series(r.records, m) for r in runs):
            return m
    return None


def summarize(run: RunData, metric: Optional[str]) -> dict:
    loss = series(run.records, "loss")
    steps = max((int(r["step"]) for r in run.records if "loss" in r), default=None)
    batch = run.config.get("batch_size")
    g = run.stats.get("gflops")
    row = {
        "run": run.name,
        "model": model_label(run.config) if run.config else "",
        "params_M": run.stats["params"] / 1e6 if "params" in run.stats else None,
        "gflops": g,
        "tokens": run.stats.get("tokens"),
        "patch": run.stats.get("patch_size"),
        "batch_size": batch,
        "steps": steps,
        "train_compute_gflop": g * batch * steps * 3 if None not in (g, batch, steps) else None,
        "final_loss": loss[-1][1] if loss else None,
        "min_loss": min(v for _, v in loss) if loss else None,
        "train_minutes": train_minutes(run.records),
    }
    if metric:
        m = series(run.records, metric)
        best = min(m, key=lambda sv: sv[1]) if m else None
        row.update(
            {
                f"{metric}_final": m[-1][1] if m else None,
                f"{metric}_final_step": m[-1][0] if m else None,
                f"{metric}_best": best[1] if best else None,
                f"{metric}_best_step": best[0] if best else None,
            }
        )
    return row


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def write_csv(rows: list[dict], path: str) -> None:
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in keys})


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs."""
    import numpy as np

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None

    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r

    a, b = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def markdown(rows: list[dict], metric: Optional[str], title: str) -> str:
    cols = [
        ("run", "run"),
        ("model", "model"),
        ("params_M", "params (M)"),
        ("gflops", "Gflops"),
        ("tokens", "tokens"),
        ("patch", "patch"),
        ("batch_size", "batch"),
        ("steps", "steps"),
        ("train_compute_gflop", "train compute (Gflop)"),
        ("train_minutes", "train min"),
        ("final_loss", "final loss"),
        ("min_loss", "min loss"),
    ]
    if metric:
        cols += [
            (f"{metric}_final", f"{metric} (final)"),
            (f"{metric}_best", f"{metric} (best)"),
            (f"{metric}_best_step", "best at step"),
        ]
    lines = [f"# {title}", ""]
    lines.append("| " + " | ".join(h for _, h in cols) + " |")
    lines.append("|" + "|".join("---" if k in ("run", "model") else "---:" for k, _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    lines.append("")
    lines.append(
        "Gflops: forward pass of one image, multiply-adds (the paper's convention); "
        "train compute = Gflops x batch x steps x 3; train min: time in train steps (from the logged "
        "steps/s; start-up, compilation, sampling and evaluation not included)."
    )
    if metric:
        rho = spearman([r["gflops"] for r in rows], [r.get(f"{metric}_final") for r in rows])
        if rho is not None:
            lines.append(
                f"Spearman rank correlation of Gflops and final {metric}: {rho:+.2f} "
                f"(-1: {metric} falls at every increase in Gflops)."
            )
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_series(
    runs: list[RunData],
    key: str,
    path: str,
    *,
    x: str = "steps",
    ylabel: Optional[str] = None,
    log_y: bool = False,
) -> Optional[str]:
    """`key` per run against training steps (x='steps') or training compute (x='compute')."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for r in sorted(runs, key=lambda r: r.stats.get("gflops") or 0):
        s = series(r.records, key)
        if not s:
            continue
        if x == "compute":
            g, b = r.stats.get("gflops"), r.config.get("batch_size")
            if g is None or b is None:
                continue
            xs = [g * b * step * 3 for step, _ in s]
        else:
            xs = [step for step, _ in s]
        label = r.name + (
            f" ({r.stats['gflops']:.3g} Gflops)" if r.stats.get("gflops") is not None else ""
        )
        ax.plot(xs, [v for _, v in s], marker="o" if len(s) < 30 else None, ms=3, label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(
        "training steps"
        if x == "steps"
        else "training compute (Gflop = Gflops x batch x steps x 3)"
    )
    ax.set_ylabel(ylabel or key)
    if x == "compute":
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_vs_gflops(rows: list[dict], metric: str, path: str) -> Optional[str]:
    pts = [
        (r["gflops"], r[f"{metric}_final"], r["run"], r.get("patch"))
        for r in rows
        if r.get("gflops") is not None and r.get(f"{metric}_final") is not None
    ]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for patch in sorted(
        {p[3] for p in pts}, key=lambda x: (x is None, x)
    ):  # one line per patch size
        group = sorted(p for p in pts if p[3] == patch)
        ax.plot(
            [p[0] for p in group],
            [p[1] for p in group],
            marker="o",
            ms=5,
            label=f"patch {patch}" if patch is not None else "runs",
        )
    for g, v, name, _ in pts:
        ax.annotate(name, (g, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("Gflops (forward, one image)")
    steps = sorted(
        {r.get(f"{metric}_final_step") for r in rows if r.get(f"{metric}_final_step") is not None}
    )
    ax.set_ylabel(f"{metric}" + (f" at step {steps[0]}" if len(steps) == 1 else " (final)"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_samples(runs: list[RunData], path: str) -> Optional[str]:
    with_samples = [r for r in sorted(runs, key=lambda r: r.stats.get("gflops") or 0) if r.samples]
    if not with_samples:
        return None
    from PIL import Image

    plt = _plt()
    n = len(with_samples)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, with_samples):
        with _path(r.samples).open("rb") as f:
            image = Image.open(f)
            image.load()
        if image.mode in ("L", "I", "I;16", "F"):
            ax.imshow(image.convert("L"), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image.convert("RGB"), interpolation="nearest")
        m = re.search(r"(\d+)", r.samples.rsplit("/", 1)[-1])
        ax.set_title(f"{r.name}" + (f" @ {int(m.group(1))}" if m else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def build_report(
    root: str,
    out: str,
    *,
    metric: str = "auto",
    names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    flops: bool = True,
    log=print,
) -> dict:
    runs = [load_run(root, n) for n in discover(root, names)]
    if flops:
        for r in runs:
            try:
                r.stats = model_stats(r.config)
            except Exception as e:  # a config this version cannot build: report without cost
                log(f"warning: no Gflops for {r.name}: {type(e).__name__}: {e}")
    runs.sort(key=lambda r: (r.stats.get("gflops") or 0, r.name))
    metric = pick_metric(runs, metric)
    rows = [summarize(r, metric) for r in runs]
    os.makedirs(out, exist_ok=True)
    files = {"csv": os.path.join(out, "scaling.csv"), "md": os.path.join(out, "scaling.md")}
    write_csv(rows, files["csv"])
    with open(files["md"], "w") as f:
        f.write(
            markdown(rows, metric, title or f"Scaling: {os.path.basename(os.path.abspath(root))}")
        )
    plots = {
        "loss_vs_steps": plot_series(
            runs, "loss", os.path.join(out, "loss_vs_steps.png"), log_y=True
        )
    }
    if metric:
        plots["metric_vs_steps"] = plot_series(
            runs, metric, os.path.join(out, f"{metric}_vs_steps.png")
        )
        plots["metric_vs_gflops"] = plot_vs_gflops(
            rows, metric, os.path.join(out, f"{metric}_vs_gflops.png")
        )
        plots["metric_vs_compute"] = plot_series(
            runs, metric, os.path.join(out, f"{metric}_vs_compute.png"), x="compute"
        )
    plots["samples"] = plot_samples(runs, os.path.join(out, "samples.png"))
    files.update({k: v for k, v in plots.items() if v})
    return {"rows": rows, "metric": metric, "files": files}


def build_parser() -> common.Parser:
    p = common.Parser(prog="python -m launch.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="the sweep directory, local or gs:// (required)")
    p.add_argument("--runs", help="comma-separated run names (default: every run under --root)")
    p.add_argument(
        "--metric",
        default="auto",
        help="metric key in the runs' jsonl files, e.g. fid or fd_digits "
        "(default auto: fid, else fd_digits, else none)",
    )
    p.add_argument(
        "--out", help="local output directory (default ROOT/report; report/<name> for a gs:// root)"
    )
    p.add_argument("--title", help="title of the Markdown table")
    p.add_argument(
        "--no_flops", action="store_true", help="skip Gflops and parameter counts (no JAX)"
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.root:
        raise LaunchError("--root is required (the sweep directory).")
    names = [n.strip() for n in args.runs.split(",") if n.strip()] if args.runs else None
    if args.out and common.is_gcs(args.out):
        raise LaunchError(
            "--out must be a local directory (copy it to a bucket afterwards if needed)."
        )
    out = args.out or (
        os.path.join("report", args.root.rstrip("/").rsplit("/", 1)[-1])
        if common.is_gcs(args.root)
        else os.path.join(args.root, "report")
    )
    result = build_report(
        args.root, out, metric=args.metric, names=names, title=args.title, flops=not args.no_flops
    )
    if result["metric"] is None:
        print(
            "no metric found (looked for "
            + ", ".join(AUTO_METRICS)
            + "); the table has losses only"
        )
    print_report(result)
    return 0


def print_report(result: dict) -> None:
    """The report's Markdown table, then where each of its files went."""
    with open(result["files"]["md"]) as f:
        print(f.read())
    for kind, path in result["files"].items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    common.main_guard(main)()
