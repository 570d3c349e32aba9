"""The DiT model family: names, initialisation, block designs, guidance, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import ad_checkpoint

from dit_jax import models

TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
)


def tiny(**kw):
    return models.DiT(**{**TINY, **kw})


def randomise(params, seed=0, scale=0.1):
    """Every parameter random (zero-initialised layers would hide bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda l: jnp.asarray(scale * rng.standard_normal(l.shape), jnp.float32), params
    )


def inputs(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(
        rng.standard_normal((n, model.input_size, model.input_size, model.in_channels)), jnp.float32
    )
    t = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    y = jnp.asarray(rng.integers(0, model.num_classes, n), jnp.int32)
    return x, t, y


@pytest.mark.parametrize("alias", ["DiT-XL/2", "XL/2", "dit_xl_2", "xl/2", "DiT-XL-2"])
def test_name_aliases(alias):
    assert models.model_kwargs_from_name(alias) == dict(
        depth=28, hidden_size=1152, num_heads=16, patch_size=2
    )
    assert models.canonical_name(alias) == "DiT-XL/2"


def test_all_twelve_names_decode():
    assert len(models.MODEL_NAMES) == 12
    seen = {tuple(models.model_kwargs_from_name(n).values()) for n in models.MODEL_NAMES}
    assert len(seen) == 12
    assert models.model_kwargs_from_name("S/8") == dict(
        depth=12, hidden_size=384, num_heads=6, patch_size=8
    )
    assert models.model_kwargs_from_name("B/4") == dict(
        depth=12, hidden_size=768, num_heads=12, patch_size=4
    )
    assert models.model_kwargs_from_name("L/2") == dict(
        depth=24, hidden_size=1024, num_heads=16, patch_size=2
    )


@pytest.mark.parametrize("bad", ["XXL/2", "XL/3", "DiT-H/2", "", "resnet50"])
def test_unknown_name_lists_valid_ones(bad):
    with pytest.raises(ValueError, match="DiT-XL/2"):
        models.model_kwargs_from_name(bad)


def test_custom_size_and_config_dict():
    m = models.model_from_config(dict(name="S/2", depth=3, input_size=16))
    assert (m.depth, m.hidden_size, m.patch_size, m.input_size) == (3, 384, 2, 16)
    with pytest.raises(ValueError, match="Unknown model config keys"):
        models.model_from_config(dict(width=3))


def test_initialisation_follows_the_paper():
    model = tiny()
    p = models.init_params(model, jax.random.key(0))
    for i in range(model.depth):
        mod = p[f"blocks_{i}"]["adaLN_modulation"]
        assert not np.any(mod["kernel"]) and not np.any(mod["bias"])
        qkv = np.asarray(p[f"blocks_{i}"]["attn"]["qkv"]["kernel"])
        limit = np.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
        assert np.abs(qkv).max() <= limit and np.abs(qkv).max() > 0.8 * limit  # xavier uniform
        assert not np.any(p[f"blocks_{i}"]["attn"]["qkv"]["bias"])
    for leaf in jax.tree_util.tree_leaves(p["final_layer"]):
        assert not np.any(leaf)
    assert abs(np.std(p["y_embedder"]["embedding_table"]) - 0.02) < 0.004
    assert p["y_embedder"]["embedding_table"].shape == (model.num_classes + 1, model.hidden_size)
    assert abs(np.std(p["t_embedder"]["mlp_0"]["kernel"]) - 0.02) < 0.002
    np.testing.assert_allclose(p["pos_embed"][0], models.sincos_2d(model.hidden_size, 4), atol=1e-7)
    # adaLN-Zero starts as the identity: output is exactly zero
    x, t, y = inputs(model)
    assert not np.any(jax.jit(model.apply)({"params": p}, x, t, y))


def test_adaln_without_zero_init():
    p = models.init_params(tiny(block_type="adaln"), jax.random.key(0))
    assert np.any(p["blocks_0"]["adaLN_modulation"]["kernel"])
    assert p["blocks_0"]["adaLN_modulation"]["kernel"].shape == (32, 4 * 32)
    assert not np.any(p["final_layer"]["linear"]["kernel"])


def test_sincos_2d_layout():
    """First half encodes the column index, second half the row index, tokens row-major."""
    d, g = 16, 3
    emb = models.sincos_2d(d, g)
    row, col = 2, 1
    np.testing.assert_allclose(
        emb[row * g + col, : d // 2], models.sincos_1d(d // 2, np.array([col]))[0]
    )
    np.testing.assert_allclose(
        emb[row * g + col, d // 2 :], models.sincos_1d(d // 2, np.array([row]))[0]
    )


@pytest.mark.parametrize("block_type", models.BLOCK_TYPES)
def test_block_designs_forward_and_train(block_type):
    model = tiny(block_type=block_type)
    p = randomise(models.init_params(model, jax.random.key(0)))
    x, t, y = inputs(model)
    fwd = jax.jit(model.apply)
    out = fwd({"params": p}, x, t, y)
    assert out.shape == (4, 8, 8, 8) and out.dtype == jnp.float32
    # conditioning matters in every design
    out2 = fwd({"params": p}, x, t, (y + 1) % 10)
    assert not np.allclose(out, out2)

    def loss(params):
        return jnp.mean(
            model.apply(
                {"params": params}, x, t, y, train=True, rngs={"label_dropout": jax.random.key(1)}
            )
            ** 2
        )

    grads = jax.jit(jax.grad(loss))(p)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert not np.any(grads["pos_embed"])  # the position table is fixed
    if block_type == "cross_attn":
        assert "cross_attn" in p["blocks_0"]
    if block_type == "in_context":
        assert "adaLN_modulation" not in p["blocks_0"]


def test_label_dropout_uses_explicit_key():
    emb = models.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    labels = jnp.zeros((20000,), jnp.int32)
    v = emb.init({"params": jax.random.key(0)}, labels, False)
    table = nn.meta.unbox(v)["params"]["embedding_table"]
    dropped = lambda out: np.mean(np.all(np.isclose(out, table[10]), axis=-1))
    a = emb.apply(v, labels, True, rngs={"label_dropout": jax.random.key(1)})
    b = emb.apply(v, labels, True, rngs={"label_dropout": jax.random.key(1)})
    c = emb.apply(v, labels, True, rngs={"label_dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(dropped(a) - 0.1) < 0.01
    assert dropped(emb.apply(v, labels, False)) == 0.0
    forced = emb.apply(v, labels[:4], False, jnp.array([1, 0, 1, 0]))
    np.testing.assert_allclose(forced[0], table[10])
    np.testing.assert_allclose(forced[1], table[0])


def test_forward_with_cfg_official_vs_all_channels():
    model = tiny()
    p = {"params": randomise(models.init_params(model, jax.random.key(0)))}
    x, t, y = inputs(model)
    x = jnp.concatenate([x[:2], x[:2]])
    y = jnp.concatenate([y[:2], jnp.full((2,), 10)])
    t = jnp.concatenate([t[:2], t[:2]])
    cfg = lambda channels: jax.jit(
        functools.partial(
            model.apply, guidance_channels=channels, method=models.DiT.forward_with_cfg
        )
    )
    official = cfg(3)(p, x, t, y, 4.0)
    full = cfg(None)(p, x, t, y, 4.0)
    raw = jax.jit(model.apply)(p, x, t, y)
    np.testing.assert_allclose(official[..., :3], full[..., :3], rtol=1e-6)
    np.testing.assert_allclose(
        official[:2, ..., 3], raw[:2, ..., 3], rtol=1e-6
    )  # conditional eps, unguided
    guided3 = raw[2:, ..., 3] + 4.0 * (raw[:2, ..., 3] - raw[2:, ..., 3])
    np.testing.assert_allclose(full[:2, ..., 3], guided3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(official[:2, ..., :3], official[2:, ..., :3])
    np.testing.assert_allclose(
        official[..., 3:], raw[..., 3:], rtol=1e-6
    )  # unguided channels pass through
    unguided = cfg(None)(p, x, t, y, 1.0)
    np.testing.assert_allclose(unguided[:2], raw[:2], rtol=1e-5, atol=1e-6)


def test_bf16_and_remat_match_float32():
    model = tiny()
    p = randomise(models.init_params(model, jax.random.key(0)))
    x, t, y = inputs(model)
    ref = jax.jit(model.apply)({"params": p}, x, t, y)
    low = jax.jit(tiny(dtype=jnp.bfloat16).apply)({"params": p}, x, t, y)
    assert low.dtype == jnp.float32
    assert np.abs(low - ref).max() < 0.05 * np.abs(ref).max()
    loss = lambda m: lambda q: jnp.sum(m.apply({"params": q}, x, t, y) ** 2)
    g_ref = jax.jit(jax.grad(loss(model)))(p)
    for policy in models.REMAT_POLICIES:
        g_remat = jax.jit(jax.grad(loss(tiny(remat=True, remat_policy=policy))))(p)
        for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_remat)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_policies_save_what_they_say(capsys):
    """'nothing' keeps no block residual, 'dots' keeps the dense layers' outputs: fewer saved
    values than no remat, more than 'nothing' (jax's own residual accounting)."""
    model = tiny(depth=1)
    p = models.init_params(model, jax.random.key(0))
    x, t, y = inputs(model)

    def residual_count(m):
        f = lambda q: jnp.sum(m.apply({"params": q}, x, t, y))  # noqa: E731
        capsys.readouterr()
        ad_checkpoint.print_saved_residuals(f, p)  # one line per saved value
        return len(capsys.readouterr().out.strip().splitlines())

    plain = residual_count(model)
    nothing = residual_count(tiny(depth=1, remat=True))
    dots = residual_count(tiny(depth=1, remat=True, remat_policy="dots"))
    assert nothing < dots < plain
    with pytest.raises(ValueError, match="remat_policy"):
        models.init_params(tiny(remat=True, remat_policy="everything"), jax.random.key(0))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_blocks_compute_the_looped_model(remat):
    """nn.scan over the blocks: the same forward and gradients from the same (stacked) weights,
    one [depth, ...] leaf per block parameter with the logical axis 'layers' in front."""
    looped, scanned = tiny(depth=3), tiny(depth=3, scan_blocks=True, remat=remat)
    p = randomise(models.init_params(looped, jax.random.key(0)))
    ps = models.params_in_layout(p, scanned)
    assert sorted(ps) == [
        "blocks",
        "final_layer",
        "pos_embed",
        "t_embedder",
        "x_embedder",
        "y_embedder",
    ]
    qkv = ps["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (3, 32, 96)
    np.testing.assert_array_equal(qkv[2], p["blocks_2"]["attn"]["qkv"]["kernel"])
    x, t, y = inputs(looped)
    np.testing.assert_allclose(
        jax.jit(scanned.apply)({"params": ps}, x, t, y),
        jax.jit(looped.apply)({"params": p}, x, t, y),
        rtol=1e-5,
        atol=1e-6,
    )
    loss = lambda m: lambda q: jnp.sum(m.apply({"params": q}, x, t, y) ** 2)
    g_loop = models.params_in_layout(jax.jit(jax.grad(loss(looped)))(p), scanned)
    g_scan = jax.jit(jax.grad(loss(scanned)))(ps)
    for a, b in zip(jax.tree_util.tree_leaves(g_loop), jax.tree_util.tree_leaves(g_scan)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    back = models.params_in_layout(ps, looped)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(p)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(a, b)
    init = jax.eval_shape(
        lambda r: scanned.init({"params": r}, *models.dummy_inputs(scanned)), jax.random.key(0)
    )
    spec = nn.get_partition_spec(init)["params"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")
    real = models.init_params(scanned, jax.random.key(0))["blocks"]["attn"]["qkv"]["kernel"]
    assert not np.array_equal(real[0], real[1])  # each block initialised from its own key


def test_bad_inputs_give_clear_errors():
    model = tiny()
    p = {"params": models.init_params(model, jax.random.key(0))}
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="NCHW"):
        model.apply(p, jnp.transpose(x, (0, 3, 1, 2)), t, y)
    with pytest.raises(ValueError, match="4-D NHWC"):
        model.apply(p, x[0], t, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        model.apply(p, x, t, y.at[0].set(11))
    with pytest.raises(ValueError, match="labels must lie"):
        model.apply(p, x, t, y.at[0].set(-1))
    with pytest.raises(ValueError, match="t must have shape"):
        model.apply(p, x, t[:2], y)
    with pytest.raises(ValueError, match="integers"):
        model.apply(p, x, t, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="patch_size 3 does not divide input_size 8"):
        models.init_params(tiny(patch_size=3), jax.random.key(0))
    with pytest.raises(ValueError, match="block_type"):
        models.init_params(tiny(block_type="film"), jax.random.key(0))


def test_trainable_mask_excludes_position_table():
    mask = models.trainable_mask(models.init_params(tiny(), jax.random.key(0)))
    assert mask["pos_embed"] is False
    assert all(jax.tree_util.tree_leaves(mask["blocks_0"]))
