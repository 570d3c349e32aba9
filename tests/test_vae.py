"""Exactness of the Flax AutoencoderKL against diffusers: every section of a vae_tiny-style fixture.

The fixture (path without extension) comes from $VAE_REFERENCE, default
tests/reference/vae_tiny; the model is built from the sidecar's `config` section, so any
fixture of this kind runs through the same test. Its diffusers folder (save_pretrained of the
same model) is <fixture>_diffusers/. Tolerance: 1e-4 of each reference array's max-abs value.
Arrays in the fixture are NCHW (trace_* for image 0 only); ours are NHWC.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_reference, nhwc
from dit_jax import state_dicts, vae

TOL = 1e-4
BF16_TOL = 5e-2


@pytest.fixture(scope="module")
def ref():
    base, data, meta = load_reference("VAE_REFERENCE", "vae_tiny")
    npz = base.with_suffix(".npz")
    config = vae.VAEConfig.from_dict(meta["config"])
    model = vae.AutoencoderKL(config)
    params = vae.vae_params_from_state_dict(
        state_dict(data, "state_dict/"), config, source=str(npz)
    )
    return dict(data=data, meta=meta, config=config, model=model, params=params, base=base)


@pytest.fixture(scope="module")
def encode_fn(ref):
    model = ref["model"]
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))


@pytest.fixture(scope="module")
def decode_fn(ref):
    model = ref["model"]
    return jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))


def state_dict(data, prefix):
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}


def rel_err(ours, theirs):
    theirs = np.asarray(theirs, np.float64)
    return np.abs(np.asarray(ours, np.float64) - theirs).max() / max(np.abs(theirs).max(), 1e-12)


def assert_close(ours, theirs, name, tol=TOL):
    assert np.shape(ours) == np.shape(theirs), (
        f"{name}: shape {np.shape(ours)} != {np.shape(theirs)}"
    )
    err = rel_err(ours, theirs)
    assert err <= tol, (
        f"{name}: max-abs error {err:.3g} of the reference's max-abs (tolerance {tol})"
    )


def test_encode_posterior(ref, encode_fn):
    d = ref["data"]
    moments = encode_fn(ref["params"], nhwc(d["encode/x"]))
    assert moments.dtype == jnp.float32
    assert_close(moments, nhwc(d["encode/moments"]), "encode/moments")
    post = vae.DiagonalGaussian.from_moments(moments)
    assert_close(post.mean, nhwc(d["encode/mean"]), "encode/mean")
    assert_close(post.logvar, nhwc(d["encode/logvar"]), "encode/logvar")
    assert_close(post.std, nhwc(d["encode/std"]), "encode/std")
    assert_close(
        post.sample_with_noise(nhwc(d["encode/noise"])), nhwc(d["encode/sample"]), "encode/sample"
    )
    # sample(key) is mean + std * N(0, 1) with the key's noise
    sampled, noise = jax.jit(lambda q, k: (q.sample(k), jax.random.normal(k, q.mean.shape)))(
        post, jax.random.key(3)
    )
    np.testing.assert_allclose(sampled, post.sample_with_noise(noise), rtol=1e-6, atol=1e-6)


def test_decode(ref, decode_fn):
    d = ref["data"]
    out = decode_fn(ref["params"], nhwc(d["encode/mean"]))
    assert out.dtype == jnp.float32
    assert_close(out, nhwc(d["decode_mean/sample"]), "decode_mean/sample")
    assert_close(
        decode_fn(ref["params"], nhwc(d["decode_z/z"])),
        nhwc(d["decode_z/sample"]),
        "decode_z/sample",
    )


def test_clamp(ref):
    d = ref["data"]
    assert (d["clamp/moments"] < vae.LOGVAR_RANGE[0]).any() and (
        d["clamp/moments"] > vae.LOGVAR_RANGE[1]
    ).any()
    post = vae.DiagonalGaussian.from_moments(nhwc(d["clamp/moments"]))
    for name in ("mean", "logvar", "std"):
        assert_close(getattr(post, name), nhwc(d[f"clamp/{name}"]), f"clamp/{name}")


def _flax_path(module_name):
    """'encoder.mid_block.attentions.0' -> ('encoder', 'mid_block', 'attentions_0')."""
    return tuple(re.sub(r"\.(\d+)", r"_\1", module_name).split("."))


def _traced(intermediates, module_name):
    node = intermediates
    for part in _flax_path(module_name):
        node = node[part]
    return node["__call__"][0]


@pytest.mark.parametrize(
    "section,method,input_key",
    [
        ("trace_encode", "encode", "encode/x"),
        ("trace_decode_z", "decode", "decode_z/z"),
    ],
)
def test_traces(ref, section, method, input_key):
    d, model = ref["data"], ref["model"]
    names = sorted(k[len(section) + 1 :] for k in d if k.startswith(section + "/"))
    assert names, f"no {section}/* arrays in the fixture"
    run = jax.jit(
        lambda p, x: model.apply(
            {"params": p}, x, method=method, capture_intermediates=True, mutable=["intermediates"]
        )[1]["intermediates"]
    )
    inter = run(ref["params"], nhwc(d[input_key][:1]))
    for name in names:
        assert_close(_traced(inter, name), nhwc(d[f"{section}/{name}"]), f"{section}/{name}")


def test_legacy_attention_names(ref):
    d, config = ref["data"], ref["config"]
    legacy = state_dict(d, "legacy_state_dict/")
    renamed = list(ref["meta"]["legacy_renamed_keys"])
    assert renamed and all(k in legacy for k in renamed)
    params = vae.vae_params_from_state_dict(legacy, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref["params"])
    # older checkpoints store the attention projections as 1x1 convolutions
    as_conv = {
        k: (v[:, :, None, None] if k in renamed and v.ndim == 2 else v) for k, v in legacy.items()
    }
    assert any(v.ndim == 4 for k, v in as_conv.items() if k in renamed)
    params = vae.vae_params_from_state_dict(as_conv, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref["params"])


def test_load_diffusers_folder(ref, decode_fn):
    folder = ref["base"].with_name(ref["base"].name + "_diffusers")
    assert (folder / "config.json").is_file(), (
        f"diffusers folder of the VAE fixture not found at {folder}"
    )
    model, params = vae.load_vae(folder)
    assert model.config == ref["config"] and model.dtype == jnp.float32
    assert all(v.dtype == np.float32 for v in jax.tree_util.tree_leaves(params))
    d = ref["data"]
    assert_close(
        decode_fn(params, nhwc(d["decode_z/z"])),
        nhwc(d["decode_z/sample"]),
        "folder decode_z/sample",
    )


def test_hub_config_defaults(ref, tmp_path):
    hub = {
        k: v
        for k, v in ref["meta"]["config"].items()
        if k
        not in (
            "scaling_factor",
            "shift_factor",
            "latents_mean",
            "latents_std",
            "force_upcast",
            "use_quant_conv",
            "use_post_quant_conv",
            "mid_block_add_attention",
        )
    }
    hub["_diffusers_version"] = "0.4.2"
    (tmp_path / "config.json").write_text(json.dumps(hub))
    for cfg in (vae.VAEConfig.from_dict(hub), vae.VAEConfig.from_json(tmp_path / "config.json")):
        assert cfg.scaling_factor == 0.18215
        assert cfg.shift_factor is None and cfg.latents_mean is None and cfg.latents_std is None
        assert (
            cfg.force_upcast
            and cfg.use_quant_conv
            and cfg.use_post_quant_conv
            and cfg.mid_block_add_attention
        )
        assert cfg.block_out_channels == tuple(hub["block_out_channels"])
        assert cfg == dataclasses.replace(
            ref["config"],
            scaling_factor=0.18215,
            shift_factor=None,
            latents_mean=None,
            latents_std=None,
            force_upcast=True,
            use_quant_conv=True,
            use_post_quant_conv=True,
            mid_block_add_attention=True,
        )
    hash(ref["config"])  # frozen and hashable (a jit cache key)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref["config"].scaling_factor = 1.0


def test_bf16_encode_decode(ref):
    d, model, params = ref["data"], ref["model"], ref["params"]
    post = vae.encode_images(model, params, nhwc(d["encode/x"]), dtype=jnp.bfloat16)
    assert post.mean.dtype == np.float32
    assert_close(post.mean, nhwc(d["encode/mean"]), "bf16 encode/mean", tol=BF16_TOL)
    assert_close(post.logvar, nhwc(d["encode/logvar"]), "bf16 encode/logvar", tol=BF16_TOL)
    out = vae.decode_latents(model, params, nhwc(d["decode_z/z"]), dtype=jnp.bfloat16)
    assert out.dtype == np.float32
    assert_close(out, nhwc(d["decode_z/sample"]), "bf16 decode_z/sample", tol=BF16_TOL)


def test_batched_sharded_matches_single(ref, encode_fn, decode_fn):
    d, model, params = ref["data"], ref["model"], ref["params"]
    assert len(jax.local_devices()) == 8, "conftest should give 8 simulated CPU devices"
    rng = np.random.default_rng(0)
    x = nhwc(d["encode/x"])
    n = 11  # not a multiple of 8: exercises the padding
    images = np.clip(
        x[np.arange(n) % len(x)] + 0.1 * rng.standard_normal((n,) + x.shape[1:]), -1, 1
    ).astype(np.float32)
    single = np.concatenate([np.asarray(encode_fn(params, images[i : i + 1])) for i in range(n)])
    moments = vae.encode_moments(model, params, images)
    assert moments.shape == single.shape
    assert_close(moments, single, "sharded encode")
    post = vae.encode_images(
        model, params, images, batch_size=8
    )  # two chunks of 8 rows, the last padded
    assert_close(post.mean, single[..., : model.config.latent_channels], "chunked encode mean")
    # uint8 images are mapped to [-1, 1] as x / 127.5 - 1
    pixels = rng.integers(0, 256, size=(3,) + x.shape[1:], dtype=np.uint8)
    assert_close(
        vae.encode_moments(model, params, pixels),
        encode_fn(params, pixels.astype(np.float32) / 127.5 - 1),
        "uint8 encode",
    )
    latents = rng.standard_normal(
        (n,) + single.shape[1:3] + (model.config.latent_channels,)
    ).astype(np.float32)
    out = vae.decode_latents(model, vae.replicate_params(params), latents, batch_size=16)
    assert_close(out, decode_fn(params, latents), "sharded decode")
    u8 = vae.images_to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32))
    np.testing.assert_array_equal(u8, [0, 0, 128, 255, 255])


def test_state_dict_errors(ref):
    d, config = ref["data"], ref["config"]
    sd = state_dict(d, "state_dict/")
    missing = dict(sd)
    del missing["decoder.conv_out.bias"]
    with pytest.raises(
        state_dicts.CheckpointError, match=r"missing \(1\): decoder\.conv_out\.bias"
    ):
        vae.vae_params_from_state_dict(missing, config)
    o, i, kh, kw = sd["encoder.conv_in.weight"].shape
    wrong = dict(sd, **{"encoder.conv_in.weight": np.zeros((o, i, kh + 2, kw + 2), np.float32)})
    with pytest.raises(
        state_dicts.CheckpointError, match=r"wrong shape \(1\): encoder\.conv_in\.weight"
    ):
        vae.vae_params_from_state_dict(wrong, config)
    extra = dict(sd, **{"encoder.extra.weight": np.zeros((1,), np.float32)})
    with pytest.raises(
        state_dicts.CheckpointError, match=r"unexpected \(1\): encoder\.extra\.weight"
    ):
        vae.vae_params_from_state_dict(extra, config)
    both = dict(
        sd,
        **{
            "encoder.mid_block.attentions.0.query.weight": sd[
                "encoder.mid_block.attentions.0.to_q.weight"
            ]
        },
    )
    with pytest.raises(state_dicts.CheckpointError, match="given twice"):
        vae.vae_params_from_state_dict(both, config)


def test_config_and_input_errors(ref, tmp_path):
    cfg = ref["meta"]["config"]
    blocks = len(cfg["block_out_channels"])
    bad = dict(
        cfg, down_block_types=["DownEncoderBlock2D"] * (blocks - 1) + ["AttnDownEncoderBlock2D"]
    )
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        vae.VAEConfig.from_dict(bad)
    with pytest.raises(ValueError, match="UpBlock2D"):
        vae.VAEConfig.from_dict(dict(cfg, up_block_types=["UpBlock2D"] * blocks))
    with pytest.raises(ValueError, match="act_fn 'gelu'"):
        vae.VAEConfig.from_dict(dict(cfg, act_fn="gelu"))
    with pytest.raises(ValueError, match="divisible"):
        vae.VAEConfig.from_dict(dict(cfg, norm_num_groups=7))
    with pytest.raises(state_dicts.CheckpointError, match="no such folder"):
        vae.load_vae(tmp_path / "nothing-here")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(state_dicts.CheckpointError, match="no VAE weights"):
        vae.load_vae(tmp_path)
    model, params = ref["model"], ref["params"]
    with pytest.raises(ValueError, match="looks NCHW"):
        model.apply({"params": params}, jnp.zeros((1, 3, 8, 8)), method="encode")


def test_hub_id_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(state_dicts.CheckpointError, match="Hugging Face Hub"):
        vae.load_vae("dit-jax-tests/no-such-vae-repository")
