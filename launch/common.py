"""What the launchers share: one-line user errors, workdir and override validation, printing
commands for --dry_run, and running a command with its output streamed and tee'd to a file."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Callable, Iterable, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]

_GCS = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(/.*)?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class LaunchError(Exception):
    """A user error: shown as one line on stderr, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (`error: ...`, exit 1) instead of usage + message."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def main_guard(
    main: Callable[[Optional[Sequence[str]]], int],
) -> Callable[[Optional[Sequence[str]]], None]:
    """Wraps a CLI's main: LaunchError -> one line on stderr and exit 1; Ctrl-C -> exit 130."""

    def wrapped(argv: Optional[Sequence[str]] = None) -> None:
        try:
            rc = main(argv)
        except LaunchError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # output piped into `head` and the like
            sys.stderr.close()
            sys.exit(0)
        sys.exit(rc or 0)

    return wrapped


def split_passthrough(argv: Optional[Sequence[str]]) -> tuple[list[str], list[str]]:
    """(launcher arguments, arguments after `--` that go to dit_jax.main unchanged)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def validate_workdir(
    workdir: Optional[str],
    *,
    multi_host: bool = False,
    absolute: bool = False,
    what: str = "workdir",
) -> str:
    """A gs://bucket/path or a local path. Local paths are refused when several hosts write
    (their disks are not shared); other URL schemes are refused."""
    if not workdir:
        raise LaunchError(f"--{what} is required (a gs://bucket/path or a local directory).")
    if is_gcs(workdir):
        m = _GCS.match(workdir.rstrip("/"))
        if not m or not (m.group(2) or "").strip("/"):
            raise LaunchError(
                f"--{what} {workdir!r} is not a valid gs://bucket/path (give a bucket and a path in it)."
            )
        return workdir.rstrip("/")
    if _SCHEME.match(workdir):
        raise LaunchError(f"--{what} {workdir!r}: only gs:// paths and local paths are supported.")
    if multi_host:
        raise LaunchError(
            f"--{what} {workdir!r} is a local path, but the slice has several hosts that do not share "
            f"a disk: use a gs://bucket/path."
        )
    return os.path.abspath(os.path.expanduser(workdir)) if absolute else workdir


def config_overrides(settings: Iterable[str]) -> list[str]:
    """['num_train_steps=400000', 'model.remat=True'] -> ['--config.num_train_steps=400000', ...]."""
    out = []
    for s in settings or ():
        key, sep, value = s.partition("=")
        key = key.strip()
        if key.startswith("config."):
            key = key[len("config.") :]
        if not sep or not _KEY.match(key):
            raise LaunchError(
                f"--set {s!r}: expected KEY=VALUE with a config key such as num_train_steps or "
                f"model.remat."
            )
        out.append(f"--config.{key}={value}")
    return out


def parse_env(settings: Iterable[str]) -> dict[str, str]:
    env = {}
    for s in settings or ():
        key, sep, value = s.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise LaunchError(f"--env {s!r}: expected NAME=VALUE.")
        env[key] = value
    return env


def check_config_file(config: Optional[str], *, relative_to_repo: bool = False) -> str:
    """The training config file must exist (relative paths: from the repository root when the
    command runs there, e.g. on a TPU VM, else from the current directory or the repository)."""
    if not config:
        raise LaunchError("--config is required, e.g. --config=configs/xl2.py.")
    path = config.split(":", 1)[0]
    if relative_to_repo:
        if os.path.isabs(path):
            raise LaunchError(
                f"--config {config!r} must be a path inside the repository (e.g. configs/xl2.py): "
                f"the command runs on other machines from the repository root."
            )
        if not (REPO / path).is_file():
            raise LaunchError(f"--config {config!r} does not exist in {REPO}.")
        return config
    if not os.path.isabs(path) and (REPO / path).is_file():
        return config  # the training command runs from the repository root
    if not os.path.isfile(path):
        raise LaunchError(f"--config {config!r} does not exist.")
    return os.path.abspath(path) + config[len(path) :]


def train_command(
    python: str, config: str, workdir: str, overrides: Sequence[str] = (), extra: Sequence[str] = ()
) -> list[str]:
    """python -m dit_jax.main --config=... --workdir=... --config.k=v ..."""
    return [
        python,
        "-m",
        "dit_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
        *extra,
    ]


def show(cmd: Sequence[str] | str) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def print_dry(cmd: Sequence[str] | str, env: Optional[dict] = None) -> None:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    print((prefix + " " if prefix else "") + show(cmd))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def stream(
    cmd: Sequence[str],
    log_file: Optional[str] = None,
    env: Optional[dict] = None,
    cwd: Optional[str] = None,
) -> int:
    """Runs `cmd`, printing its output (stdout and stderr together) as it comes and appending it
    to `log_file`; returns the exit status."""
    full_env = None if env is None else {**os.environ, **env}
    log = None
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        log = open(log_file, "a", buffering=1)
    try:
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                text=True,
                bufsize=1,
                errors="replace",
            )
        except FileNotFoundError:
            raise LaunchError(f"{cmd[0]!r} was not found; is it installed and on PATH?") from None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if log:
                    log.write(line)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        return proc.wait()
    finally:
        if log:
            log.close()


def run_checked(
    cmd: Sequence[str],
    log_file: Optional[str] = None,
    env: Optional[dict] = None,
    cwd: Optional[str] = None,
) -> None:
    rc = stream(cmd, log_file, env, cwd)
    if rc:
        raise LaunchError(f"command failed with exit status {rc}: {show(cmd)}")


# ----------------------------------------------------------------------------------------
# Pre-flight: compile the plan for the target before anything is created or started
# ----------------------------------------------------------------------------------------


def plan_command(
    python: str, config: str, topology: str, overrides: Sequence[str] = ()
) -> list[str]:
    """python -m dit_jax.plan --config=... --topology=... --json --config.k=v ... (only the
    --config.* overrides travel; other training flags mean nothing to the plan)."""
    return [
        python,
        "-m",
        "dit_jax.plan",
        f"--config={config}",
        f"--topology={topology}",
        "--json",
        *[o for o in overrides if o.startswith("--config.")],
    ]


def preflight(
    config: str,
    topology: str,
    overrides: Sequence[str] = (),
    *,
    python: Optional[str] = None,
    what: str = "",
) -> dict:
    """Compiles the train step for `topology` in a subprocess (dit_jax.plan --json; this
    process needs no libtpu), prints its verdict as one line and returns the plan. Raises
    LaunchError when it does not fit or the plan cannot be made."""
    cmd = plan_command(python or sys.executable, config, topology, overrides)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # compile-only: never grab a local accelerator
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=str(REPO), env=env, errors="replace"
    )
    plan = None
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                plan = json.loads(line)
            except ValueError:
                pass
            break
    label = f"pre-flight{' ' + what if what else ''} ({topology})"
    if plan is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LaunchError(
            f"{label}: the plan failed: {last.removeprefix('error: ')} "
            f"(--no_preflight skips the check)"
        )
    print(f"{label}: {plan_verdict(plan)}", flush=True)
    if not plan["fits"]:
        raise LaunchError(
            f"{label}: does not fit: {plan_verdict(plan)}; try python -m "
            "dit_jax.plan --search (--no_preflight skips the check)"
        )
    return plan


def plan_verdict(plan: dict) -> str:
    """One line: fits or not, per-chip peak against HBM, XLA's estimate."""
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "?"  # noqa: E731
    if not plan["fits"]:
        need = plan.get("required_bytes_per_device") or plan.get("peak_bytes_per_device")
        avail = plan.get("available_bytes_per_device") or plan["hbm_bytes_per_device"]
        return f"does NOT fit: needs {gib(need)} of {gib(avail)} HBM per chip"
    out = (
        f"fits: peak {gib(plan['peak_bytes_per_device'])} of "
        f"{gib(plan['hbm_bytes_per_device'])} HBM per chip"
    )
    ips = plan.get("estimated_images_per_second_per_device")
    if ips:
        out += f"; compiler estimate {ips:.1f} images/s per chip"
    return out
