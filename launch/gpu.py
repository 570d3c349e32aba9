"""GPU launcher: one node (one process driving all its GPUs) or several nodes through SLURM.

  python -m launch.gpu local --config=configs/xl2.py --workdir=/ckpt/xl2 --set batch_size=256
  python -m launch.gpu slurm --config=configs/xl2.py --workdir=/shared/ckpt/xl2 --nodes=4 \\
      --gpus_per_node=8 --time=48:00:00 --partition=gpu --account=my-account \\
      --setup='source .venv/bin/activate'

`slurm` writes an sbatch script (printed with --dry_run) whose body runs
`srun python -m dit_jax.main ...`; dit_jax.main initialises jax.distributed from the SLURM
environment when the job has more than one task. Tasks: one per GPU (default; JAX gives each
process the GPU of its SLURM_LOCALID) or one per node (the script exports JAX_LOCAL_DEVICE_IDS so
that each process drives all the GPUs of its node). The job gets SIGTERM --signal_seconds before
its time limit; training saves a checkpoint on it, and resubmitting the same script resumes.

With --gpu_type (h100, h200) both first compile the train step for that node shape
(python -m dit_jax.plan --topology=<nodes>x<gpu_type>x<gpus per node>, in a subprocess, no GPU
needed; the `plan-gpu` extra) and stop with one line when it does not fit in the GPUs' memory;
the dry run prints that verdict too (--no_preflight skips it).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Optional, Sequence

from launch import common
from launch.common import LaunchError

#: GPU models dit_jax.plan can compile for (planning.GPUS)
GPU_TYPES = ("h100", "h200")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
#: variables that would make a single local process wait for others in jax.distributed
_MULTIPROCESS_ENV = ("SLURM_NTASKS", "SLURM_NPROCS", "JAX_COORDINATOR_ADDRESS")


def local_command(
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    extra: Sequence[str] = (),
    *,
    python: Optional[str] = None,
    gpus: Optional[str] = None,
    env: Optional[dict] = None,
) -> tuple[dict, list[str]]:
    """(environment to set, command) for one process on this machine's GPUs."""
    run_env = dict(env or {})
    if gpus:
        if not re.match(r"^\d+(,\d+)*$", gpus):
            raise LaunchError(f"--gpus {gpus!r}: expected GPU indices such as 0,1,2,3.")
        run_env["CUDA_VISIBLE_DEVICES"] = gpus
    return run_env, common.train_command(
        python or sys.executable, config, workdir, overrides, extra
    )


def slurm_script(
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    extra: Sequence[str] = (),
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks: str = "per_gpu",
    time: str = "24:00:00",
    partition: Optional[str] = None,
    account: Optional[str] = None,
    job_name: str = "dit",
    cpus_per_task: Optional[int] = None,
    log_dir: str = "slurm/logs",
    setup: Sequence[str] = (),
    python: str = "python",
    chdir: Optional[str] = None,
    signal_seconds: int = 120,
    env: Optional[dict] = None,
    sbatch_extra: Sequence[str] = (),
) -> str:
    """The sbatch script for a SLURM job running training on `nodes` x `gpus_per_node` GPUs."""
    if nodes < 1 or gpus_per_node < 1:
        raise LaunchError("--nodes and --gpus_per_node must be positive.")
    if tasks not in ("per_gpu", "per_node"):
        raise LaunchError(f"--tasks must be per_gpu or per_node, got {tasks!r}.")
    if not _TIME.match(time):
        raise LaunchError(f"--time {time!r}: expected a SLURM time such as 24:00:00 or 2-00:00:00.")
    if not re.match(r"^[A-Za-z0-9_.-]+$", job_name):
        raise LaunchError(f"--job_name {job_name!r}: use letters, digits, '.', '_' and '-'.")
    ntasks = gpus_per_node if tasks == "per_gpu" else 1
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={ntasks}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time}",
    ]
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines.append(f"#SBATCH --output={log_dir}/%x-%j.out")
    if signal_seconds:
        lines.append(
            f"#SBATCH --signal=TERM@{signal_seconds}"
        )  # to the tasks: checkpoint before the time limit
    lines += [f"#SBATCH {s}" for s in sbatch_extra]
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(chdir or str(common.REPO))}", *setup]
    for k, v in (env or {}).items():
        lines.append(f"export {k}={shlex.quote(v)}")
    if tasks == "per_node" and nodes * ntasks > 1:
        # JAX's SLURM detection pins a process to the GPU of its SLURM_LOCALID; one process per node drives all.
        lines.append(
            f"export JAX_LOCAL_DEVICE_IDS={','.join(str(i) for i in range(gpus_per_node))}"
        )
    train = common.show(common.train_command(python, config, workdir, overrides, extra))
    lines += [
        f'echo "job $SLURM_JOB_ID: {nodes} node(s) x {ntasks} task(s) on $SLURM_JOB_NODELIST"',
        f"srun --kill-on-bad-exit=1 {train}",
        "",
    ]
    return "\n".join(lines)


def add_slurm_args(p, python_default: Optional[str] = "python") -> None:
    """SLURM options (shared with the sweep)."""
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument(
        "--tasks",
        choices=("per_gpu", "per_node"),
        default="per_gpu",
        help="one process per GPU (default) or one per node",
    )
    p.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--cpus_per_task", type=int, help="CPUs per task")
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)",
    )
    p.add_argument(
        "--python", default=python_default, help="python on the compute nodes (default python)"
    )
    p.add_argument("--chdir", help="directory the job runs in (default: this repository)")
    p.add_argument(
        "--log_dir", default="slurm/logs", help="where SLURM writes job output (default slurm/logs)"
    )
    p.add_argument(
        "--signal_seconds",
        type=int,
        default=120,
        help="SIGTERM this many seconds before the time limit (0: off)",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option, e.g. --sbatch=--qos=high (repeatable)",
    )


def slurm_kwargs(args) -> dict:
    return dict(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks=args.tasks,
        time=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        log_dir=os.path.abspath(args.log_dir),
        setup=args.setup,
        python=args.python or "python",
        chdir=args.chdir,
        signal_seconds=args.signal_seconds,
        sbatch_extra=args.sbatch,
    )


def submit(script: str, path: str, log_dir: str, dry_run: bool) -> list[str]:
    """Writes the script to `path` and submits it with sbatch (dry run: prints both)."""
    cmd = ["sbatch", path]
    if dry_run:
        print(f"# {path}")
        print(script)
        common.print_dry(cmd)
        return cmd
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}", file=sys.stderr)
    common.run_checked(cmd)
    return cmd


def build_parser() -> common.Parser:
    parser = common.Parser(prog="python -m launch.gpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{local,slurm}", parser_class=common.Parser)
    sub.required = True
    for cmd, help_ in (
        ("local", "train on this machine's GPUs (one process)"),
        ("slurm", "write an sbatch script for one or more nodes and submit it"),
    ):
        p = sub.add_parser(cmd, help=help_, description=help_)
        p.add_argument("--config", help="training config, e.g. configs/xl2.py (required)")
        p.add_argument("--workdir", help="gs://bucket/path or a local directory (required)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="config override (repeatable)",
        )
        p.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="environment for training",
        )
        p.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
        p.add_argument(
            "--gpu_type",
            choices=GPU_TYPES,
            help="the GPUs' model: compile the plan for them first (python -m dit_jax.plan)",
        )
        p.add_argument(
            "--no_preflight", action="store_true", help="with --gpu_type: do not compile the plan"
        )
        if cmd == "local":
            p.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3 (default: all)")
            p.add_argument(
                "--python", default=sys.executable, help="python to run (default: this one)"
            )
            p.add_argument("--log_file", help="also append the output to this file")
        else:
            add_slurm_args(p)
            p.add_argument("--job_name", default="dit", help="job name (default dit)")
            p.add_argument(
                "--script",
                help="where to write the sbatch script (default slurm/<job_name>.sbatch)",
            )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, extra = common.split_passthrough(argv)
    args = build_parser().parse_args(own)
    config = common.check_config_file(args.config)
    overrides = common.config_overrides(args.set)
    env = common.parse_env(args.env)
    if args.command == "local":
        workdir = common.validate_workdir(args.workdir, absolute=True)
        if args.gpu_type and not args.no_preflight:
            count = len(args.gpus.split(",")) if args.gpus else 8
            common.preflight(config, f"{args.gpu_type}x{count}", [*overrides, *extra])
        run_env, cmd = local_command(
            config, workdir, overrides, extra, python=args.python, gpus=args.gpus, env=env
        )
        unset = [k for k in _MULTIPROCESS_ENV if k in os.environ]
        if args.dry_run:
            common.print_dry((["env", *(f"-u{k}" for k in unset)] if unset else []) + cmd, run_env)
            return 0
        for k in unset:  # one process: never wait for other processes of an enclosing allocation
            os.environ.pop(k)
        print(f"+ {common.show(cmd)}", file=sys.stderr)
        return common.stream(cmd, args.log_file, env=run_env, cwd=str(common.REPO))
    workdir = common.validate_workdir(args.workdir, absolute=True)
    if args.gpu_type and not args.no_preflight:
        node = f"{args.gpu_type}x{args.gpus_per_node}"
        common.preflight(
            config, node if args.nodes == 1 else f"{args.nodes}x{node}", [*overrides, *extra]
        )
    if args.nodes > 1 and not common.is_gcs(workdir):
        common.warn(
            f"{workdir} must be on a file system that all {args.nodes} nodes share (or use gs://)."
        )
    script = slurm_script(
        config, workdir, overrides, extra, job_name=args.job_name, env=env, **slurm_kwargs(args)
    )
    submit(
        script,
        args.script or os.path.join("slurm", f"{args.job_name}.sbatch"),
        args.log_dir,
        args.dry_run,
    )
    return 0


if __name__ == "__main__":
    common.main_guard(main)()
