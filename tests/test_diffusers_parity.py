"""Exactness against diffusers: DPM-Solver++ and DDIM schedulers, DiTTransformer2DModel.

The fixture (path without extension) comes from $DIFFUSERS_REFERENCE, default
tests/reference/diffusers_tiny (+ the diffusers folder next to it, named in the sidecar); the
model is built from the sidecar's `model` section. Trajectories were driven by the official
model with the official guidance (3 guided channels) on the doubled batch [z; z]; the first
half is what `diffusion.cfg_model_fn` computes. Tolerance: 1e-4 of the reference's max-abs
value, per step (the random model's latents grow to hundreds). Arrays are NCHW there.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import reference_path
from dit_jax import checkpoints, diffusion, models, solvers

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    base = reference_path("DIFFUSERS_REFERENCE", "diffusers_tiny")
    npz, sidecar = base.with_suffix(".npz"), base.with_suffix(".json")
    assert npz.is_file() and sidecar.is_file(), f"diffusers reference fixture not found at {base}"
    data = dict(np.load(npz))
    meta = json.loads(sidecar.read_text())
    folder = base.parent / meta["diffusers_folder"]["path_as_generated"]
    model = models.DiT(**meta["model"])
    sd = {k[len("state_dict/"):]: v for k, v in data.items() if k.startswith("state_dict/")}
    params = {"params": checkpoints.dit_params_from_state_dict(sd, model)}
    return data, meta, model, params, folder


def nhwc(a):
    return jnp.asarray(np.moveaxis(np.asarray(a), -3, -1))


def assert_close(ours, theirs, name):
    theirs = np.asarray(theirs)
    scale = max(np.abs(theirs).max(), 1e-12)
    err = np.abs(np.asarray(ours, np.float64) - theirs).max() / scale
    assert err <= TOL, f"{name}: max-abs error {err:.3g} of the reference's max-abs (tolerance {TOL})"


def guided(model, params, data, name):
    """The guided model over the first half of the fixture's doubled batch, and that half's z."""
    z, y = nhwc(data[f"{name}/z"]), jnp.asarray(data[f"{name}/y"], jnp.int32)
    half = z.shape[0] // 2
    fn = diffusion.cfg_model_fn(lambda a, b, c: model.apply(params, a, b, c), y[:half],
                                model.num_classes, float(data[f"{name}/cfg_scale"]))
    return fn, z[:half], half


# ----------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpm", "dpm3"])
def test_dpm_schedule(ref, name):
    data, meta, _, _, _ = ref
    info = meta["schedulers"][name]
    steps, cfg = len(info["timesteps"]), info["config"]
    sch = solvers.dpm_solver_schedule(steps, order=cfg["solver_order"], spacing=cfg["timestep_spacing"],
                                      lower_order_final=cfg["lower_order_final"])
    np.testing.assert_array_equal(sch.timesteps, data[f"{name}/timesteps"])
    np.testing.assert_allclose(sch.sigmas, data[f"{name}/sigmas"], rtol=1e-6)
    assert sch.orders.tolist() == info["step_orders"]


def test_spacings(ref):
    _, meta, _, _, _ = ref
    ddim = meta["schedulers"]["ddim_diffusers"]
    np.testing.assert_array_equal(solvers.ddim_timesteps(len(ddim["timesteps"]), ddim["config"]["timestep_spacing"]),
                                  ddim["timesteps"])
    for case in meta["scheduler_notes"]["from_config_trap"].values():
        np.testing.assert_array_equal(solvers.dpm_timesteps(len(case["timesteps"]), case["timestep_spacing"]),
                                      case["timesteps"])
    np.testing.assert_array_equal(solvers.dpm_timesteps(8, "trailing"), [999, 874, 749, 624, 499, 374, 249, 124])
    np.testing.assert_array_equal(solvers.ddim_timesteps(4, "linspace"), [999, 666, 333, 0])


@pytest.mark.parametrize("name", ["dpm", "dpm3"])
def test_dpm_solver_trajectory(ref, name):
    data, meta, model, params, _ = ref
    cfg = meta["schedulers"][name]["config"]
    fn, z, half = guided(model, params, data, name)
    steps = len(data[f"{name}/timesteps"])
    x, traj = jax.jit(lambda z: solvers.dpm_solver_sample_loop(
        fn, z, steps, order=cfg["solver_order"], spacing=cfg["timestep_spacing"], return_trajectory=True))(z)
    ref_traj = data[f"{name}/trajectory"][:, :half]
    for i in range(steps):
        assert_close(np.moveaxis(np.asarray(traj[i]), -1, -3), ref_traj[i], f"{name} step {i}")
    assert_close(np.moveaxis(np.asarray(x), -1, -3), data[f"{name}/sample"][:half], f"{name} sample")


def test_diffusers_ddim_trajectory(ref):
    data, meta, model, params, _ = ref
    cfg = meta["schedulers"]["ddim_diffusers"]["config"]
    fn, z, half = guided(model, params, data, "ddim_diffusers")
    steps = len(data["ddim_diffusers/timesteps"])
    x, traj = jax.jit(lambda z: solvers.ddim_sample_loop(
        fn, z, steps, spacing=cfg["timestep_spacing"], set_alpha_to_one=cfg["set_alpha_to_one"],
        steps_offset=cfg["steps_offset"], return_trajectory=True))(z)
    ref_traj = data["ddim_diffusers/trajectory"][:, :half]
    for i in range(steps):
        assert_close(np.moveaxis(np.asarray(traj[i]), -1, -3), ref_traj[i], f"ddim step {i}")
    assert_close(np.moveaxis(np.asarray(x), -1, -3), data["ddim_diffusers/sample"][:half], "ddim sample")


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
    assert_close(forward(flavored, params, data), data["diffusers_forward/out"], "diffusers forward")
    # each of the two differences matters on its own (the timestep formula by far the most)
    for field in models.DIFFUSERS_FORWARD:
        half = model.clone(**{field: models.DIFFUSERS_FORWARD[field]})
        err = np.abs(forward(half, params, data) - data["diffusers_forward/out"]).max()
        assert err > 5e-7, field

