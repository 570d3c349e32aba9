"""Several processes on one machine (launch.local, CPU devices, gloo collectives), real processes.

One uninterrupted reference run on 1 process x 8 devices; 2 processes x 4 devices must give the
same losses and parameters, a SIGTERM to the launcher must save one step in every process, a
checkpoint must resume on the other process count (2 -> 1 and 1 -> 2), a kill -9 of one process
must stop the other and the rerun must finish as the reference did. Sampling an evaluation set
and encoding a dataset must not depend on the process count. Every launch has a time-out, so a
hung collective fails the test instead of hanging it.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from test_data import read_all
from test_reliability import TRAIN_FLAGS, Run, metrics, read_checkpoint

STEPS = 16
#: An EMA grid every 8 steps: every process joins gathering the EMA, process 0 samples and
#: writes it.
FLAGS = [
    f
    for f in TRAIN_FLAGS
    if not f.startswith(("--config.checkpoint_every_steps", "--config.sample.every_steps"))
] + [
    "--config.checkpoint_every_steps=4",
    "--config.keep_every_steps=4",
    "--config.sample.every_steps=8",
    "--config.sample.sampler=ddim",
    "--config.sample.steps=2",
    "--config.sample.num_per_class=1",
    "--config.sample.autoencoder=identity:8",
    # Parameters split over all 8 devices: with 2 processes every wide parameter spans both,
    # so checkpoints save, fingerprint and restore shards that no one process holds whole.
    "--config.mesh.fsdp=8",
]
#: Losses and parameters of 2 x 4 against 1 x 8 devices (the same 8-device mesh). Measured: equal
#: to the bit; the tolerance only allows a different reduction order of the cross-process
#: all-reduce (gloo) from the in-process one, which float32 sums may round differently.
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-6
TIMEOUT = 300  # any one launch; a hung collective fails here instead of hanging the suite


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return {
        **os.environ,
        "DIT_JAX_CACHE": str(base / "dit_jax_cache"),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONUNBUFFERED": "1",
        "DIT_JAX_COORDINATOR_TIMEOUT": "60",
        "JAX_COMPILATION_CACHE_DIR": str(base / "jax_compilation_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def train(workdir, steps=STEPS):
    return [
        sys.executable,
        "-m",
        "dit_jax.main",
        *FLAGS,
        f"--config.num_train_steps={steps}",
        f"--workdir={workdir}",
    ]


def local(cmd, processes=2, devices=4):
    return [
        sys.executable,
        "-m",
        "launch.local",
        f"--num_processes={processes}",
        f"--devices_per_process={devices}",
        "--grace_s=5",
        "--",
        *cmd,
    ]


def run(cmd, env):
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """Uninterrupted, 1 process x 8 devices: losses of every step and the final state."""
    workdir = tmp_path_factory.mktemp("reference") / "w"
    run(train(workdir), env)
    return (
        dict(metrics(workdir)),
        read_checkpoint(workdir / "checkpoints", log=lambda *_: None),
        workdir,
    )


def assert_matches_reference(workdir, reference, steps):
    """Losses of `steps` and the final state against the reference: step, RNG and data position
    bit-identical; parameters, EMA and optimizer state within PARAM_ATOL. Returns the largest
    loss and parameter differences."""
    losses, (want, want_data, want_step), _ = reference
    got_losses = dict(metrics(workdir))
    loss_diff = max(abs(got_losses[s] - losses[s]) for s in steps)
    np.testing.assert_allclose(
        [got_losses[s] for s in steps], [losses[s] for s in steps], rtol=LOSS_RTOL
    )
    got, got_data, got_step = read_checkpoint(workdir / "checkpoints", log=lambda *_: None)
    assert (got_step, got_data) == (want_step, want_data) == (STEPS, got_data)
    assert got.keys() == want.keys()
    param_diff = 0.0
    for key in want:
        if want[key].dtype.kind != "f":  # step, RNG, non-finite marker
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            param_diff = max(param_diff, float(np.max(np.abs(got[key] - want[key]), initial=0)))
            np.testing.assert_allclose(got[key], want[key], atol=PARAM_ATOL, rtol=0, err_msg=key)
    print(f"{workdir}: max |loss diff| {loss_diff:.3g}, max |param diff| {param_diff:.3g}")
    return loss_diff, param_diff


def test_two_processes_sigterm_then_resume_on_one(tmp_path, env, reference):
    """2 x 4 devices train with the reference's losses; SIGTERM to the launcher makes every
    process save the same step and exit 0; only process 0 logs. The checkpoint resumes on
    1 process x 8 devices and the run ends as the reference did."""
    workdir = tmp_path / "w"
    launcher = Run(local(train(workdir)), env, tmp_path / "two.log")
    assert launcher.wait_for(lambda: "[0] step 6/" in launcher.output(), timeout=TIMEOUT)
    launcher.proc.send_signal(signal.SIGTERM)
    code, out = launcher.finish(timeout=120)
    assert code == 0, out[-3000:]
    saved = {
        int(p): int(s) for p, s in re.findall(r"^\[(\d)\] preempted: saved step (\d+)", out, re.M)
    }
    assert set(saved) == {0, 1} and len(set(saved.values())) == 1, out[-3000:]
    step = saved[0]
    assert 6 <= step < STEPS
    assert re.search(r"^\[1\] step \d+/", out, re.M) is None  # process 1 does not log
    assert (workdir / "samples" / "step_00000008.png").is_file() == (step >= 8)
    assert [s for s, _ in metrics(workdir)] == list(range(1, step + 1))

    res = run(train(workdir), env)  # 1 process x 8 devices
    assert f"resumed from step {step}" in res.stdout
    assert_matches_reference(workdir, reference, range(1, STEPS + 1))


def test_one_process_then_two_killed_and_rerun(tmp_path, env, reference):
    """Trained to step 8 on 1 process (the reference's checkpoint), resumed on 2: kill -9 of
    process 1 makes the launcher stop process 0 and exit 137; the rerun on 2 processes ends as
    the reference did."""
    workdir = tmp_path / "w"
    shutil.copytree(reference[2], workdir)
    for step in os.listdir(workdir / "checkpoints"):
        if step.isdigit() and int(step) > 8:
            shutil.rmtree(workdir / "checkpoints" / step)
    launcher = Run(local(train(workdir)), env, tmp_path / "two.log")
    assert launcher.wait_for(lambda: "[0] step 13/" in launcher.output(), timeout=TIMEOUT)
    children = _children(launcher.proc.pid)
    victim = next(p for p in children if _env_of(p).get("JAX_PROCESS_ID") == "1")
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    code, out = launcher.finish(timeout=120)
    assert code == 137, out[-3000:]
    assert time.monotonic() - start < 60
    assert "process 1 exited with status 137; stopping the others" in out
    assert not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in children)

    (workdir / "samples" / "step_00000016.png").unlink(missing_ok=True)  # the reference's copy
    res = run(local(train(workdir)), env)
    assert "[0] resumed from step" in res.stdout
    assert (workdir / "samples" / "step_00000016.png").is_file()  # the EMA grid of 2 processes
    assert_matches_reference(workdir, reference, range(1, STEPS + 1))


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _env_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_eval_set_and_encoding_do_not_depend_on_the_process_count(tmp_path, env):
    """An evaluation set sampled by 2 processes x 2 devices is byte-identical to one sampled by
    1 process x 2 devices (chunks are per_device_batch x local devices: keep devices per process);
    a latent dataset encoded by 2 processes holds the examples of one encoded by 1."""
    sample = [
        sys.executable,
        "-m",
        "dit_jax.sample",
        "--model=S/8",
        "--input_size=8",
        "--num_classes=4",
        "--vae=identity:8",
        "--image_size=8",
        "--in_channels=1",
        "--sampler=ddim",
        "--steps=3",
        "--guidance=all",
        "--num_samples=14",
        "--per_device_batch=2",
    ]
    one_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    run(sample + [f"--output={tmp_path / 'one.npz'}"], one_env)
    run(local(sample + [f"--output={tmp_path / 'two.npz'}"], devices=2), env)
    with open(tmp_path / "one.npz", "rb") as a, open(tmp_path / "two.npz", "rb") as b:
        assert a.read() == b.read()

    encode = [
        sys.executable,
        "-m",
        "dit_jax.data.encode",
        "--source=embedded",
        "--autoencoder=identity:32",
        "--image_size=28",
    ]
    run(encode + [f"--output={tmp_path / 'lat1'}"], one_env)
    res = run(local(encode + [f"--output={tmp_path / 'lat2'}"], devices=1), env)
    one, two = read_all(tmp_path / "lat1"), read_all(tmp_path / "lat2")
    assert len(one) == 5000 and one.keys() == two.keys(), res.stdout[-2000:]
    for key in list(one)[::97]:
        for field in ("mean", "logvar", "label"):
            np.testing.assert_array_equal(one[key][field], two[key][field])


def test_unreachable_coordinator_fails_with_one_line(tmp_path, env):
    from launch.local import free_port

    bad = {
        **env,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
        "DIT_JAX_COORDINATOR_TIMEOUT": "3",
    }
    start = time.monotonic()
    res = subprocess.run(
        train(tmp_path / "w"), cwd=REPO, env=bad, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: process 1 of 2 cannot reach the coordinator at 127.0.0.1:"), last
    assert time.monotonic() - start < 60
