"""Checkpoint files: real torch.save files read without PyTorch, refusal of unsafe pickles,
corrupt files, safetensors/npz, official <-> Flax conversion and the Orbax round trip."""

import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from dit_jax import checkpoints, models

TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)


def test_torch_formats_read_exactly(data_dir):
    got = checkpoints.read_torch_file(data_dir / "torch_formats.pt")
    expected = np.load(data_dir / "torch_formats_expected.npz")
    assert set(got) == set(expected.files)
    for key in expected.files:
        value = got[key]
        if key == "bf16":
            assert str(value.dtype) == "bfloat16"
            value = value.astype(np.float32)
        else:
            assert value.dtype == expected[key].dtype, key
        assert value.shape == expected[key].shape, key
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_training_checkpoint_takes_ema(data_dir):
    path = data_dir / "dit_tiny_train.pt"
    ema = checkpoints.read_state_dict(path)
    raw = checkpoints.read_state_dict(path, which="model")
    assert set(ema) == set(raw) and "pos_embed" in ema
    for k in ema:
        np.testing.assert_allclose(ema[k], 0.5 * raw[k], rtol=1e-6)
    whole = checkpoints.read_torch_file(path)
    assert whole["args"].model == "tiny" and whole["args"].global_batch_size == 256
    assert "state" in whole["opt"] and "param_groups" in whole["opt"]
    plain = checkpoints.read_state_dict(data_dir / "dit_tiny_ema_state_dict.pth")
    for k in ema:
        np.testing.assert_array_equal(plain[k], ema[k])


def test_import_gives_a_working_model(data_dir):
    model = models.DiT(**TINY)
    params = checkpoints.load_dit_params(str(data_dir / "dit_tiny_train.pt"), model)
    sd = checkpoints.read_state_dict(data_dir / "dit_tiny_train.pt")
    np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"], sd["blocks.0.attn.qkv.weight"].T)
    # the patch embedding conv [D, C, p, q] becomes a [p*q*C, D] linear in (p, q, c) order
    w = sd["x_embedder.proj.weight"]
    np.testing.assert_array_equal(params["x_embedder"]["kernel"][(1 * 2 + 0) * 4 + 3], w[:, 3, 1, 0])
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    out = jax.jit(model.apply)({"params": params}, x, np.array([3, 500]), np.array([1, 10]))
    assert out.shape == (2, 4, 4, 8) and np.isfinite(out).all() and np.abs(out).max() > 0


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _torch_like_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("fn", [os.system, eval, exec, getattr(os, "remove")])
def test_malicious_pickle_is_refused_without_running(tmp_path, fn):
    marker = tmp_path / "pwned"
    arg = f"open({str(marker)!r}, 'w').write('x')" if fn in (eval, exec) else (
        f"touch {marker}" if fn is os.system else str(marker))
    if fn is os.remove:
        marker.write_text("keep me")
    path = tmp_path / "evil.pt"
    _torch_like_zip(path, pickle.dumps({"w": _Evil(fn, arg)}, protocol=2))
    with pytest.raises(checkpoints.UnsafeCheckpointError) as info:
        checkpoints.read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "refused" in message
    assert fn.__name__ in message
    if fn is os.remove:
        assert marker.read_text() == "keep me"
    else:
        assert not marker.exists()


def test_bad_torch_files(tmp_path, data_dir):
    good = (data_dir / "dit_tiny_train.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(checkpoints.CheckpointError, match="truncated.pt"):
        checkpoints.read_state_dict(truncated)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(checkpoints.CheckpointError, match="legacy"):
        checkpoints.read_state_dict(legacy)
    # a storage record shorter than the tensor it backs
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(data_dir / "torch_formats.pt") as src, zipfile.ZipFile(short, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            dst.writestr(item, data[:2] if item.endswith("/data/0") else data)
    with pytest.raises(checkpoints.CheckpointError, match="truncated or corrupt"):
        checkpoints.read_torch_file(short)
    with pytest.raises(checkpoints.CheckpointError, match="no such file"):
        checkpoints.read_state_dict(tmp_path / "missing.pt")
    with pytest.raises(checkpoints.CheckpointError, match="unknown checkpoint type"):
        checkpoints.read_state_dict(data_dir / "make_torch_data.py")


def test_safetensors_round_trip_and_lies(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    path = tmp_path / "w.safetensors"
    checkpoints.write_safetensors(path, tensors)
    back = checkpoints.read_safetensors(path)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b"[2, 3]", b"[4, 3]")  # claims more data than there is
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(n.to_bytes(8, "little") + header + raw[8 + n:])
    with pytest.raises(checkpoints.CheckpointError, match=r"lying.safetensors: tensor 'a' claims"):
        checkpoints.read_safetensors(lying)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(checkpoints.CheckpointError, match="header claims"):
        checkpoints.read_state_dict(huge)


def test_npz_wrong_shapes_and_missing_keys(tmp_path, data_dir):
    sd = checkpoints.read_state_dict(data_dir / "dit_tiny_train.pt")
    model = models.DiT(**TINY)
    bad = dict(sd)
    bad["blocks.0.mlp.fc1.weight"] = np.zeros((7, 32), np.float32)
    del bad["final_layer.linear.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load_dit_params(str(path), model)
    msg = str(info.value)
    assert "missing (1): final_layer.linear.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "blocks.0.mlp.fc1.weight: file (7, 32), model (128, 32)" in msg


def test_wrong_model_name_says_which_fits():
    """An XL/2-shaped state dict offered to S/2 names XL/2 in the error (no memory is allocated:
    the tensors are broadcast views)."""
    xl = models.create_model("XL/2")
    shapes = checkpoints.state_dict_from_dit_params(
        jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), models.abstract_params(xl)), 2)
    with pytest.raises(checkpoints.CheckpointError, match=r"model name DiT-XL/2"):
        checkpoints.dit_params_from_state_dict(shapes, models.create_model("S/2"))


def test_orbax_round_trip(tmp_path, data_dir):
    model = models.DiT(**TINY)
    params = checkpoints.load_dit_params(str(data_dir / "dit_tiny_train.pt"), model)
    out = tmp_path / "ckpt"
    checkpoints.save_params(str(out), params, dict(TINY))
    again, config = checkpoints.load_params(str(out), model)
    assert config == TINY
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(checkpoints.load_dit_params(str(out), model)["pos_embed"], params["pos_embed"])
    with pytest.raises(checkpoints.CheckpointError, match="already exists"):
        checkpoints.save_params(str(out), params, dict(TINY))
    with pytest.raises(checkpoints.CheckpointError, match="do not fit the model"):
        checkpoints.load_params(str(out), models.DiT(**{**TINY, "hidden_size": 64}))


def test_only_late_callbacks_to_a_closed_loop_are_silenced(monkeypatch):
    """After a failed restore, reads still in flight call back into Orbax's closed asyncio loop:
    those reports are dropped; any other unraisable exception still reaches the previous hook."""
    import asyncio
    import sys
    import types
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def report(exc):
        return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                     err_msg=None, object=None)
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = report(e)
    try:
        raise RuntimeError("Event loop is closed")  # the same message, not from a callback
    except RuntimeError as e:
        other_closed = report(e)
    try:
        raise ValueError("boom")
    except ValueError as e:
        other = report(e)
    checkpoints._drop_late_callbacks_to_closed_loops()
    checkpoints._drop_late_callbacks_to_closed_loops()  # installed once, not stacked
    for args in (late, other_closed, other):
        sys.unraisablehook(args)
    assert seen == [other_closed, other]
