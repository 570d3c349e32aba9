"""Shared test set-up: 8 simulated CPU devices (set before JAX starts) and fixture paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"
DATA = REPO / "tests" / "data"


def reference_path(env: str, default_name: str) -> pathlib.Path:
    """Fixture path (without extension) from `env`, default tests/reference/<name>."""
    return pathlib.Path(os.environ.get(env, REFERENCE / default_name))


@pytest.fixture
def data_dir() -> pathlib.Path:
    return DATA
