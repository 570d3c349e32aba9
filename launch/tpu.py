"""Cloud TPU VM launcher: create a TPU (on demand, spot, or through a queued resource), install
the project on every worker, run the same training command on all workers, read logs, delete.

  python -m launch.tpu create --name=dit --zone=us-central2-b --accelerator=v4-8
  python -m launch.tpu create --name=dit-pod --zone=us-central2-b --accelerator=v4-32 --queued --spot
  python -m launch.tpu setup --name=dit --zone=us-central2-b
  python -m launch.tpu run --name=dit --zone=us-central2-b --config=configs/xl2.py \\
      --workdir=gs://my-bucket/dit/xl2 --set batch_size=256
  python -m launch.tpu logs --name=dit --zone=us-central2-b --follow
  python -m launch.tpu delete --name=dit --zone=us-central2-b

Every subcommand takes --dry_run: it prints the exact gcloud commands and runs nothing.
`run --accelerator=...` first compiles the train step for that topology (python -m dit_jax.plan,
in a subprocess, no TPU needed) and stops with one line when it does not fit in HBM; the dry
run prints that verdict too (--no_preflight skips it).

Single-host TPUs (v4-8, v5p-8, v5litepod-8, v6e-8, ...) and pod slices (v4-32, v5litepod-16, ...)
are handled alike: `--worker=all` runs the command on every host at once. On a slice of several
hosts each worker exports JAX_COORDINATOR_ADDRESS (worker 0, read from the VM metadata) so that
dit_jax.main initialises jax.distributed; the workdir must then be a gs:// path (the hosts do
not share a disk).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
from typing import Optional, Sequence

from launch import common
from launch.common import LaunchError

#: accelerator generation -> default runtime (software) version for JAX
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}
_ACCELERATOR = re.compile(r"^([a-z0-9]+)-(\d+)$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")

REMOTE_DIR = "dit_jax"  # the project on each worker: ~/dit_jax
REMOTE_LOG_DIR = "dit_jax_logs"  # ~/dit_jax_logs/<log name>.log on each worker
COORDINATOR_PORT = 8482  # JAX's default port for Cloud TPU coordinators
#: exports JAX_COORDINATOR_ADDRESS=<worker 0>:port on hosts of a multi-host slice (the worker
#: list in the VM metadata has one entry per host; entries are 'host' or 'name:id:ip').
COORDINATOR_SNIPPET = (
    "EP=$(curl -s -H Metadata-Flavor:Google "
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints || true); "
    f'case "$EP" in *,*) W0=${{EP%%,*}}; export JAX_COORDINATOR_ADDRESS=${{W0##*:}}:{COORDINATOR_PORT};; esac'
)


def parse_accelerator(accelerator: str) -> tuple[str, str, int]:
    """'v4-32' -> ('v4-32', 'v4', 32); 'v5e-8' -> ('v5litepod-8', 'v5litepod', 8)."""
    m = _ACCELERATOR.match(accelerator or "")
    if not m:
        raise LaunchError(
            f"--accelerator {accelerator!r} is not an accelerator type such as v4-8, v5litepod-8 "
            f"or v6e-16."
        )
    gen, size = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen not in RUNTIME_VERSIONS:
        raise LaunchError(
            f"unknown TPU generation in --accelerator {accelerator!r}; known: "
            f"{', '.join(sorted(RUNTIME_VERSIONS))} (v5e is spelt v5litepod)."
        )
    if size < 1:
        raise LaunchError(f"--accelerator {accelerator!r}: the size must be positive.")
    return f"{gen}-{size}", gen, size


def is_multi_host(accelerator: str) -> bool:
    """More than one TPU VM host: every type above -8 (8 TensorCores for v2-v5p, 8 chips for v5e/v6e)."""
    return parse_accelerator(accelerator)[2] > 8


def default_runtime_version(accelerator: str) -> str:
    return RUNTIME_VERSIONS[parse_accelerator(accelerator)[1]]


def check_name(name: Optional[str]) -> str:
    if not name:
        raise LaunchError("--name is required (the TPU's name, e.g. --name=dit-v4).")
    if not _NAME.match(name):
        raise LaunchError(
            f"--name {name!r}: use lowercase letters, digits and hyphens, starting with a letter "
            f"(at most 63 characters)."
        )
    return name


def _location(zone: Optional[str], project: Optional[str]) -> list[str]:
    return ([f"--zone={zone}"] if zone else []) + ([f"--project={project}"] if project else [])


# ----------------------------------------------------------------------------------------
# Command builders (pure: used by the CLI, the sweep and the tests)
# ----------------------------------------------------------------------------------------


def create_commands(
    name: str,
    accelerator: str,
    *,
    zone: Optional[str] = None,
    project: Optional[str] = None,
    runtime_version: Optional[str] = None,
    spot: bool = False,
    queued: bool = False,
) -> list[list[str]]:
    accelerator = parse_accelerator(accelerator)[0]
    version = runtime_version or default_runtime_version(accelerator)
    if queued:
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            name,
            f"--node-id={name}",
            f"--accelerator-type={accelerator}",
            f"--runtime-version={version}",
        ]
    else:
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            name,
            f"--accelerator-type={accelerator}",
            f"--version={version}",
        ]
    cmd += _location(zone, project)
    if spot:
        cmd.append("--spot")
    return [cmd]


def ssh_command(
    name: str,
    remote: str,
    *,
    worker: str = "all",
    zone: Optional[str] = None,
    project: Optional[str] = None,
) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        name,
        *_location(zone, project),
        f"--worker={worker}",
        f"--command={remote}",
    ]


def setup_commands(
    name: str,
    *,
    zone: Optional[str] = None,
    project: Optional[str] = None,
    repo: Optional[str] = None,
    ref: Optional[str] = None,
    archive: Optional[str] = None,
    remote_dir: str = REMOTE_DIR,
) -> list[list[str]]:
    """Installs the project with the [tpu] extra on every worker: from a git URL (`repo`), or by
    copying this checkout's committed HEAD (git archive) to each worker."""
    install = f"cd ~/{remote_dir} && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'"
    if repo:
        checkout = f" && git -C ~/{remote_dir} checkout -q {shlex.quote(ref)}" if ref else ""
        remote = (
            f"(test -d ~/{remote_dir}/.git && git -C ~/{remote_dir} fetch -q origin || "
            f"git clone -q {shlex.quote(repo)} ~/{remote_dir}){checkout} && {install}"
        )
        return [ssh_command(name, remote, zone=zone, project=project)]
    archive = archive or os.path.join(tempfile.gettempdir(), "dit_jax-src.tar.gz")
    base = os.path.basename(archive)
    return [
        [
            "git",
            "-C",
            str(common.REPO),
            "archive",
            "--format=tar.gz",
            f"--output={archive}",
            ref or "HEAD",
        ],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            archive,
            f"{name}:~/",
            *_location(zone, project),
            "--worker=all",
        ],
        ssh_command(
            name,
            f"mkdir -p ~/{remote_dir} && tar -xzf ~/{base} -C ~/{remote_dir} && {install}",
            zone=zone,
            project=project,
        ),
    ]


def remote_train_command(
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    extra: Sequence[str] = (),
    *,
    log_name: str = "train",
    detach: bool = False,
    coordinator: bool = True,
    env: Optional[dict] = None,
    remote_dir: str = REMOTE_DIR,
) -> str:
    """The shell line each worker runs: training, its output appended to ~/dit_jax_logs/<log_name>.log."""
    train = common.show(common.train_command("python3", config, workdir, overrides, extra))
    log = f"~/{REMOTE_LOG_DIR}/{log_name}.log"
    parts = [f"cd ~/{remote_dir} || exit 1", f"mkdir -p ~/{REMOTE_LOG_DIR}"]
    if coordinator:
        parts.append(COORDINATOR_SNIPPET)
    parts += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    if detach:
        parts.append(
            f'nohup {train} >> {log} 2>&1 < /dev/null & echo "started on $(hostname): {log}"'
        )
        return "; ".join(parts)
    parts.append(f"{train} 2>&1 | tee -a {log}")
    return "; ".join(["set -o pipefail", *parts])


def run_commands(
    name: str,
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    extra: Sequence[str] = (),
    *,
    zone: Optional[str] = None,
    project: Optional[str] = None,
    **kwargs,
) -> list[list[str]]:
    return [
        ssh_command(
            name,
            remote_train_command(config, workdir, overrides, extra, **kwargs),
            zone=zone,
            project=project,
        )
    ]


def logs_commands(
    name: str,
    *,
    zone: Optional[str] = None,
    project: Optional[str] = None,
    worker: str = "0",
    lines: int = 100,
    follow: bool = False,
    log_name: str = "train",
) -> list[list[str]]:
    tail = f"tail -n {int(lines)}{' -F' if follow else ''} ~/{REMOTE_LOG_DIR}/{log_name}.log"
    return [ssh_command(name, tail, worker=worker, zone=zone, project=project)]


def delete_commands(
    name: str,
    *,
    zone: Optional[str] = None,
    project: Optional[str] = None,
    queued: bool = False,
    yes: bool = False,
) -> list[list[str]]:
    if queued:  # --force deletes the queued resource's TPU VMs too
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            name,
            *_location(zone, project),
            "--force",
        ]
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *_location(zone, project)]
    return [cmd + (["--quiet"] if yes else [])]


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def add_target_args(p, *, required_name: bool = True) -> None:
    """--name/--zone/--project (shared with the sweep)."""
    p.add_argument(
        "--name", required=False, help="TPU (node) name" + (" (required)" if required_name else "")
    )
    p.add_argument("--zone", help="zone, e.g. us-central2-b (default: gcloud's compute/zone)")
    p.add_argument("--project", help="GCP project (default: gcloud's core/project)")


def add_run_args(p) -> None:
    """Options of `run` that the sweep shares."""
    p.add_argument(
        "--accelerator",
        help="the TPU's accelerator type; when given, a local --workdir on a "
        "multi-host slice is refused",
    )
    p.add_argument(
        "--no_coordinator",
        action="store_true",
        help="do not export JAX_COORDINATOR_ADDRESS from the VM metadata on multi-host slices",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment on the workers",
    )
    p.add_argument(
        "--no_preflight",
        action="store_true",
        help="do not compile the plan for --accelerator first (python -m dit_jax.plan)",
    )


def build_parser() -> common.Parser:
    parser = common.Parser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(
        dest="command", metavar="{create,setup,run,logs,delete}", parser_class=common.Parser
    )
    sub.required = True

    def new(cmd, help_):
        p = sub.add_parser(cmd, help=help_, description=help_)
        add_target_args(p)
        p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        return p

    p = new("create", "create a TPU VM (or a queued resource for one)")
    p.add_argument(
        "--accelerator",
        default="v4-8",
        help="accelerator type: v4-8, v4-32, v5litepod-8 (v5e-8), v5p-8, v6e-8, ... (default v4-8)",
    )
    p.add_argument(
        "--runtime_version",
        help="TPU software version (default per generation: "
        + ", ".join(f"{g}: {v}" for g, v in RUNTIME_VERSIONS.items())
        + ")",
    )
    p.add_argument(
        "--spot", action="store_true", help="spot capacity (preemptible; training resumes on rerun)"
    )
    p.add_argument(
        "--queued",
        action="store_true",
        help="request through a queued resource (waits for capacity)",
    )

    p = new("setup", "install the project and its [tpu] extra on every worker")
    p.add_argument(
        "--repo",
        help="git URL to clone on the workers (default: copy this checkout's committed HEAD)",
    )
    p.add_argument("--ref", help="git ref to install (default: HEAD / the default branch)")

    p = new("run", "run the same training command on all workers (output streamed and tee'd)")
    p.add_argument(
        "--config", help="training config inside the repository, e.g. configs/xl2.py (required)"
    )
    p.add_argument(
        "--workdir", help="gs://bucket/path (required on multi-host slices) or a path on the VM"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable)",
    )
    add_run_args(p)
    p.add_argument(
        "--detach",
        action="store_true",
        help="start in the background on the workers and return (follow with `logs --follow`)",
    )
    p.add_argument(
        "--log_name",
        default="train",
        help="remote log ~/dit_jax_logs/<log_name>.log (default train)",
    )
    p.add_argument(
        "--log_file", help="local copy of the streamed output (default logs/tpu-<name>.log)"
    )

    p = new("logs", "show a worker's training log")
    p.add_argument("--worker", default="0", help="worker index, or 'all' (default 0)")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--log_name", default="train")

    p = new("delete", "delete the TPU VM (or its queued resource)")
    p.add_argument("--queued", action="store_true", help="delete the queued resource and its TPU")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


#: generations dit_jax.plan can compile for (v2/v3 are launched without a pre-flight)
PLANNED = ("v4", "v5p", "v5litepod", "v6e")


def preflight(config: str, accelerator: str, overrides, what: str = "") -> Optional[dict]:
    """The plan for the accelerator compiled first; LaunchError when it does not fit."""
    if parse_accelerator(accelerator)[1] not in PLANNED:
        common.warn(
            f"no pre-flight plan for {accelerator} (dit_jax.plan knows {', '.join(PLANNED)})"
        )
        return None
    return common.preflight(config, accelerator, overrides, what=what)


def execute(commands: list[list[str]], dry_run: bool, log_file: Optional[str] = None) -> int:
    for cmd in commands:
        if dry_run:
            common.print_dry(cmd)
        else:
            print(f"+ {common.show(cmd)}", file=sys.stderr)
            common.run_checked(cmd, log_file)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, extra = common.split_passthrough(argv)
    args = build_parser().parse_args(own)
    name = check_name(args.name)
    loc = dict(zone=args.zone, project=args.project)
    if extra and args.command != "run":
        raise LaunchError(f"arguments after -- are for `run` only: {' '.join(extra)}")
    if args.command == "create":
        return execute(
            create_commands(
                name,
                args.accelerator,
                runtime_version=args.runtime_version,
                spot=args.spot,
                queued=args.queued,
                **loc,
            ),
            args.dry_run,
        )
    if args.command == "setup":
        return execute(setup_commands(name, repo=args.repo, ref=args.ref, **loc), args.dry_run)
    if args.command == "run":
        multi = is_multi_host(args.accelerator) if args.accelerator else False
        config = common.check_config_file(args.config, relative_to_repo=True)
        workdir = common.validate_workdir(args.workdir, multi_host=multi)
        if not common.is_gcs(workdir) and not args.accelerator:
            common.warn(
                f"local --workdir {workdir!r} is on the TPU VM's own disk; on a multi-host slice use a "
                f"gs:// path (pass --accelerator to have this checked)."
            )
        overrides = common.config_overrides(args.set)
        if args.accelerator and not args.no_preflight:
            preflight(config, args.accelerator, [*overrides, *extra])
        cmds = run_commands(
            name,
            config,
            workdir,
            overrides,
            extra,
            detach=args.detach,
            coordinator=not args.no_coordinator,
            env=common.parse_env(args.env),
            log_name=args.log_name,
            **loc,
        )
        return execute(
            cmds, args.dry_run, None if args.detach else (args.log_file or f"logs/tpu-{name}.log")
        )
    if args.command == "logs":
        return execute(
            logs_commands(
                name,
                worker=args.worker,
                lines=args.lines,
                follow=args.follow,
                log_name=args.log_name,
                **loc,
            ),
            args.dry_run,
        )
    if args.command == "delete":
        return execute(delete_commands(name, queued=args.queued, yes=args.yes, **loc), args.dry_run)
    raise LaunchError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    common.main_guard(main)()
