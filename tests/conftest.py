"""Shared test set-up: 8 simulated CPU devices (set before JAX starts) and fixture paths."""

import json
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"
DATA = REPO / "tests" / "data"


def reference_path(env: str, default_name: str) -> pathlib.Path:
    """Fixture path (without extension) from `env`, default tests/reference/<name>."""
    return pathlib.Path(os.environ.get(env, REFERENCE / default_name))


def load_reference(env: str, default_name: str) -> tuple[pathlib.Path, dict, dict]:
    """(path without extension, arrays, sidecar) of a reference fixture; a missing one fails
    the test naming where it was looked for."""
    base = reference_path(env, default_name)
    npz, sidecar = base.with_suffix(".npz"), base.with_suffix(".json")
    assert npz.is_file() and sidecar.is_file(), f"reference fixture not found at {base} (${env})"
    return base, dict(np.load(npz)), json.loads(sidecar.read_text())


def nhwc(a) -> np.ndarray:
    """The official code's NCHW (any leading axes) -> NHWC."""
    return np.moveaxis(np.asarray(a), -3, -1)


def nchw(a) -> np.ndarray:
    return np.moveaxis(np.asarray(a), -1, -3)


@pytest.fixture
def data_dir() -> pathlib.Path:
    return DATA
