"""Logical axis annotations in the model map onto a ('data', 'fsdp') mesh of 8 simulated devices."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from dit_jax import models, sharding

sys.path.insert(0, str(REPO))
from configs import default  # noqa: E402

TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
)


def test_sharded_init_and_forward_match_one_device():
    assert jax.device_count() == 8
    model = models.DiT(**TINY)
    mesh = sharding.make_mesh(data=4, fsdp=2)
    x, t, y = models.dummy_inputs(model, 8)
    x = x + jnp.arange(8.0)[:, None, None, None]
    init = lambda rng: model.init({"params": rng}, x, t, y)
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.param_shardings(
        abstract, mesh, sharding.logical_rules(default.get_config())
    )
    variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    fc1 = nn.meta.unbox(variables)["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert fc1.addressable_shards[0].data.shape == (32, 64)  # 128 wide, split in 2
    params = nn.meta.unbox(variables)["params"]
    # perturb so the output is not trivially zero
    params = jax.tree_util.tree_map(lambda a: a + 0.01, params)
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    sharded = jax.jit(lambda p, x: model.apply({"params": p}, x, t, y))(params, xs)
    single = model.apply({"params": jax.device_get(params)}, x, t, y)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-6)


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="fsdp=3"):
        sharding.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="does not match"):
        sharding.make_mesh(data=3, fsdp=2)
    assert sharding.make_mesh(fsdp=2).shape == {"data": 4, "fsdp": 2}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, False),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
    ],
)
def test_distributed_initialisation_follows_the_environment(monkeypatch, env, expected):
    for var in ("SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls, waits = [], []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(sharding, "_on_tpu_vm", lambda: False)
    monkeypatch.setattr(sharding, "wait_for_coordinator", lambda *a: waits.append(a))
    monkeypatch.setenv("DIT_JAX_COORDINATOR_TIMEOUT", "7")
    assert sharding.maybe_initialize_distributed() is expected
    assert len(calls) == int(expected)
    calls.clear()
    assert sharding.maybe_initialize_distributed("10.0.0.9:5555", 2, 1)
    assert calls == [
        dict(
            coordinator_address="10.0.0.9:5555",
            num_processes=2,
            process_id=1,
            initialization_timeout=7,
        )
    ]
    assert waits[-1] == ("10.0.0.9:5555", 7.0, "process 1 of 2")  # before jax's connect


# ----------------------------------------------------------------------------------------
# Multi-host detection (no TPU needed: the metadata server is injected)
# ----------------------------------------------------------------------------------------


def _metadata(**attrs):
    return lambda key: attrs.get(key.replace("-", "_"))


def test_tpu_slice_from_metadata_both_endpoint_formats():
    from dit_jax.sharding import TPU_COORDINATOR_PORT, tpu_slice_from_metadata

    new = _metadata(worker_network_endpoints="t-w-0,t-w-1,t-w-2,t-w-3", agent_worker_number="2")
    assert tpu_slice_from_metadata(new) == {
        "coordinator_address": f"t-w-0:{TPU_COORDINATOR_PORT}",
        "num_processes": 4,
        "process_id": 2,
    }
    old = _metadata(
        worker_network_endpoints="w0:0:10.0.0.5,w1:1:10.0.0.6",
        tpu_env="ACCELERATOR_TYPE: 'v4-16'\nWORKER_ID: '1'\nZONE: 'us-central2-b'",
    )
    assert tpu_slice_from_metadata(old) == {
        "coordinator_address": f"10.0.0.5:{TPU_COORDINATOR_PORT}",
        "num_processes": 2,
        "process_id": 1,
    }
    assert tpu_slice_from_metadata(_metadata(worker_network_endpoints="only-host")) is None
    assert tpu_slice_from_metadata(_metadata()) is None
    with pytest.raises(ValueError, match="no worker id"):
        tpu_slice_from_metadata(_metadata(worker_network_endpoints="a,b"))


def test_distributed_settings_sources_in_order():
    from dit_jax.sharding import distributed_settings

    never = lambda key: pytest.fail("metadata read off a TPU VM")
    kw = dict(get_metadata=never, on_tpu_vm=lambda: False)
    assert distributed_settings(env={}, **kw) is None
    assert distributed_settings("h:1", 2, 1, env={}, **kw) == {
        "coordinator_address": "h:1",
        "num_processes": 2,
        "process_id": 1,
    }
    launched = {
        "JAX_COORDINATOR_ADDRESS": "127.0.0.1:5",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "0",
    }
    assert distributed_settings(env=launched, **kw) == {
        "coordinator_address": "127.0.0.1:5",
        "num_processes": 2,
        "process_id": 0,
    }
    assert distributed_settings(env={"JAX_COORDINATOR_ADDRESS": "c:8482"}, **kw) == {
        "coordinator_address": "c:8482"
    }  # the rest from jax's cluster detection
    assert distributed_settings(env={"SLURM_NTASKS": "4"}, **kw) == {}
    assert distributed_settings(env={"TPU_WORKER_HOSTNAMES": "a,b"}, **kw) == {}
    pod = _metadata(worker_network_endpoints="a,b", agent_worker_number="1")
    assert distributed_settings(env={}, get_metadata=pod, on_tpu_vm=lambda: True)["process_id"] == 1
    assert distributed_settings(env={}, get_metadata=_metadata(), on_tpu_vm=lambda: True) is None


def test_unreachable_coordinator_is_one_error_in_bounded_time():
    import time
    from dit_jax.sharding import wait_for_coordinator
    from launch.local import free_port

    start = time.monotonic()
    with pytest.raises(ConnectionError, match="process 1 of 2 cannot reach the coordinator"):
        wait_for_coordinator(f"127.0.0.1:{free_port()}", 1.0, "process 1 of 2")
    assert time.monotonic() - start < 10
