"""N processes of one command on this machine, as one multi-process JAX run.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \\
      python -m dit_jax.main --config=configs/demo.py --workdir=/tmp/demo

Each process gets the coordinator (127.0.0.1 and a free port) in JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by `dit_jax.sharding.maybe_initialize_distributed`,
so every dit_jax command works unchanged), and with --devices_per_process that many CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count, JAX_PLATFORMS=cpu unless set). Output lines
are prefixed with the process id. SIGTERM and SIGINT are forwarded to every process (a second
SIGINT kills them); when a process fails, the others are stopped (SIGTERM, then SIGKILL after
--grace_s) and the launcher exits with the failing process's status (128 + signal when killed).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from launch import common


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: dict, process_id: int, num_processes: int, port: int, devices_per_process: Optional[int]
) -> dict:
    """The environment of process `process_id`."""
    env = {
        **base,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        "PYTHONUNBUFFERED": "1",
    }
    if devices_per_process:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = " ".join(
            flags.split() + [f"--xla_force_host_platform_device_count={devices_per_process}"]
        )
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + signal for a process killed by one."""
    return 128 - returncode if returncode < 0 else returncode


class Group:
    """The running processes, their prefixed output and the signals forwarded to them."""

    def __init__(
        self,
        cmd: Sequence[str],
        num_processes: int,
        devices_per_process: Optional[int],
        port: int,
        out=None,
    ):
        self.out = out or sys.stdout
        self._lock = threading.Lock()
        self.procs, self._readers = [], []
        width = len(str(num_processes - 1))
        for i in range(num_processes):
            env = process_env(dict(os.environ), i, num_processes, port, devices_per_process)
            try:  # a session of its own: only the signals forwarded here reach it
                proc = subprocess.Popen(
                    list(cmd),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except FileNotFoundError:
                self.kill()
                raise common.LaunchError(f"{cmd[0]!r} was not found") from None
            self.procs.append(proc)
            reader = threading.Thread(
                target=self._pump, args=(proc, f"[{i:>{width}}] "), daemon=True
            )
            reader.start()
            self._readers.append(reader)

    def _pump(self, proc, prefix: str) -> None:
        for line in iter(proc.stdout.readline, b""):
            text = line.decode(errors="replace")
            with self._lock:
                self.out.write(prefix + text if text.endswith("\n") else prefix + text + "\n")
                self.out.flush()

    def signal(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def alive(self) -> list:
        return [p for p in self.procs if p.poll() is None]

    def finish_output(self, timeout: float = 5.0) -> None:
        for reader in self._readers:
            reader.join(timeout)


def note(message: str) -> None:
    print(f"launch.local: {message}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str],
    num_processes: int,
    devices_per_process: Optional[int] = None,
    port: Optional[int] = None,
    grace_s: float = 10.0,
    poll_s: float = 0.05,
) -> int:
    """Runs the group to the end; returns the launcher's exit status."""
    requested = {"count": 0}
    group = None

    def forward(signum, frame):
        requested["count"] += 1
        requested["signum"] = signum
        if group is None:  # still starting: forwarded once every process is there
            return
        if signum == signal.SIGINT and requested["count"] > 1:
            note("second interrupt: killing every process")
            group.kill()
        else:
            note(f"forwarding {signal.Signals(signum).name} to every process")
            group.signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        group = Group(cmd, num_processes, devices_per_process, port or free_port())
    except BaseException:
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    if requested["count"]:
        requested["count"] -= 1  # counted again now
        forward(requested["signum"], None)
    try:
        failed, stop_at = None, None
        while group.alive():
            for i, proc in enumerate(group.procs):
                if failed is None and proc.poll() not in (None, 0):
                    failed = (i, proc.returncode)
                    if group.alive():
                        note(
                            f"process {i} exited with status {exit_status(proc.returncode)}; "
                            "stopping the others"
                        )
                        group.signal(signal.SIGTERM)
                        stop_at = time.monotonic() + grace_s
            if stop_at is not None and time.monotonic() > stop_at and group.alive():
                note(f"the others did not stop within {grace_s:g}s; killing them")
                group.kill()
                stop_at = None
            time.sleep(poll_s)
        group.finish_output()
        if failed is None:
            failed = next(
                ((i, p.returncode) for i, p in enumerate(group.procs) if p.returncode), None
            )
        if failed is not None:
            note(f"process {failed[0]} failed with status {exit_status(failed[1])}")
            return exit_status(failed[1])
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if group.alive():
            group.kill()


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, cmd = common.split_passthrough(argv)
    p = common.Parser(prog="python -m launch.local", description=__doc__.split("\n\n")[0])
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument(
        "--devices_per_process",
        type=int,
        default=None,
        help="CPU devices of each process (XLA_FLAGS); default: as the environment says",
    )
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument(
        "--grace_s",
        type=float,
        default=10.0,
        help="seconds the others get to stop after one fails, before SIGKILL",
    )
    args = p.parse_args(own)
    if not cmd:
        raise common.LaunchError(
            "no command: give it after `--`, e.g. -- python -m dit_jax.main ..."
        )
    if args.num_processes < 1:
        raise common.LaunchError(f"--num_processes must be positive, got {args.num_processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        raise common.LaunchError(
            f"--devices_per_process must be positive, got {args.devices_per_process}"
        )
    return run(cmd, args.num_processes, args.devices_per_process, args.port, args.grace_s)


if __name__ == "__main__":
    common.main_guard(main)()
