"""Exactness against the official SiT (willisma/SiT): every section of a sit_tiny-style fixture.

The fixture (path without extension) comes from $SIT_REFERENCE, default tests/reference/sit_tiny;
the model is built from the sidecar's `model` section and loaded through the project's own
importer. Tolerance: 1e-4 of each reference array's max-abs value (dopri5: the solver's own
tolerance, since a port's adaptive steps differ). Arrays in the fixture are NCHW; ours are NHWC.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_reference, nhwc, nchw
from dit_jax import diffusion, interpolants, models, weights

TOL = 1e-4
DOPRI5_TOL = 1e-3  # the reference run's rtol: a port's adaptive steps agree to about that


@pytest.fixture(scope="module")
def ref():
    base, data, meta = load_reference("SIT_REFERENCE", "sit_tiny")
    npz = base.with_suffix(".npz")
    model = models.DiT(**meta["model"])
    params = {"params": weights.load_dit_params(str(npz), model, prefix="state_dict/")}
    return data, meta, model, params


def ints(a):
    return jnp.asarray(a, jnp.int32)


def rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    np.testing.assert_array_equal(ours[~finite], theirs[~finite])
    if not finite.any():
        return 0.0
    scale = max(np.abs(theirs[finite]).max(), 1e-12)
    return np.abs(ours[finite] - theirs[finite]).max() / scale


def assert_close(ours, theirs, name, tol=TOL):
    err = rel_err(ours, theirs)
    assert err <= tol, f"{name}: max-abs error {err:.3g} of the reference's max-abs (tol {tol})"


def apply_fn(model, params):
    return lambda x, t, y: model.apply(params, x, t, y)


def guided(model, params, d, name):
    """The sampler's model: cfg over the first half (the fixture's z/y are doubled)."""
    y = ints(d[f"{name}/y"])
    half = y.shape[0] // 2
    fn = diffusion.cfg_model_fn(
        apply_fn(model, params), y[:half], model.num_classes, float(d[f"{name}/cfg_scale"])
    )
    return fn, nhwc(d[f"{name}/z"])[:half], half


def transport(spec):
    c = spec["create_transport"]
    return interpolants.create_interpolant(
        c["path_type"], c["prediction"], c["loss_weight"], c["train_eps"], c["sample_eps"]
    )


def test_forward(ref):
    d, _, model, params = ref
    x, t, y = nhwc(d["forward/x"]), jnp.asarray(d["forward/t"]), ints(d["forward/y"])
    out = model.apply(params, x, t, y)
    assert_close(nchw(out[..., : model.in_channels]), d["forward/out"], "forward")


def test_cfg(ref):
    d, _, model, params = ref
    x, t, y = nhwc(d["cfg/x"]), jnp.asarray(d["cfg/t"]), ints(d["cfg/y"])
    half = x.shape[0] // 2
    fn = diffusion.cfg_model_fn(
        apply_fn(model, params), y[:half], model.num_classes, float(d["cfg/scale"])
    )
    out = fn(x[:half], t[:half])[..., : model.in_channels]
    assert_close(nchw(out), d["cfg/out"][:half], "cfg")


@pytest.mark.parametrize("path", interpolants.PATHS)
def test_plan(ref, path):
    d, _, _, _ = ref
    p = f"plan_{path}/"
    it = interpolants.Interpolant(path)
    t = jnp.asarray(d[p + "t"])
    xt, ut = it.plan(t, nhwc(d[p + "x0"]), nhwc(d[p + "x1"]))
    (a, da), (s, ds) = it.alpha(t), it.sigma(t)
    got = {
        "xt": nchw(xt),
        "ut": nchw(ut),
        "alpha_t": a,
        "d_alpha_t": da,
        "sigma_t": s,
        "d_sigma_t": ds,
        "drift_var": it.drift_coefficients(t)[1],
    }
    for key, value in got.items():
        assert_close(value, d[p + key], p + key)


def test_losses(ref):
    d, meta, model, params = ref
    for name, spec in meta["transports"].items():
        p = name + "/"
        it = transport(spec)
        assert (it.train_eps, it.sample_eps) == (spec["train_eps"], spec["sample_eps"]), name
        t0, t1 = it.time_interval(train=True)
        assert [t0, t1] == spec["t_interval"], name
        assert_close(jnp.asarray(d[p + "u"]) * (t1 - t0) + t0, d[p + "t"], p + "t from u")
        y = ints(d[p + "y"])
        terms = it.training_losses(
            lambda x, t: model.apply(params, x, t, y),
            nhwc(d[p + "x1"]),
            t=jnp.asarray(d[p + "t"]),
            noise=nhwc(d[p + "x0"]),
        )
        assert_close(nchw(terms["x_t"]), d[p + "xt"], p + "xt")
        assert_close(nchw(terms["pred"]), d[p + "pred"], p + "pred")
        assert_close(terms["weight"], d[p + "weight"], p + "weight")
        assert_close(it.sigma(terms["t"])[0], d[p + "sigma_t"], p + "sigma_t")
        assert_close(terms["loss"], d[p + "loss"], p + "loss")


@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_ode_fixed_grid(ref, method):
    d, meta, model, params = ref
    name = f"ode_{method}"
    cfg = meta["samplers"][name]["sample_ode"]
    it = transport(meta["sampler_transport"])
    fn, z, half = guided(model, params, d, name)
    assert_close(it.ode_grid(cfg["num_steps"]), d[name + "/t_grid"], name + " grid")
    traj = jax.jit(
        lambda z: it.sample_ode(
            fn, z, method=method, num_steps=cfg["num_steps"], return_trajectory=True
        )
    )(z)
    assert_close(nchw(traj), d[name + "/trajectory"][:, :half], name + " trajectory")
    assert_close(nchw(traj[-1]), d[name + "/sample"][:half], name + " sample")


def test_ode_dopri5(ref):
    d, meta, model, params = ref
    cfg = meta["samplers"]["ode_dopri5"]["sample_ode"]
    it = transport(meta["sampler_transport"])
    fn, z, half = guided(model, params, d, "ode_dopri5")
    out = jax.jit(
        lambda z: it.sample_ode(
            fn, z, method="dopri5", num_steps=cfg["num_steps"], atol=cfg["atol"], rtol=cfg["rtol"]
        )
    )(z)
    assert_close(nchw(out), d["ode_dopri5/sample"][:half], "dopri5 sample", DOPRI5_TOL)


@pytest.mark.parametrize("name", ["sde_Euler", "sde_Euler_Tweedie", "sde_Heun", "sde_Heun_Tweedie"])
def test_sde(ref, name):
    d, meta, model, params = ref
    cfg = dict(meta["samplers"][name]["sample_sde"])
    it = transport(meta["sampler_transport"])
    fn, z, half = guided(model, params, d, name)
    grid = it.sde_grid(cfg["num_steps"], cfg["diffusion_form"], cfg["last_step_size"])
    assert_close(grid, d[name + "/t_grid"], name + " grid")
    noise = nhwc(d[name + "/step_noise"])[:, :half]
    method = cfg.pop("sampling_method")
    traj = jax.jit(
        lambda z, n: it.sample_sde(
            fn, z, method=method, step_noise=n, return_trajectory=True, **cfg
        )
    )(z, noise)
    assert_close(nchw(traj), d[name + "/trajectory"][:, :half], name + " trajectory")
    assert_close(nchw(traj[-1]), d[name + "/sample"][:half], name + " sample")


def test_full_cfg_batch_as_reference(ref):
    """The reference's own batching (forward_with_cfg on cat([z, z])) reproduces both halves."""
    d, meta, model, params = ref
    y = ints(d["ode_euler/y"])
    fn = lambda x, t: model.apply(
        params, x, t, y, float(d["ode_euler/cfg_scale"]), method=models.DiT.forward_with_cfg
    )
    it = transport(meta["sampler_transport"])
    run = jax.jit(lambda z: it.sample_ode(fn, z, method="euler", num_steps=8))
    out = run(nhwc(d["ode_euler/z"]))
    assert_close(nchw(out), d["ode_euler/sample"], "euler, full cfg batch")


def test_singular_settings_raise():
    it = interpolants.Interpolant("Linear", "velocity")
    fn = lambda x, t: x
    z = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="non-finite"):
        it.sample_sde(fn, z, diffusion_form="SBDM", num_steps=4, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="non-finite"):
        it.sample_sde(
            fn,
            z,
            method="Heun",
            diffusion_form="sigma",
            last_step=None,
            num_steps=4,
            key=jax.random.PRNGKey(0),
        )
    # Euler without a last step never reaches t = 1: fine, as in the reference.
    out = it.sample_sde(
        fn, z, diffusion_form="sigma", last_step=None, num_steps=4, key=jax.random.PRNGKey(0)
    )
    assert np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="loss_weight"):
        interpolants.Interpolant("Linear", "velocity", "likelihood")
    with pytest.raises(ValueError, match="leave"):
        interpolants.Interpolant("GVP", "velocity", train_eps=1e-3)


@pytest.mark.parametrize("method,steps,tol", [("dopri5", 2, 1e-4), ("heun2", 32, 1e-3)])
def test_ode_inversion_round_trip(ref, method, steps, tol):
    """noise -> image -> noise with the reversed ODE (t from 1 to 0), the fixture's guided model."""
    d, meta, model, params = ref
    fn, z, _ = guided(model, params, d, "ode_euler")
    it = interpolants.Interpolant()
    kw = dict(method=method, num_steps=steps, atol=1e-6, rtol=1e-5)
    image, back = jax.jit(
        lambda z: (lambda x: (x, it.sample_ode(fn, x, reverse=True, **kw)))(
            it.sample_ode(fn, z, **kw)
        )
    )(z)
    assert rel_err(image, z) > 0.1  # the flow moves the state: the round trip is not trivial
    assert_close(back, z, f"{method} round trip", tol)


@pytest.mark.parametrize("path", interpolants.PATHS)
@pytest.mark.parametrize("prediction", interpolants.PREDICTIONS)
def test_every_setting_runs(path, prediction):
    """Every path and prediction: a loss with drawn t and noise (and its gradient), the ODE both
    ways and the SDE from a key (SBDM where the interval allows it), all finite."""
    weight = None if prediction == "velocity" else "likelihood"
    it = interpolants.Interpolant(path, prediction, weight)
    x1 = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 2))

    def loss(a):
        return it.training_losses(lambda x, t: a * x, x1, jax.random.PRNGKey(1))["loss"].mean()

    value, grad = jax.value_and_grad(loss)(0.5)
    form = "sigma" if (prediction == "velocity" and path != "VP") else "SBDM"
    fn = lambda x, t: 0.5 * x
    outs = [
        value,
        grad,
        it.sample_ode(fn, x1, method="heun2", num_steps=4),
        it.sample_sde(
            fn,
            x1,
            method="Heun",
            diffusion_form=form,
            num_steps=4,
            last_step="Tweedie",
            key=jax.random.PRNGKey(2),
        ),
    ]
    for out in outs:
        assert np.isfinite(np.asarray(out)).all()
    if (path, prediction) == ("VP", "noise"):
        # reversed, VP starts at t = 1 where sigma_t = 0 and the noise -> score division is inf
        with pytest.raises(ValueError, match="non-finite"):
            it.sample_ode(fn, x1, method="euler", num_steps=4, reverse=True)
    else:
        out = it.sample_ode(fn, x1, method="euler", num_steps=4, reverse=True)
        assert np.isfinite(np.asarray(out)).all()
