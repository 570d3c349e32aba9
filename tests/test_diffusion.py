"""Diffusion process: schedules, respacing, losses, compiled samplers, inversion, guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import diffusion


def test_space_timesteps_forms():
    assert diffusion.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert diffusion.space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    steps = diffusion.space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert steps[:10] == [round(i * 99 / 9) for i in range(10)]
    assert steps[10] == 100 and steps[-1] == 299
    assert diffusion.space_timesteps(1000, "") == list(range(1000))
    assert len(diffusion.space_timesteps(1000, "250")) == 250


@pytest.mark.parametrize("bad", ["ddim7x", "2000", "abc", "ddim3000"])
def test_space_timesteps_bad(bad):
    with pytest.raises(ValueError):
        diffusion.space_timesteps(1000, bad)


def test_respacing_preserves_alphas_cumprod():
    base = diffusion.create_diffusion("")
    spaced = diffusion.create_diffusion("25,10,5")
    np.testing.assert_allclose(
        spaced.consts["alphas_cumprod"],
        base.consts["alphas_cumprod"][spaced.timestep_map],
        rtol=1e-12,
    )
    assert diffusion.create_diffusion("25,10,5") is spaced  # cached: a stable jit static argument


def test_schedules():
    lin = diffusion.named_beta_schedule("linear", 1000)
    assert lin.dtype == np.float64 and lin[0] == 1e-4 and abs(lin[-1] - 0.02) < 1e-15
    cos = diffusion.named_beta_schedule("cosine", 1000)
    ac = np.cumprod(1 - cos)
    assert cos.max() <= 0.999 and np.all(np.diff(ac) < 0) and ac[0] > 0.9999
    np.testing.assert_allclose(
        ac[499],
        np.cos((0.5 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2,
        rtol=1e-6,
    )
    with pytest.raises(ValueError):
        diffusion.named_beta_schedule("sigmoid")


def test_vb_term_only_trains_the_variance():
    d = diffusion.create_diffusion("")
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 2)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.array([0, 10, 900])
    out0 = jnp.asarray(rng.standard_normal((3, 4, 4, 4)) * 0.5, jnp.float32)

    def vb(out):
        return d.training_losses(lambda x, tt: out, x0, t, noise)["vb"].sum()

    def mse(out):
        return d.training_losses(lambda x, tt: out, x0, t, noise)["mse"].sum()

    g_vb, g_mse = jax.grad(vb)(out0), jax.grad(mse)(out0)
    assert not np.any(g_vb[..., :2]) and np.any(g_vb[..., 2:])
    assert np.any(g_mse[..., :2]) and not np.any(g_mse[..., 2:])
    # a model that predicts the true noise has zero mse
    perfect = d.training_losses(
        lambda x, tt: jnp.concatenate([noise, out0[..., 2:]], -1), x0, t, noise
    )
    np.testing.assert_allclose(perfect["mse"], 0, atol=1e-12)
    np.testing.assert_allclose(perfect["loss"], perfect["vb"])


def test_fixed_variance_types():
    for learn_sigma, small, expected in (
        (False, True, "posterior_variance"),
        (False, False, "fixed_large_variance"),
    ):
        d = diffusion.create_diffusion("50", learn_sigma=learn_sigma, sigma_small=small)
        x = jnp.ones((2, 2, 2, 1))
        t = jnp.array([0, 30])
        out = d.p_mean_variance(lambda a, b: jnp.zeros_like(a), x, t)
        np.testing.assert_allclose(
            out["variance"][:, 0, 0, 0], d.consts[expected][[0, 30]], rtol=1e-6
        )
        terms = d.training_losses(lambda a, b: jnp.zeros_like(a), x, t, x)
        np.testing.assert_allclose(terms["loss"], terms["mse"])


def smooth_eps(x, t):
    """A deterministic stand-in model: smooth in x, depends on t, learned-sigma layout."""
    scale = 0.3 + 0.2 * jnp.cos(t.astype(jnp.float32) / 300.0)[:, None, None, None]
    eps = jnp.tanh(x) * scale
    return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)


def test_samplers_are_single_compiled_loops():
    d = diffusion.create_diffusion("50")
    z = jnp.zeros((2, 4, 4, 3))
    calls = []

    def counting(x, t):
        calls.append(1)
        return smooth_eps(x, t)

    jaxpr = jax.make_jaxpr(lambda z, k: d.p_sample_loop(counting, z, key=k))(z, jax.random.key(0))
    assert len(calls) == 1  # the model is traced once, inside one scan
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 50


def test_ddpm_uses_keys_and_skips_noise_at_the_last_step():
    d = diffusion.create_diffusion("20")
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    run = jax.jit(lambda z, k: d.p_sample_loop(smooth_eps, z, key=k))
    a, b, c = run(z, jax.random.key(1)), run(z, jax.random.key(1)), run(z, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    noise = jax.random.normal(jax.random.key(3), (20,) + z.shape)
    given = jax.jit(lambda z, n: d.p_sample_loop(smooth_eps, z, step_noise=n))
    np.testing.assert_array_equal(given(z, noise), given(z, noise.at[-1].set(100.0)))
    with pytest.raises(ValueError, match="step_noise must have shape"):
        d.p_sample_loop(smooth_eps, z, step_noise=noise[:3])
    with pytest.raises(ValueError, match="key"):
        d.p_sample_loop(smooth_eps, z)


def gaussian_data_eps(x, t, data_std=0.5):
    """The exact noise predictor when the data is N(0, data_std^2): eps = sqrt(1-a) x / (a s^2 + 1 - a)."""
    ab = jnp.asarray(diffusion.create_diffusion("").consts["alphas_cumprod"], jnp.float32)[t][
        :, None, None, None
    ]
    eps = jnp.sqrt(1 - ab) * x / (ab * data_std**2 + 1 - ab)
    return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)


def test_ddim_inversion_round_trip_converges():
    """x0 -> xT -> x0 with the exact eps of Gaussian data: first-order error, shrinking with steps."""
    x0 = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), minval=-1, maxval=1)
    errors = {}
    for spacing in ("ddim250", ""):
        d = diffusion.create_diffusion(spacing)
        xT = jax.jit(lambda x: d.ddim_reverse_sample_loop(gaussian_data_eps, x))(x0)
        assert float(jnp.std(xT)) > 1.5 * float(
            jnp.std(x0)
        )  # it went to the noise scale (x0 / 0.5)
        recon = jax.jit(lambda z: d.ddim_sample_loop(gaussian_data_eps, z))(xT)
        errors[spacing] = float(jnp.abs(recon - x0).max())
    assert errors[""] < 0.01, errors
    assert errors["ddim250"] > 3 * errors[""], errors


def test_ddim_eta():
    d = diffusion.create_diffusion("ddim50")
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    stochastic = jax.jit(lambda z, k: d.ddim_sample_loop(gaussian_data_eps, z, eta=1.0, key=k))
    assert not np.allclose(stochastic(z, jax.random.key(0)), stochastic(z, jax.random.key(1)))
    with pytest.raises(ValueError, match="eta"):
        d.ddim_sample_loop(gaussian_data_eps, z, eta=0.5)


def test_cfg_model_fn_formula():
    labels = jnp.array([1, 2])

    def apply(x, t, y):  # output depends on the label so the halves differ
        return jnp.concatenate(
            [x + y[:, None, None, None], x * 0 + 10 * y[:, None, None, None]], -1
        )

    x = jnp.ones((2, 2, 2, 4))
    t = jnp.zeros((2,), jnp.int32)
    null = 5
    for channels, guided in ((3, slice(0, 3)), (None, slice(0, 4))):
        out = diffusion.cfg_model_fn(apply, labels, null, 2.0, channels)(x, t)
        cond, uncond = apply(x, t, labels), apply(x, t, jnp.full((2,), null))
        want = uncond + 2.0 * (cond - uncond)
        np.testing.assert_allclose(out[..., guided], want[..., guided])
        rest = np.arange(8)[guided.stop :]
        np.testing.assert_allclose(out[..., rest], cond[..., rest])


def test_guidance_never_touches_the_variance_channels_of_a_one_channel_model():
    """Official 3-channel guidance on a 1-channel model with learned sigma (2 output channels)
    guides the one epsilon channel; the variance channel stays the conditional prediction."""
    labels = jnp.array([1, 2])

    def apply(x, t, y):
        return jnp.concatenate(
            [x + y[:, None, None, None], x * 0 + 10 * y[:, None, None, None]], -1
        )

    x = jnp.ones((2, 2, 2, 1))
    t = jnp.zeros((2,), jnp.int32)
    cond, uncond = apply(x, t, labels), apply(x, t, jnp.full((2,), 5))
    for channels in (3, None):
        out = diffusion.cfg_model_fn(apply, labels, 5, 2.0, channels)(x, t)
        np.testing.assert_allclose(out[..., :1], (uncond + 2.0 * (cond - uncond))[..., :1])
        np.testing.assert_allclose(out[..., 1:], cond[..., 1:])


def test_guidance_interval_guides_only_inside_it():
    labels = jnp.array([1, 2, 3])

    def apply(x, t, y):
        return jnp.concatenate([x + y[:, None, None, None], x * 0 + t[:, None, None, None]], -1)

    x = jnp.ones((3, 2, 2, 4))
    t = jnp.array([100, 500, 900])
    cond = apply(x, t, labels)
    guided = diffusion.cfg_model_fn(apply, labels, 9, 3.0, None)(x, t)
    out = diffusion.cfg_model_fn(apply, labels, 9, 3.0, None, guidance_interval=(200, 600))(x, t)
    np.testing.assert_allclose(out[1], guided[1])
    np.testing.assert_allclose(out[0], cond[0])
    np.testing.assert_allclose(out[2], cond[2])
    assert not np.allclose(guided[0], cond[0])


def test_dpm_solver_clip_denoised_clips_the_data_predictions():
    """Pixel-space runs clip x0 predictions (as DDPM/DDIM do): without it a cosine schedule's
    tiny alpha at t = 999 blows the first data prediction up."""
    from dit_jax import solvers

    schedule = diffusion.create_diffusion("", noise_schedule="cosine")
    fn = lambda x, t: jnp.zeros_like(x)  # eps = 0: x0 = x / alpha
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    free = solvers.dpm_solver_sample_loop(fn, z, 10, schedule=schedule)
    clipped = solvers.dpm_solver_sample_loop(fn, z, 10, schedule=schedule, clip_denoised=True)
    assert float(jnp.abs(free).max()) > 10
    assert float(jnp.abs(clipped).max()) <= 1.0
