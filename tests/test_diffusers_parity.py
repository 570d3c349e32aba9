"""Exactness against diffusers: DPM-Solver++ and DDIM schedulers, DiTTransformer2DModel.

The fixture (path without extension) comes from $DIFFUSERS_REFERENCE, default
tests/reference/diffusers_tiny (+ the diffusers folder next to it, named in the sidecar); the
model is built from the sidecar's `model` section. Trajectories were driven by the official
model with the official guidance (3 guided channels) on the doubled batch [z; z]; the first
half is what `diffusion.cfg_model_fn` computes. Tolerance: 1e-4 of the reference's max-abs
value, per step (the random model's latents grow to hundreds). Arrays are NCHW there.
"""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_reference, nhwc, reference_path
import safetensors.numpy

from dit_jax import (
    diffusers_format,
    diffusion,
    models,
    param_mapping,
    solvers,
    state_dicts,
    weights,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    base, data, meta = load_reference("DIFFUSERS_REFERENCE", "diffusers_tiny")
    folder = base.parent / meta["diffusers_folder"]["path_as_generated"]
    model = models.DiT(**meta["model"])
    sd = {k[len("state_dict/") :]: v for k, v in data.items() if k.startswith("state_dict/")}
    params = {"params": param_mapping.dit_params_from_state_dict(sd, model)}
    return data, meta, model, params, folder


def assert_close(ours, theirs, name):
    theirs = np.asarray(theirs)
    scale = max(np.abs(theirs).max(), 1e-12)
    err = np.abs(np.asarray(ours, np.float64) - theirs).max() / scale
    assert err <= TOL, (
        f"{name}: max-abs error {err:.3g} of the reference's max-abs (tolerance {TOL})"
    )


def guided(model, params, data, name):
    """The guided model over the first half of the fixture's doubled batch, and that half's z."""
    z, y = nhwc(data[f"{name}/z"]), jnp.asarray(data[f"{name}/y"], jnp.int32)
    half = z.shape[0] // 2
    fn = diffusion.cfg_model_fn(
        lambda a, b, c: model.apply(params, a, b, c),
        y[:half],
        model.num_classes,
        float(data[f"{name}/cfg_scale"]),
    )
    return fn, z[:half], half


# ----------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpm", "dpm3"])
def test_dpm_schedule(ref, name):
    data, meta, _, _, _ = ref
    info = meta["schedulers"][name]
    steps, cfg = len(info["timesteps"]), info["config"]
    sch = solvers.dpm_solver_schedule(
        steps,
        order=cfg["solver_order"],
        spacing=cfg["timestep_spacing"],
        lower_order_final=cfg["lower_order_final"],
    )
    np.testing.assert_array_equal(sch.timesteps, data[f"{name}/timesteps"])
    np.testing.assert_allclose(sch.sigmas, data[f"{name}/sigmas"], rtol=1e-6)
    assert sch.orders.tolist() == info["step_orders"]


def test_spacings(ref):
    _, meta, _, _, _ = ref
    ddim = meta["schedulers"]["ddim_diffusers"]
    steps = len(ddim["timesteps"])
    np.testing.assert_array_equal(
        solvers.ddim_timesteps(steps, ddim["config"]["timestep_spacing"]), ddim["timesteps"]
    )
    for case in meta["scheduler_notes"]["from_config_trap"].values():
        ours = solvers.dpm_timesteps(len(case["timesteps"]), case["timestep_spacing"])
        np.testing.assert_array_equal(ours, case["timesteps"])
    np.testing.assert_array_equal(
        solvers.dpm_timesteps(8, "trailing"), [999, 874, 749, 624, 499, 374, 249, 124]
    )
    np.testing.assert_array_equal(solvers.ddim_timesteps(4, "linspace"), [999, 666, 333, 0])


@pytest.mark.parametrize("name", ["dpm", "dpm3"])
def test_dpm_solver_trajectory(ref, name):
    data, meta, model, params, _ = ref
    cfg = meta["schedulers"][name]["config"]
    fn, z, half = guided(model, params, data, name)
    steps = len(data[f"{name}/timesteps"])
    x, traj = jax.jit(
        lambda z: solvers.dpm_solver_sample_loop(
            fn,
            z,
            steps,
            order=cfg["solver_order"],
            spacing=cfg["timestep_spacing"],
            return_trajectory=True,
        )
    )(z)
    ref_traj = data[f"{name}/trajectory"][:, :half]
    for i in range(steps):
        assert_close(np.moveaxis(np.asarray(traj[i]), -1, -3), ref_traj[i], f"{name} step {i}")
    assert_close(
        np.moveaxis(np.asarray(x), -1, -3), data[f"{name}/sample"][:half], f"{name} sample"
    )


def test_diffusers_ddim_trajectory(ref):
    data, meta, model, params, _ = ref
    cfg = meta["schedulers"]["ddim_diffusers"]["config"]
    fn, z, half = guided(model, params, data, "ddim_diffusers")
    steps = len(data["ddim_diffusers/timesteps"])
    x, traj = jax.jit(
        lambda z: solvers.ddim_sample_loop(
            fn,
            z,
            steps,
            spacing=cfg["timestep_spacing"],
            set_alpha_to_one=cfg["set_alpha_to_one"],
            steps_offset=cfg["steps_offset"],
            return_trajectory=True,
        )
    )(z)
    ref_traj = data["ddim_diffusers/trajectory"][:, :half]
    for i in range(steps):
        assert_close(np.moveaxis(np.asarray(traj[i]), -1, -3), ref_traj[i], f"ddim step {i}")
    assert_close(
        np.moveaxis(np.asarray(x), -1, -3), data["ddim_diffusers/sample"][:half], "ddim sample"
    )


def test_solvers_take_the_schedule_not_a_respaced_one():
    with pytest.raises(ValueError, match="respacing"):
        solvers.dpm_solver_schedule(8, schedule=diffusion.create_diffusion("250"))
    with pytest.raises(ValueError, match="order"):
        solvers.dpm_solver_schedule(8, order=4)
    with pytest.raises(ValueError, match="spacing"):
        solvers.ddim_schedule(8, spacing="karras")


# ----------------------------------------------------------------------------------------
# The forward
# ----------------------------------------------------------------------------------------


def forward(model, params, data):
    x, t, y = (data[f"diffusers_forward/{k}"] for k in "xty")
    out = model.apply(params, nhwc(x), jnp.asarray(t, jnp.int32), jnp.asarray(y, jnp.int32))
    return np.moveaxis(np.asarray(out), -1, -3)


def test_official_forward(ref):
    data, _, model, params, _ = ref
    assert_close(forward(model, params, data), data["official_forward/out"], "official forward")


def test_diffusers_forward_option(ref):
    data, _, model, params, _ = ref
    flavored = model.clone(**models.DIFFUSERS_FORWARD)
    assert_close(
        forward(flavored, params, data), data["diffusers_forward/out"], "diffusers forward"
    )
    # each of the two differences matters on its own (the timestep formula by far the most)
    for field in models.DIFFUSERS_FORWARD:
        half = model.clone(**{field: models.DIFFUSERS_FORWARD[field]})
        err = np.abs(forward(half, params, data) - data["diffusers_forward/out"]).max()
        assert err > 5e-7, field


# ----------------------------------------------------------------------------------------
# The folder format
# ----------------------------------------------------------------------------------------


def assert_same_params(ours, theirs):
    a, b = flax.traverse_util.flatten_dict(ours), flax.traverse_util.flatten_dict(theirs)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))


def test_reading_the_diffusers_folder_gives_the_official_params(ref):
    data, meta, model, params, folder = ref
    sd, kwargs = diffusers_format.read_diffusers_dit(str(folder))
    assert models.DiT(**kwargs) == model
    np.testing.assert_array_equal(sd["pos_embed"], data["state_dict/pos_embed"])
    loaded_model, loaded = diffusers_format.load_diffusers_dit(str(folder), diffusers_forward=True)
    assert loaded_model == model.clone(**models.DIFFUSERS_FORWARD)
    assert_same_params(loaded, params["params"])
    out = forward(loaded_model, {"params": loaded}, data)
    assert_close(out, data["diffusers_forward/out"], "diffusers forward of the loaded folder")


def test_writing_gives_the_diffusers_folder(ref, tmp_path):
    """Keys, shapes, dtypes and values equal what diffusers itself saved; the config too (with
    the diffusers forward's eps; the official model writes its own, 1e-6)."""
    _, meta, model, params, folder = ref
    out = diffusers_format.write_diffusers_dit(
        str(tmp_path / "dit"), params["params"], model.clone(**models.DIFFUSERS_FORWARD)
    )
    theirs = safetensors.numpy.load_file(str(folder / diffusers_format.WEIGHTS_FILE))
    ours = safetensors.numpy.load_file(f"{out}/{diffusers_format.WEIGHTS_FILE}")
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert config == json.loads((folder / "config.json").read_text()) == meta["diffusers_config"]
    diffusers_format.write_diffusers_dit(str(tmp_path / "official"), params["params"], model)
    assert json.loads((tmp_path / "official" / "config.json").read_text())["norm_eps"] == 1e-6


def test_round_trip_through_a_pipeline_folder(ref, tmp_path):
    """official state dict -> diffusers pipeline folder -> back: the same parameters."""
    data, meta, model, params, folder = ref
    vae = folder.parent / "vae_tiny_diffusers"
    out = diffusers_format.write_diffusers_pipeline(
        str(tmp_path / "pipe"),
        params["params"],
        model,
        str(vae),
        scheduler="dpm",
        id2label={0: "zero"},
    )
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    sched = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    dpm = meta["schedulers"]["dpm"]["config"]
    assert {k: sched[k] for k in dpm} == dpm
    copied = sorted(p.name for p in (tmp_path / "pipe" / "vae").iterdir())
    assert copied == sorted(p.name for p in vae.iterdir())
    loaded_model, loaded = diffusers_format.load_diffusers_dit(out)
    assert loaded_model == model
    assert_same_params(loaded, params["params"])
    ddim = json.loads(json.dumps(diffusers_format.SCHEDULER_CONFIGS["ddim"]))
    assert ddim == {
        k: v
        for k, v in meta["schedulers"]["ddim_diffusers"]["config"].items()
        if k != "_diffusers_version"
    }


def test_diffusers_folder_errors(ref, tmp_path):
    _, _, model, params, folder = ref
    dsd = safetensors.numpy.load_file(str(folder / diffusers_format.WEIGHTS_FILE))
    bad = dict(dsd)
    bad["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] = (
        bad["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] + 1
    )
    with pytest.raises(state_dicts.CheckpointError, match="per-block copies"):
        diffusers_format.state_dict_from_diffusers(bad, model.input_size)
    del bad["proj_out_2.bias"]
    with pytest.raises(state_dicts.CheckpointError, match="missing .*proj_out_2.bias"):
        diffusers_format.state_dict_from_diffusers(bad, model.input_size)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(state_dicts.CheckpointError, match="already exists"):
        diffusers_format.write_diffusers_dit(str(tmp_path / "taken"), params["params"], model)
    with pytest.raises(state_dicts.CheckpointError, match="no such folder"):
        diffusers_format.read_diffusers_dit(str(tmp_path / "nope"))


def test_convert_both_ways(ref, tmp_path):
    """The convert tool: the fixture's official state dict -> a diffusers folder equal to the one
    diffusers wrote; that folder -> a diffusers folder again, unchanged."""
    _, meta, _, _, folder = ref
    npz = reference_path("DIFFUSERS_REFERENCE", "diffusers_tiny").with_suffix(".npz")
    heads = meta["model"]["num_heads"]
    config = weights.convert(
        str(npz),
        str(tmp_path / "a"),
        num_heads=heads,
        prefix="state_dict/",
        output_format="diffusers",
        diffusers_forward=True,
    )
    assert config["num_classes"] == meta["model"]["num_classes"]
    config = weights.convert(
        str(tmp_path / "a"), str(tmp_path / "b"), output_format="diffusers", diffusers_forward=True
    )
    assert config["mlp_norm_eps"] == 1e-5 and config["timestep_freq_shift"] == 1
    theirs = safetensors.numpy.load_file(str(folder / diffusers_format.WEIGHTS_FILE))
    for out in ("a", "b"):
        ours = safetensors.numpy.load_file(str(tmp_path / out / diffusers_format.WEIGHTS_FILE))
        assert sorted(ours) == sorted(theirs)
        for k, v in theirs.items():
            np.testing.assert_array_equal(ours[k], v, err_msg=k)
        assert json.loads((tmp_path / out / "config.json").read_text()) == meta["diffusers_config"]
    with pytest.raises(state_dicts.CheckpointError, match="not DiT-XL/2"):
        weights.convert(str(folder), str(tmp_path / "c"), "XL/2", output_format="diffusers")
