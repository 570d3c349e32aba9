"""Model sweeps: the same training budget for every model, each run in ROOT/<run name>.

  # the paper's 12 models (S/B/L/XL x 2/4/8), one after the other on this machine
  python -m launch.sweep --root=/ckpt/sweep --local --set num_train_steps=400000
  # a subset, fanned out as SLURM jobs (or --launcher=tpu: one after the other on a TPU VM)
  python -m launch.sweep --root=gs://bucket/sweep --models=S/2,B/2,L/2,XL/2 --launcher=slurm \\
      --nodes=1 --gpus_per_node=8 --partition=gpu --dry_run
  # a custom grid over any config keys on another base config (the CPU toy study)
  python -m launch.sweep --root=workdir/toy --config=configs/demo.py --local \\
      --grid model.hidden_size=64,128,192 --grid model.patch_size=2,4 --set num_train_steps=2000

Resumable: a run whose final step is reached (its checkpoints, or the DONE marker the sweep
writes after it) is skipped; an interrupted one is started again and dit_jax.main resumes it
from its latest checkpoint. --dry_run prints each run's status and command and runs nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from launch import common, gpu, tpu
from launch.common import LaunchError

SIZES = ("S", "B", "L", "XL")
PATCHES = (2, 4, 8)
MODELS = tuple(f"{s}/{p}" for s in SIZES for p in PATCHES)
DONE_FILE = "DONE"
#: short names of grid keys in run names (model.hidden_size=128, model.patch_size=2 -> w128-p2)
ALIASES = {
    "model.hidden_size": "w",
    "model.depth": "d",
    "model.patch_size": "p",
    "model.num_heads": "h",
    "batch_size": "bs",
    "num_train_steps": "steps",
    "optimizer.learning_rate": "lr",
}


@dataclass
class Run:
    name: str  # directory name under the root, e.g. S-2 or w128-p2
    overrides: list[str]  # --config.k=v for this run (before the sweep-wide --set ones)
    workdir: str = ""
    status: str = ""
    info: dict = field(default_factory=dict)


def model_runs(models: Sequence[str]) -> list[Run]:
    runs = []
    for m in models:
        m = m.strip()
        name = m[4:] if m.startswith("DiT-") else m
        size, _, patch = name.partition("/")
        if size not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
            raise LaunchError(f"--models: unknown model {m!r}; known: {', '.join(MODELS)}.")
        runs.append(Run(f"{size}-{patch}", [f"--config.model.name=DiT-{size}/{patch}"]))
    return runs


def grid_runs(grid: Sequence[str]) -> list[Run]:
    """['model.hidden_size=64,128', 'model.patch_size=2,4'] -> the 4 combinations."""
    axes = []
    for g in grid:
        key, sep, values = g.partition("=")
        key = key.strip().removeprefix("config.")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not vals:
            raise LaunchError(
                f"--grid {g!r}: expected KEY=V1,V2,... e.g. model.hidden_size=64,128,192."
            )
        common.config_overrides([f"{key}={vals[0]}"])  # validates the key
        axes.append((key, vals))
    runs = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        parts = [f"{ALIASES.get(k, k.rsplit('.', 1)[-1])}{v}" for (k, _), v in zip(axes, combo)]
        runs.append(
            Run(
                "-".join(parts).replace("/", "_"),
                [f"--config.{k}={v}" for (k, _), v in zip(axes, combo)],
            )
        )
    return runs


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if common.is_gcs(root) else os.path.join(root, name)


# ----------------------------------------------------------------------------------------
# Run state (local directories, or gs:// through etils.epath when it can reach the bucket)
# ----------------------------------------------------------------------------------------


def _path(p: str):
    if common.is_gcs(p):
        from etils import epath

        return epath.Path(p)
    import pathlib

    return pathlib.Path(p)


def checkpoint_steps(workdir: str) -> list[int]:
    d = _path(join(workdir, "checkpoints"))
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def target_steps(workdir: str, overrides: Sequence[str]) -> Optional[int]:
    """The run's final step: a num_train_steps override, else what its saved config says."""
    for o in reversed(list(overrides)):
        if o.startswith("--config.num_train_steps="):
            try:
                return int(o.split("=", 1)[1].replace("_", ""))
            except ValueError:
                raise LaunchError(f"num_train_steps must be an integer: {o}") from None
    cfg = _path(join(workdir, "config.json"))
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())["num_train_steps"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def run_state(workdir: str, overrides: Sequence[str]) -> tuple[str, dict]:
    """('done' | 'resume' | 'new' | 'unknown', details). Finished: the DONE marker records a step
    >= the target, or a checkpoint at (or past) the target step exists."""
    try:
        target = target_steps(workdir, overrides)
        marker = _path(join(workdir, DONE_FILE))
        if marker.is_file():
            try:
                step = int(json.loads(marker.read_text())["step"])
            except (ValueError, KeyError, TypeError):
                step = None
            if step is not None and (target is None or step >= target):
                return "done", {"step": step, "target": target}
        steps = checkpoint_steps(workdir)
        latest = steps[-1] if steps else None
        if latest is not None and target is not None and latest >= target:
            return "done", {"step": latest, "target": target}
        if latest is not None:
            return "resume", {"step": latest, "target": target}
        return "new", {"target": target}
    except LaunchError:
        raise
    except (
        Exception
    ) as e:  # e.g. no credentials for a bucket: let training decide (it resumes by itself)
        return "unknown", {"why": f"{type(e).__name__}: {e}"}


def mark_done(workdir: str, step: int) -> None:
    _path(join(workdir, DONE_FILE)).write_text(
        json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
    )


def plan(
    root: str, runs: list[Run], overrides: Sequence[str], check_gcs: bool = False
) -> list[Run]:
    for r in runs:
        r.workdir = join(root, r.name)
        if common.is_gcs(root) and not check_gcs:
            r.status, r.info = "unknown", {"why": "gs:// not checked without --check_gcs"}
        else:
            r.status, r.info = run_state(r.workdir, [*r.overrides, *overrides])
    return runs


def describe(r: Run) -> str:
    i = r.info
    if r.status == "done":
        return f"done (step {i['step']})"
    if r.status == "resume":
        return f"resume from step {i['step']}" + (f" of {i['target']}" if i.get("target") else "")
    if r.status == "unknown":
        return f"state unknown ({i['why']}); training resumes by itself if it has checkpoints"
    return "new"


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def build_parser() -> common.Parser:
    p = common.Parser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--root", help="sweep directory: each run in ROOT/<name> (gs:// or local; required)"
    )
    p.add_argument(
        "--config",
        default="configs/default.py",
        help="base config (default configs/default.py, the paper recipe)",
    )
    p.add_argument("--models", help=f"comma-separated models (default all 12: {','.join(MODELS)})")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a config key over values instead of --models (repeatable: the product)",
    )
    p.add_argument("--only", help="comma-separated run names to include (e.g. S-2,B-2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every run, e.g. num_train_steps=400000 (repeatable)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run here, one after the other")
    p.add_argument(
        "--num_processes",
        type=int,
        default=1,
        help="--local: run each as this many processes (launch.local, multi-host on one machine)",
    )
    p.add_argument(
        "--devices_per_process",
        type=int,
        default=0,
        help="--local with --num_processes: CPU devices per process (0: launch.local's default)",
    )
    mode.add_argument(
        "--launcher",
        choices=("tpu", "slurm"),
        help="run through launch.tpu (one after the other on one TPU VM) or submit SLURM jobs",
    )
    p.add_argument(
        "--dry_run", action="store_true", help="print each run's state and command, run nothing"
    )
    p.add_argument(
        "--keep_going", action="store_true", help="go on with the next run when one fails"
    )
    p.add_argument(
        "--check_gcs",
        action="store_true",
        help="read run states from a gs:// root to skip finished "
        "runs (needs bucket access from here)",
    )
    g = p.add_argument_group("--launcher=tpu")
    tpu.add_target_args(g)
    tpu.add_run_args(g)
    g = p.add_argument_group("--launcher=slurm")
    gpu.add_slurm_args(g, python_default=None)  # --python: also for --local (default: this python)
    p.add_argument(
        "--script_dir", default="slurm", help="where sbatch scripts are written (default slurm/)"
    )
    return p


def selected_runs(args) -> list[Run]:
    if args.grid and args.models:
        raise LaunchError("give --models or --grid, not both (a grid can include model.name).")
    runs = (
        grid_runs(args.grid)
        if args.grid
        else model_runs((args.models or ",".join(MODELS)).split(","))
    )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise LaunchError(f"run names collide: {names}")
    if args.only:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise LaunchError(
                f"--only: no run named {', '.join(unknown)}; runs: {', '.join(names)}."
            )
        runs = [r for r in runs if r.name in only]
    return runs


def run_local(
    r: Run,
    config: str,
    overrides: list[str],
    extra: list[str],
    python: str,
    dry_run: bool,
    num_processes: int = 1,
    devices_per_process: int = 0,
) -> bool:
    cmd = common.train_command(python, config, r.workdir, [*r.overrides, *overrides], extra)
    if num_processes > 1:  # a local multi-host run: launch.local starts the processes
        cmd = [
            python,
            "-m",
            "launch.local",
            f"--num_processes={num_processes}",
            *([f"--devices_per_process={devices_per_process}"] if devices_per_process else []),
            "--",
            *cmd,
        ]
    if dry_run:
        common.print_dry(cmd)
        return True
    print(f"\n=== {r.name}: {describe(r)} -> {r.workdir}", flush=True)
    rc = common.stream(cmd, join(r.workdir, "train.log"), cwd=str(common.REPO))
    state, info = run_state(r.workdir, [*r.overrides, *overrides])
    if rc == 0 and state == "done":
        mark_done(r.workdir, info["step"])
        return True
    why = f"exit status {rc}" if rc else f"stopped before its final step ({state}, {info})"
    print(f"=== {r.name}: {why}", file=sys.stderr)
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, extra = common.split_passthrough(argv)
    args = build_parser().parse_args(own)
    if not (args.local or args.launcher):
        raise LaunchError("choose where runs go: --local, --launcher=tpu or --launcher=slurm.")
    if not args.root:
        raise LaunchError(
            "--root is required (the sweep directory: gs://bucket/path or a local path)."
        )
    multi_host = (
        args.launcher == "tpu" and bool(args.accelerator) and tpu.is_multi_host(args.accelerator)
    )
    root = common.validate_workdir(
        args.root, multi_host=multi_host, absolute=args.launcher != "tpu", what="root"
    )
    config = common.check_config_file(args.config, relative_to_repo=args.launcher == "tpu")
    overrides = common.config_overrides(args.set)
    name = tpu.check_name(args.name) if args.launcher == "tpu" else None
    runs = plan(root, selected_runs(args), [*overrides, *extra], check_gcs=args.check_gcs)
    todo = [r for r in runs if r.status != "done"]
    print(f"sweep {root}: {len(runs)} run(s), {len(runs) - len(todo)} done, {len(todo)} to run")
    for r in runs:
        print(f"  {r.name:<12} {describe(r)}")
    if args.launcher == "tpu":
        if not common.is_gcs(root) and not args.accelerator:
            common.warn(
                f"--root {root!r} is local to the TPU VM; on a multi-host slice use gs:// (pass "
                f"--accelerator to have this checked)."
            )
    if args.launcher == "tpu" and args.accelerator and not args.no_preflight:
        for r in todo:  # every run's plan before any run starts
            tpu.preflight(config, args.accelerator, [*r.overrides, *overrides, *extra], what=r.name)
    failed = []
    for r in todo:
        if args.dry_run:
            print(f"# {r.name}")
        if args.local:
            ok = run_local(
                r,
                config,
                overrides,
                extra,
                args.python or sys.executable,
                args.dry_run,
                args.num_processes,
                args.devices_per_process,
            )
        elif args.launcher == "tpu":
            cmds = tpu.run_commands(
                name,
                config,
                r.workdir,
                [*r.overrides, *overrides],
                extra,
                zone=args.zone,
                project=args.project,
                coordinator=not args.no_coordinator,
                env=common.parse_env(args.env),
                log_name=r.name,
            )
            ok = True
            for cmd in cmds:
                if args.dry_run:
                    common.print_dry(cmd)
                else:
                    print(f"\n=== {r.name}: {describe(r)} -> {r.workdir}", flush=True)
                    ok = (
                        common.stream(cmd, os.path.join("logs", f"tpu-{name}-{r.name}.log")) == 0
                        and ok
                    )
        else:
            kwargs = gpu.slurm_kwargs(args)
            script = gpu.slurm_script(
                config,
                r.workdir,
                [*r.overrides, *overrides],
                extra,
                job_name=f"dit-{r.name}",
                **kwargs,
            )
            gpu.submit(
                script,
                os.path.join(args.script_dir, f"dit-{r.name}.sbatch"),
                kwargs["log_dir"],
                args.dry_run,
            )
            ok = True
        if not ok:
            failed.append(r.name)
            if not args.keep_going:
                raise LaunchError(
                    f"run {r.name} failed; fix it and rerun the sweep (finished runs are skipped), "
                    f"or pass --keep_going."
                )
    if failed:
        raise LaunchError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    common.main_guard(main)()
