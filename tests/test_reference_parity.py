"""Exactness against the official PyTorch DiT: every section of a dit_tiny-style fixture.

The fixture (path without extension) comes from $DIT_REFERENCE, default
tests/reference/dit_tiny; the model is built from the sidecar's `model` section and the
weights are loaded through the project's own importer, so any fixture of this kind (other
sizes, patch sizes, class counts, batch sizes) runs through the same test. Tolerance: 1e-4 of
each reference array's max-abs value. Arrays in the fixture are NCHW; ours are NHWC.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_reference, nhwc, nchw
from dit_jax import diffusion, models, param_mapping, state_dicts, weights

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    base, data, meta = load_reference("DIT_REFERENCE", "dit_tiny")
    npz = base.with_suffix(".npz")
    model = models.DiT(**meta["model"])
    params = {"params": weights.load_dit_params(str(npz), model, prefix="state_dict/")}
    return data, model, params


def ints(a):
    return jnp.asarray(a, jnp.int32)


def assert_close(ours, theirs, name):
    theirs = np.asarray(theirs)
    scale = max(np.abs(theirs).max(), 1e-12)
    err = np.abs(np.asarray(ours, np.float64) - theirs).max() / scale
    assert err <= TOL, (
        f"{name}: max-abs error {err:.3g} of the reference's max-abs (tolerance {TOL})"
    )


def model_fn(model, params, y):
    return lambda x, t: model.apply(params, x, t, y)


def cfg_fn(model, params, y, scale):
    return lambda x, t: model.apply(params, x, t, y, scale, method=models.DiT.forward_with_cfg)


def test_forward(ref):
    d, model, params = ref
    out = model.apply(params, nhwc(d["forward/x"]), ints(d["forward/t"]), ints(d["forward/y"]))
    assert_close(nchw(out), d["forward/out"], "forward")


def test_official_weights_load_into_and_out_of_a_scanned_model(ref):
    """The official checkpoint in a model whose blocks are one nn.scan: same forward, and the
    stacked parameters write back to exactly the official state dict."""
    d, model, _ = ref
    npz = load_reference("DIT_REFERENCE", "dit_tiny")[0].with_suffix(".npz")
    scanned = model.clone(scan_blocks=True)
    params = weights.load_dit_params(str(npz), scanned, prefix="state_dict/")
    assert "blocks" in params and "blocks_0" not in params
    assert jax.tree_util.tree_leaves(params["blocks"])[0].shape[0] == model.depth
    out = scanned.apply(
        {"params": params}, nhwc(d["forward/x"]), ints(d["forward/t"]), ints(d["forward/y"])
    )
    assert_close(nchw(out), d["forward/out"], "forward (scanned blocks)")
    official = state_dicts.read_state_dict(str(npz), prefix="state_dict/")
    written = param_mapping.state_dict_from_dit_params(params, model.patch_size)
    assert sorted(written) == sorted(official)
    for key, value in official.items():
        np.testing.assert_array_equal(written[key], np.asarray(value, np.float32), err_msg=key)


def test_forward_with_cfg(ref):
    d, model, params = ref
    out = model.apply(
        params,
        nhwc(d["cfg/x"]),
        ints(d["cfg/t"]),
        ints(d["cfg/y"]),
        float(d["cfg/scale"]),
        method=models.DiT.forward_with_cfg,
    )
    assert_close(nchw(out), d["cfg/out"], "forward_with_cfg")


def test_cfg_model_fn_matches_official_batching(ref):
    """The sampler's guided model (B inputs, doubled internally) equals forward_with_cfg."""
    d, model, params = ref
    x, t, y = nhwc(d["cfg/x"]), ints(d["cfg/t"]), ints(d["cfg/y"])
    half = x.shape[0] // 2
    fn = diffusion.cfg_model_fn(
        lambda a, b, c: model.apply(params, a, b, c),
        y[:half],
        model.num_classes,
        float(d["cfg/scale"]),
    )
    assert_close(nchw(fn(x[:half], t[:half])), d["cfg/out"][:half], "cfg_model_fn")


def test_schedules(ref):
    d, _, _ = ref
    base = diffusion.create_diffusion("")
    assert base.betas.dtype == np.float64
    assert_close(base.betas, d["schedule/betas"], "betas")
    n = len(d["respace250/timestep_map"])
    spaced = diffusion.create_diffusion(str(n))
    np.testing.assert_array_equal(spaced.timestep_map, d["respace250/timestep_map"])
    assert_close(spaced.betas, d["respace250/betas"], "respaced betas")
    loop = diffusion.create_diffusion(str(len(d["ddpm/timestep_map"])))
    np.testing.assert_array_equal(loop.timestep_map, d["ddpm/timestep_map"])


def test_training_losses(ref):
    d, model, params = ref
    base = diffusion.create_diffusion("")
    terms = base.training_losses(
        model_fn(model, params, ints(d["loss/y"])),
        nhwc(d["loss/x0"]),
        ints(d["loss/t"]),
        nhwc(d["loss/noise"]),
    )
    assert_close(nchw(terms["x_t"]), d["loss/x_t"], "x_t")
    for key in ("loss", "mse", "vb"):
        assert_close(terms[key], d[f"loss/{key}"], key)


def test_p_mean_variance(ref):
    d, model, params = ref
    spaced = diffusion.create_diffusion(str(len(d["respace250/timestep_map"])))
    out = spaced.p_mean_variance(
        model_fn(model, params, ints(d["pmv/y"])), nhwc(d["pmv/x_t"]), ints(d["pmv/index"])
    )
    for key in ("mean", "log_variance", "pred_xstart"):
        assert_close(nchw(out[key]), d[f"pmv/{key}"], key)


def test_ddpm_loop_with_given_noise(ref):
    d, model, params = ref
    spaced = diffusion.create_diffusion(str(len(d["ddpm/timestep_map"])))
    fn = cfg_fn(model, params, ints(d["ddpm/y"]), float(d["ddpm/cfg_scale"]))
    step_noise = jnp.asarray(np.transpose(d["ddpm/step_noise"], (0, 1, 3, 4, 2)))
    out = jax.jit(lambda z, n: spaced.p_sample_loop(fn, z, step_noise=n))(
        nhwc(d["ddpm/z"]), step_noise
    )
    assert_close(nchw(out), d["ddpm/sample"], "ddpm sample")


def test_ddim_loop(ref):
    d, model, params = ref
    spaced = diffusion.create_diffusion(str(len(d["ddpm/timestep_map"])))
    fn = cfg_fn(model, params, ints(d["ddpm/y"]), float(d["ddpm/cfg_scale"]))
    out = jax.jit(lambda z: spaced.ddim_sample_loop(fn, z, eta=0.0))(nhwc(d["ddpm/z"]))
    assert_close(nchw(out), d["ddim/sample"], "ddim sample")


def test_ddim_reverse_step(ref):
    d, model, params = ref
    spaced = diffusion.create_diffusion(str(len(d["ddpm/timestep_map"])))
    out = spaced.ddim_reverse_sample(
        model_fn(model, params, ints(d["ddim_reverse/y"])),
        nhwc(d["ddim_reverse/x"]),
        ints(d["ddim_reverse/index"]),
    )
    assert_close(nchw(out), d["ddim_reverse/sample"], "ddim reverse step")


def test_export_round_trip(ref):
    """Flax params -> official state dict reproduces the fixture's tensors exactly."""
    d, model, params = ref
    sd = param_mapping.state_dict_from_dit_params(params["params"], model.patch_size)
    expected = {k[len("state_dict/") :]: v for k, v in d.items() if k.startswith("state_dict/")}
    assert set(sd) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
