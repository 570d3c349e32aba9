"""Launchers: the commands their dry runs print, and one-line errors for bad input."""

import os
import signal
import subprocess
import sys
import time

import pytest

from launch import gpu, tpu
from conftest import REPO


def dry(module, capsys, *args):
    with pytest.raises(SystemExit) as e:
        _run(module, list(args))
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return out.out


def _run(module, argv):
    from launch import common

    common.main_guard(module.main)(argv)


def fails(module, capsys, *args):
    with pytest.raises(SystemExit) as e:
        _run(module, list(args))
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


# ----------------------------------------------------------------------------------------
# TPU
# ----------------------------------------------------------------------------------------


def test_tpu_create_single_host(capsys):
    out = dry(
        tpu,
        capsys,
        "create",
        "--name=dit",
        "--zone=us-central2-b",
        "--accelerator=v4-8",
        "--dry_run",
    )
    assert out.strip() == (
        "gcloud compute tpus tpu-vm create dit --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base --zone=us-central2-b"
    )


def test_tpu_create_spot_and_v5e_alias(capsys):
    out = dry(
        tpu,
        capsys,
        "create",
        "--name=dit",
        "--zone=us-west4-a",
        "--accelerator=v5e-8",
        "--spot",
        "--dry_run",
    )
    assert "--accelerator-type=v5litepod-8" in out and "--version=v2-alpha-tpuv5-lite" in out
    assert out.split()[-1] == "--spot"


def test_tpu_create_queued_pod(capsys):
    out = dry(
        tpu,
        capsys,
        "create",
        "--name=pod",
        "--zone=us-central2-b",
        "--accelerator=v4-32",
        "--queued",
        "--spot",
        "--project=proj",
        "--dry_run",
    )
    cmd = out.split()
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod"]
    assert {
        "--node-id=pod",
        "--accelerator-type=v4-32",
        "--runtime-version=tpu-ubuntu2204-base",
        "--zone=us-central2-b",
        "--project=proj",
        "--spot",
    } <= set(cmd)
    out = dry(
        tpu,
        capsys,
        "create",
        "--name=t",
        "--accelerator=v6e-16",
        "--runtime_version=custom",
        "--dry_run",
    )
    assert "--version=custom" in out and "--zone" not in out  # gcloud's default zone


def test_tpu_setup_installs_tpu_extra_on_all_workers(capsys):
    out = dry(tpu, capsys, "setup", "--name=dit", "--zone=z", "--dry_run").strip().splitlines()
    assert out[0].startswith(f"git -C {REPO} archive --format=tar.gz")
    assert "tpu-vm scp" in out[1] and "dit:~/" in out[1] and "--worker=all" in out[1]
    assert (
        "tpu-vm ssh dit --zone=z --worker=all" in out[2]
        and "pip install -q -e '\"'\"'.[tpu]'\"'\"'" in out[2]
    )
    out = dry(
        tpu,
        capsys,
        "setup",
        "--name=dit",
        "--repo=https://example.com/dit_jax.git",
        "--ref=v1",
        "--dry_run",
    )
    assert "git clone -q https://example.com/dit_jax.git" in out and "checkout -q v1" in out
    assert "--worker=all" in out


def test_tpu_run_on_all_workers_with_gs_workdir(capsys):
    out = dry(
        tpu,
        capsys,
        "run",
        "--name=pod",
        "--zone=z",
        "--accelerator=v4-32",
        "--config=configs/xl2.py",
        "--workdir=gs://my-bucket/dit/xl2",
        "--set",
        "batch_size=256",
        "--dry_run",
        "--no_preflight",
        "--",
        "--config.seed=3",
    )
    assert out.startswith("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all ")
    assert (
        "python3 -m dit_jax.main --config=configs/xl2.py --workdir=gs://my-bucket/dit/xl2 "
        "--config.batch_size=256 --config.seed=3 2>&1 | tee -a ~/dit_jax_logs/train.log"
    ) in out
    assert "export JAX_COORDINATOR_ADDRESS=" in out and "set -o pipefail" in out
    cmd = tpu.run_commands("pod", "configs/xl2.py", "gs://b/x", coordinator=False)[0]
    assert "JAX_COORDINATOR_ADDRESS" not in cmd[-1]
    detached = tpu.run_commands("pod", "configs/xl2.py", "gs://b/x", detach=True)[0][-1]
    assert "nohup python3 -m dit_jax.main" in detached and detached.rstrip().endswith('.log"')


def test_tpu_logs_and_delete(capsys):
    out = dry(tpu, capsys, "logs", "--name=dit", "--zone=z", "--follow", "--dry_run")
    assert "--worker=0" in out and "tail -n 100 -F ~/dit_jax_logs/train.log" in out
    out = dry(tpu, capsys, "delete", "--name=dit", "--zone=z", "--dry_run")
    assert out.strip() == "gcloud compute tpus tpu-vm delete dit --zone=z"
    out = dry(tpu, capsys, "delete", "--name=dit", "--zone=z", "--queued", "--yes", "--dry_run")
    assert out.strip() == "gcloud compute tpus queued-resources delete dit --zone=z --force --quiet"


def test_tpu_accelerators():
    assert (
        not tpu.is_multi_host("v4-8")
        and not tpu.is_multi_host("v5litepod-8")
        and not tpu.is_multi_host("v6e-8")
    )
    assert (
        tpu.is_multi_host("v4-16")
        and tpu.is_multi_host("v5litepod-16")
        and tpu.is_multi_host("v5p-32")
    )
    assert tpu.default_runtime_version("v5p-8") == "v2-alpha-tpuv5"


def test_tpu_user_errors(capsys):
    assert "unknown TPU generation" in fails(
        tpu, capsys, "create", "--name=x", "--accelerator=v9-8", "--dry_run"
    )
    assert "not an accelerator type" in fails(
        tpu, capsys, "create", "--name=x", "--accelerator=big", "--dry_run"
    )
    assert "--name is required" in fails(tpu, capsys, "create", "--accelerator=v4-8", "--dry_run")
    assert "lowercase" in fails(tpu, capsys, "create", "--name=My_TPU", "--dry_run")
    err = fails(
        tpu,
        capsys,
        "run",
        "--name=x",
        "--accelerator=v4-32",
        "--config=configs/xl2.py",
        "--workdir=/tmp/ckpt",
        "--dry_run",
    )
    assert "gs://" in err and "several hosts" in err
    assert "gs://bucket/path" in fails(
        tpu, capsys, "run", "--name=x", "--config=configs/xl2.py", "--workdir=gs://b", "--dry_run"
    )
    assert "only gs://" in fails(
        tpu,
        capsys,
        "run",
        "--name=x",
        "--config=configs/xl2.py",
        "--workdir=s3://bucket/x",
        "--dry_run",
    )
    assert "does not exist" in fails(
        tpu,
        capsys,
        "run",
        "--name=x",
        "--config=configs/nope.py",
        "--workdir=gs://bkt/x",
        "--dry_run",
    )
    assert "KEY=VALUE" in fails(
        tpu,
        capsys,
        "run",
        "--name=x",
        "--config=configs/xl2.py",
        "--workdir=gs://bkt/x",
        "--set",
        "batch_size",
        "--dry_run",
    )
    assert "invalid choice" in fails(tpu, capsys, "explode", "--name=x")


def test_tpu_single_host_local_workdir_warns(capsys):
    with pytest.raises(SystemExit) as e:
        _run(
            tpu, ["run", "--name=x", "--config=configs/demo.py", "--workdir=ckpt/demo", "--dry_run"]
        )
    out = capsys.readouterr()
    assert e.value.code == 0 and "--workdir=ckpt/demo" in out.out and "warning" in out.err


# ----------------------------------------------------------------------------------------
# GPU / SLURM
# ----------------------------------------------------------------------------------------


def test_gpu_local(capsys):
    out = dry(
        gpu,
        capsys,
        "local",
        "--config=configs/xl2.py",
        "--workdir=gs://bkt/run",
        "--gpus=0,1",
        "--python=python3",
        "--set",
        "model.remat=True",
        "--dry_run",
    )
    assert out.strip().endswith(
        "CUDA_VISIBLE_DEVICES=0,1 python3 -m dit_jax.main --config=configs/xl2.py "
        "--workdir=gs://bkt/run --config.model.remat=True"
    )


def test_gpu_preflight_names_the_node_shape(capsys, monkeypatch):
    """--gpu_type compiles the plan for <nodes>x<gpu>x<gpus per node> before anything runs;
    --no_preflight skips it (the compile itself is tested in test_plan.py)."""
    seen = []
    monkeypatch.setattr(
        gpu.common, "preflight", lambda config, topology, overrides: seen.append(topology)
    )
    base = ["--config=configs/xl2.py", "--workdir=/shared/x", "--dry_run", "--gpu_type=h100"]
    dry(gpu, capsys, "slurm", *base, "--nodes=2", "--gpus_per_node=8")
    dry(gpu, capsys, "slurm", *base, "--gpus_per_node=4")
    dry(gpu, capsys, "local", *base, "--gpus=0,1")
    dry(gpu, capsys, "local", *base, "--no_preflight")
    assert seen == ["2xh100x8", "h100x4", "h100x2"]


def test_slurm_script_one_task_per_gpu(capsys):
    out = dry(
        gpu,
        capsys,
        "slurm",
        "--config=configs/xl2.py",
        "--workdir=gs://bkt/xl2",
        "--nodes=4",
        "--gpus_per_node=8",
        "--time=48:00:00",
        "--partition=gpu",
        "--account=acct",
        "--setup=source .venv/bin/activate",
        "--dry_run",
        "--",
        "--config.batch_size=512",
    )
    lines = out.splitlines()
    assert lines[0] == "# slurm/dit.sbatch" and lines[1] == "#!/bin/bash"
    for header in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=48:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acct",
        "#SBATCH --signal=TERM@120",
        "source .venv/bin/activate",
        f"cd {REPO}",
    ):
        assert header in lines, header
    assert (
        "srun --kill-on-bad-exit=1 python -m dit_jax.main --config=configs/xl2.py --workdir=gs://bkt/xl2 "
        "--config.batch_size=512"
    ) in lines
    assert "JAX_LOCAL_DEVICE_IDS" not in out
    assert lines[-1] == "sbatch slurm/dit.sbatch"


def test_slurm_script_one_task_per_node_sees_all_gpus():
    script = gpu.slurm_script(
        "configs/xl2.py", "/shared/x", nodes=2, gpus_per_node=4, tasks="per_node"
    )
    assert "#SBATCH --ntasks-per-node=1" in script
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script
    single = gpu.slurm_script(
        "configs/xl2.py", "/shared/x", nodes=1, gpus_per_node=4, tasks="per_node"
    )
    assert "JAX_LOCAL_DEVICE_IDS" not in single  # one process: no jax.distributed


def test_slurm_submits_with_sbatch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("launch.common.stream", lambda cmd, *a, **k: calls.append(list(cmd)) or 0)
    path = tmp_path / "job.sbatch"
    gpu.submit("#!/bin/bash\n", str(path), str(tmp_path / "logs"), dry_run=False)
    assert calls == [["sbatch", str(path)]] and path.read_text() == "#!/bin/bash\n"
    assert (tmp_path / "logs").is_dir()


def test_gpu_user_errors(capsys):
    assert "--config is required" in fails(gpu, capsys, "slurm", "--workdir=/x", "--dry_run")
    assert "--workdir is required" in fails(
        gpu, capsys, "local", "--config=configs/xl2.py", "--dry_run"
    )
    assert "SLURM time" in fails(
        gpu, capsys, "slurm", "--config=configs/xl2.py", "--workdir=/x", "--time=soon", "--dry_run"
    )
    assert "positive" in fails(
        gpu, capsys, "slurm", "--config=configs/xl2.py", "--workdir=/x", "--nodes=0", "--dry_run"
    )
    assert "GPU indices" in fails(
        gpu, capsys, "local", "--config=configs/xl2.py", "--workdir=/x", "--gpus=all", "--dry_run"
    )
    assert "invalid choice" in fails(
        gpu,
        capsys,
        "slurm",
        "--config=configs/xl2.py",
        "--workdir=/x",
        "--tasks=per_core",
        "--dry_run",
    )


def test_cli_subprocess_one_line_no_traceback():
    """As a user runs them: instant dry run, no JAX import, one-line errors."""
    ok = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runpy; sys.argv=['tpu','create','--name=a','--dry_run'];"
            "\ntry:\n runpy.run_module('launch.tpu', run_name='__main__')\nexcept SystemExit: pass\n"
            "print('jax' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1] == "False", (
        ok.stdout + ok.stderr
    )
    for args in (
        ["launch.tpu", "create", "--accelerator=v4-8"],
        ["launch.gpu", "slurm", "--config=x.py"],
        ["launch.tpu", "create", "--name=a", "--accelerator=tpu9"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:"), (
            res.stderr
        )


# ----------------------------------------------------------------------------------------
# Local multi-process launcher (launch.local)
# ----------------------------------------------------------------------------------------


def _local(*args, timeout=60, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "launch.local", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def test_local_launcher_env_prefix_and_status():
    """Each process gets the coordinator, its id and its device count; output is prefixed."""
    script = (
        "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], "
        "os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'])"
    )
    res = _local(
        "--num_processes=3",
        "--devices_per_process=4",
        "--",
        sys.executable,
        "-c",
        script,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --foo"},
    )
    assert res.returncode == 0, res.stderr
    lines = sorted(res.stdout.splitlines())
    assert [line[:4] for line in lines] == ["[0] ", "[1] ", "[2] "]
    addresses = set()
    for i, line in enumerate(lines):
        pid, n, address, flags = line[4:].split(" ", 3)
        assert (pid, n) == (str(i), "3") and address.startswith("127.0.0.1:")
        assert flags == "--foo --xla_force_host_platform_device_count=4"
        addresses.add(address)
    assert len(addresses) == 1


def test_local_launcher_stops_the_others_when_one_fails():
    """Process 1 exits 3 while 0 sleeps: 0 is stopped at once and the launcher exits 3."""
    script = (
        "import os, sys, time\nif os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(60)"
    )
    start = time.monotonic()
    res = _local("--num_processes=2", "--", sys.executable, "-c", script)
    assert res.returncode == 3, res.stderr
    assert time.monotonic() - start < 20
    assert "process 1 exited with status 3; stopping the others" in res.stderr


def test_local_launcher_forwards_sigterm():
    """SIGTERM to the launcher reaches every process; each handles it and exits 0."""
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.local",
            "--num_processes=2",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = 0
    while ready < 2:
        ready += "ready" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(line for line in out.splitlines() if "SIGTERM" in line) == [
        "[0] got SIGTERM",
        "[1] got SIGTERM",
    ]


def test_local_launcher_reports_a_killed_process_as_128_plus_signal():
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    res = _local("--num_processes=1", "--", sys.executable, "-c", script)
    assert res.returncode == 137 and "failed with status 137" in res.stderr


def test_local_launcher_usage_errors(capsys):
    from launch import local

    assert fails(local, capsys, "--num_processes=2").startswith("error: no command")
    assert "positive" in fails(local, capsys, "--num_processes=0", "--", "true")
