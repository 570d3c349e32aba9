"""The training system on tiny configs: config errors, exact resume, 1 vs 8 devices, initialising
from a converted checkpoint. Preemption, kills, corrupt checkpoints and non-finite losses are in
tests/test_reliability.py."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from dit_jax import models, param_mapping, sampling, train, workdir as workdir_lib

sys.path.insert(0, str(REPO))
from configs import demo  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "dit_jax_cache"
    monkeypatch.setenv("DIT_JAX_CACHE", str(root))
    return root


def tiny_config(**overrides):
    c = demo.get_config()
    c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size = 1, 32, 2, 8
    c.batch_size = 16
    c.num_train_steps = 4
    c.log_every_steps = 1
    c.checkpoint_every_steps = 100
    c.sample.every_steps = 0
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = (
        "constant"  # a cosine schedule depends on num_train_steps, which the resume test changes
    )
    c.ema_decay = 0.9
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"batch_size": 12}, "not divisible by the 8 devices"),
        ({"model.name": "XXL/2"}, "Unknown model name"),
        ({"data.dir": "/nonexistent/latents"}, "does not exist"),
        ({"data.image_size": 256}, "must be in \\[8, 32\\]"),
        ({"data.dir": "EMBEDDED_16PX", "data.image_size": 28}, "does not match the dataset"),
        ({"model.patch_size": 3}, "does not divide"),
        ({"checkpoint_every_steps": 0}, "checkpoint_every_steps must be positive"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be positive"),
        ({"model.dtype": "float99"}, "is not a dtype"),
        ({"sample.every_steps": 10, "sample.classes": (3, 10)}, "must lie in \\[0, 9\\]"),
        ({"objective": "flow"}, "config.objective must be one of"),
        ({"objective": "interpolant", "interpolant.path": "Cosine"}, "path"),
        ({"objective": "interpolant"}, "config.sample.sampler must be one of .*euler"),
        ({"sample.sampler": "euler"}, "config.sample.sampler must be one of .*ddpm"),
        ({"eval.guidance_interval": (1, 2, 3)}, "guidance_interval must be"),
    ],
)
def test_invalid_configs_fail_before_compiling(tmp_path, override, message):
    if override.get("data.dir") == "EMBEDDED_16PX":  # a real dataset at another resolution
        override = {**override, "data.dir": workdir_lib.dataset_dir(tiny_config())}
    config = tiny_config(**override)
    if "model.name" in override:
        config.model.depth = config.model.hidden_size = config.model.num_heads = (
            config.model.patch_size
        ) = None
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.isdir(tmp_path / "w" / "checkpoints")


def test_resume_is_bit_exact(tmp_path):
    full = train.train_and_evaluate(tiny_config(num_train_steps=6), str(tmp_path / "full"))
    split = str(tmp_path / "split")
    assert train.train_and_evaluate(tiny_config(num_train_steps=3), split) is not None
    resumed = train.train_and_evaluate(tiny_config(num_train_steps=6), split)
    assert int(resumed.step) == 6
    for a, b in zip(
        leaves(full.params) + leaves(full.ema_params) + leaves(full.opt_state),
        leaves(resumed.params) + leaves(resumed.ema_params) + leaves(resumed.opt_state),
    ):
        np.testing.assert_array_equal(a, b)
    assert losses(tmp_path / "full") == losses(split)  # steps 1-3, then 4-6 after the resume


def test_eight_devices_follow_one_device(tmp_path):
    one = train.train_and_evaluate(tiny_config(**{"mesh.num_devices": 1}), str(tmp_path / "one"))
    eight = train.train_and_evaluate(
        tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2}), str(tmp_path / "eight")
    )
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(tmp_path / "eight"), rtol=2e-5)
    for a, b in zip(leaves(one.params), leaves(eight.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    kernel = eight.params["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_scanned_blocks_train_like_looped_blocks(tmp_path):
    """model.scan_blocks changes the program, not the training: same losses, same parameters
    (in the other layout), blocks sharded over fsdp along their own axes."""
    base = {"model.depth": 2, "mesh.data": 4, "mesh.fsdp": 2}
    looped = train.train_and_evaluate(tiny_config(**base), str(tmp_path / "looped"))
    scanned = train.train_and_evaluate(
        tiny_config(**base, **{"model.scan_blocks": True}), str(tmp_path / "scanned")
    )
    np.testing.assert_allclose(losses(tmp_path / "looped"), losses(tmp_path / "scanned"), rtol=2e-5)
    model = models.DiT(scan_blocks=True)
    params = models.params_in_layout(jax.device_get(looped.params), model)
    for a, b in zip(leaves(params), leaves(scanned.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    kernel = scanned.params["blocks"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")


def test_resume_after_switching_scan_blocks(tmp_path):
    """A run written with looped blocks resumes with scan_blocks=True (and back): parameters,
    EMA and Adam moments restacked, training goes on as if nothing had changed."""
    base = {"model.depth": 2}
    full = train.train_and_evaluate(tiny_config(**base, num_train_steps=4), str(tmp_path / "full"))
    split = str(tmp_path / "split")
    train.train_and_evaluate(tiny_config(**base, num_train_steps=2), split)
    scanned = train.train_and_evaluate(
        tiny_config(**base, num_train_steps=3, **{"model.scan_blocks": True}), split
    )
    assert int(scanned.step) == 3 and "blocks" in scanned.params
    looped = train.train_and_evaluate(tiny_config(**base, num_train_steps=4), split)
    assert int(looped.step) == 4 and "blocks_1" in looped.params
    np.testing.assert_allclose(losses(tmp_path / "full"), losses(split), rtol=1e-5)
    for a, b in zip(
        leaves(full.params) + leaves(full.ema_params) + leaves(full.opt_state),
        leaves(looped.params) + leaves(looped.ema_params) + leaves(looped.opt_state),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    model, ema, step, _ = workdir_lib.load_ema(split)
    assert step == 4 and "blocks_1" in ema and not model.scan_blocks


def test_initialise_from_a_converted_checkpoint(tmp_path):
    config = tiny_config(**{"optimizer.learning_rate": 0.0, "num_train_steps": 1})
    meta = {"latent_shape": [16, 16, 1], "num_classes": 10}
    model = workdir_lib.model_for_dataset(config, meta)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.05,
        models.abstract_params(model),
    )
    path = tmp_path / "init.npz"
    np.savez(path, **param_mapping.state_dict_from_dit_params(params, model.patch_size))
    config.model.init_checkpoint = str(path)
    state = train.train_and_evaluate(config, str(tmp_path / "w"))
    for a, b in zip(leaves(params), leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_learning_rate_schedules():
    const = train.lr_schedule(
        tiny_config(**{"optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 10})
    )
    assert (
        float(const(0)) == 0.0
        and float(const(5)) == pytest.approx(5e-4)
        and float(const(500)) == pytest.approx(1e-3)
    )
    cos = train.lr_schedule(
        tiny_config(
            **{
                "optimizer.learning_rate": 1e-3,
                "optimizer.schedule": "cosine",
                "num_train_steps": 110,
                "optimizer.warmup_steps": 10,
            }
        )
    )
    assert float(cos(10)) == pytest.approx(1e-3) and float(cos(110)) == pytest.approx(
        1e-4, rel=1e-4
    )
    assert float(cos(60)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        train.lr_schedule(tiny_config(**{"optimizer.schedule": "step"}))


def test_interpolant_run_trains_resumes_exactly_and_samples(tmp_path):
    """objective='interpolant' (SiT) goes through the same loop: exact resume, then sampling
    from the workdir with the flow samplers on the run's interpolant."""
    flow = {"objective": "interpolant", "sample.sampler": "heun", "eval.sampler": "heun"}
    full = train.train_and_evaluate(tiny_config(num_train_steps=4, **flow), str(tmp_path / "full"))
    split = str(tmp_path / "split")
    train.train_and_evaluate(tiny_config(num_train_steps=2, **flow), split)
    resumed = train.train_and_evaluate(tiny_config(num_train_steps=4, **flow), split)
    for a, b in zip(
        leaves(full.params) + leaves(full.opt_state),
        leaves(resumed.params) + leaves(resumed.opt_state),
    ):
        np.testing.assert_array_equal(a, b)
    assert losses(tmp_path / "full") == losses(split)
    with open(os.path.join(split, "metrics.jsonl")) as f:
        assert "vb" not in json.loads(f.readline())  # the flow loss has no vb term
    g = sampling.generator_from_workdir(split)
    assert g.interpolant is not None and g.interpolant.path == "Linear"
    labels = jax.numpy.arange(4, dtype=jax.numpy.int32)
    outs = [
        sampling.sample_latents(
            g.model,
            g.params,
            labels,
            jax.random.key(0),
            sampler=name,
            steps=4,
            cfg_scale=2.0,
            **g.schedule,
        )
        for name in sampling.FLOW_SAMPLERS
    ]
    for out in outs:
        assert out.shape == (4, 16, 16, 1) and np.isfinite(np.asarray(out)).all()
    assert not np.allclose(outs[0], outs[1])  # euler and heun differ
    with pytest.raises(ValueError, match="for an interpolant model"):
        sampling.sample_latents(
            g.model, g.params, labels, jax.random.key(0), sampler="ddpm", **g.schedule
        )
    noise, recon = sampling.invert_latents(
        g.model, g.params, outs[1], labels, steps=8, **g.schedule
    )
    np.testing.assert_allclose(np.asarray(recon), np.asarray(outs[1]), atol=1e-3)


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")
)
def test_every_config_file_is_valid(name):
    """Each config (the 12 DiTs, the 12 SiTs, the demos, the bases) passes the checks made
    before training, on a dataset of its own resolution."""
    config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    size = config.data.image_size
    meta = {
        "image_size": size,
        "num_classes": 10 if config.data.dir == "embedded" else 1000,
        "latent_shape": [size // 8, size // 8, 4],
    }
    train.validate_config(config, meta, num_devices=1)
    assert config.objective in train.OBJECTIVES
