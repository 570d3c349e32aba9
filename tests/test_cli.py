"""The command-line tools, run as a user runs them."""

import subprocess
import sys

import numpy as np


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_flops_cli_one_model():
    res = run("dit_jax.gflops", "--model=XL/2", "--model=S/8")
    assert res.returncode == 0, res.stderr
    assert "DiT-XL/2      675,129,632     256    118.64" in res.stdout
    assert "DiT-S/8" in res.stdout


def test_convert_then_sample(tmp_path, data_dir):
    out = tmp_path / "ckpt"
    res = run(
        "dit_jax.convert",
        f"--input={data_dir / 'dit_tiny_train.pt'}",
        f"--output={out}",
        "--num_heads=2",
    )
    assert res.returncode == 0, res.stderr
    assert "10 classes" in res.stdout
    samples = tmp_path / "s.npz"
    res = run(
        "dit_jax.sample",
        f"--checkpoint={out}",
        "--labels=1,2,3",
        "--steps=5",
        "--sampler=ddim",
        "--guidance=all",
        f"--output={samples}",
    )
    assert res.returncode == 0, res.stderr
    data = np.load(samples)
    assert data["latents"].shape == (3, 4, 4, 4) and np.isfinite(data["latents"]).all()
    np.testing.assert_array_equal(data["labels"], [1, 2, 3])


def test_cli_user_errors_are_one_line(tmp_path, data_dir):
    cases = [
        ("dit_jax.gflops", "--model=XXL/2"),
        (
            "dit_jax.convert",
            "--model=S/2",
            f"--input={data_dir / 'dit_tiny_train.pt'}",
            f"--output={tmp_path / 'x'}",
        ),
        (
            "dit_jax.convert",
            "--model=S/2",
            f"--input={tmp_path / 'nope.pt'}",
            f"--output={tmp_path / 'y'}",
        ),
        ("dit_jax.sample", "--model=S/8", "--input_size=8", "--num_classes=10", "--labels=3,10"),
        ("dit_jax.sample", "--model=S/3"),
        ("dit_jax.sample", "--model=S/8", "--input_size=12"),
    ]
    for args in cases:
        res = run(*args)
        assert res.returncode != 0, args
        assert "Traceback" not in res.stderr, (args, res.stderr)
        assert (
            res.stderr.strip().splitlines()[-1].startswith("error:")
            or "error" in res.stderr.lower()
        ), args
    assert run("dit_jax.sample", "--no_such_flag").returncode != 0
