"""DiT weights: official state dicts -> Flax parameters (layout, key and shape checks, which
model a file fits) and the project's own Orbax parameter checkpoints."""

import jax
import numpy as np
import pytest

from dit_jax import models, param_mapping, state_dicts, weights

TINY = dict(
    input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10
)


def test_import_gives_a_working_model(data_dir):
    model = models.DiT(**TINY)
    params = weights.load_dit_params(str(data_dir / "dit_tiny_train.pt"), model)
    sd = state_dicts.read_state_dict(data_dir / "dit_tiny_train.pt")
    np.testing.assert_array_equal(
        params["blocks_0"]["attn"]["qkv"]["kernel"], sd["blocks.0.attn.qkv.weight"].T
    )
    # the patch embedding conv [D, C, p, q] becomes a [p*q*C, D] linear in (p, q, c) order
    w = sd["x_embedder.proj.weight"]
    np.testing.assert_array_equal(
        params["x_embedder"]["kernel"][(1 * 2 + 0) * 4 + 3], w[:, 3, 1, 0]
    )
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    out = jax.jit(model.apply)({"params": params}, x, np.array([3, 500]), np.array([1, 10]))
    assert out.shape == (2, 4, 4, 8) and np.isfinite(out).all() and np.abs(out).max() > 0


def test_npz_wrong_shapes_and_missing_keys(tmp_path, data_dir):
    sd = state_dicts.read_state_dict(data_dir / "dit_tiny_train.pt")
    model = models.DiT(**TINY)
    bad = dict(sd)
    bad["blocks.0.mlp.fc1.weight"] = np.zeros((7, 32), np.float32)
    del bad["final_layer.linear.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    with pytest.raises(state_dicts.CheckpointError) as info:
        weights.load_dit_params(str(path), model)
    msg = str(info.value)
    assert "missing (1): final_layer.linear.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "blocks.0.mlp.fc1.weight: file (7, 32), model (128, 32)" in msg


def test_wrong_model_name_says_which_fits():
    """An XL/2-shaped state dict offered to S/2 names XL/2 in the error (no memory is allocated:
    the tensors are broadcast views)."""
    xl = models.create_model("XL/2")
    shapes = param_mapping.state_dict_from_dit_params(
        jax.tree_util.tree_map(
            lambda s: np.broadcast_to(np.float32(0), s.shape), models.abstract_params(xl)
        ),
        2,
    )
    with pytest.raises(state_dicts.CheckpointError, match=r"model name DiT-XL/2"):
        param_mapping.dit_params_from_state_dict(shapes, models.create_model("S/2"))


def test_orbax_round_trip(tmp_path, data_dir):
    model = models.DiT(**TINY)
    params = weights.load_dit_params(str(data_dir / "dit_tiny_train.pt"), model)
    out = tmp_path / "ckpt"
    weights.save_params(str(out), params, dict(TINY))
    again, config = weights.load_params(str(out), model)
    assert config == TINY
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        weights.load_dit_params(str(out), model)["pos_embed"], params["pos_embed"]
    )
    scanned = models.DiT(**TINY, scan_blocks=True)  # the same file into the other layout
    stacked = weights.load_dit_params(str(out), scanned)
    np.testing.assert_array_equal(
        stacked["blocks"]["mlp"]["fc1"]["kernel"][0], params["blocks_0"]["mlp"]["fc1"]["kernel"]
    )
    with pytest.raises(state_dicts.CheckpointError, match="already exists"):
        weights.save_params(str(out), params, dict(TINY))
    with pytest.raises(state_dicts.CheckpointError, match="do not fit the model"):
        weights.load_params(str(out), models.DiT(**{**TINY, "hidden_size": 64}))
