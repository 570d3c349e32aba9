"""State-dict readers: real torch.save files read without PyTorch, refusal of unsafe pickles,
corrupt files, safetensors and npz."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from dit_jax import state_dicts


def test_torch_formats_read_exactly(data_dir):
    got = state_dicts.read_torch_file(data_dir / "torch_formats.pt")
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
    ema = state_dicts.read_state_dict(path)
    raw = state_dicts.read_state_dict(path, which="model")
    assert set(ema) == set(raw) and "pos_embed" in ema
    for k in ema:
        np.testing.assert_allclose(ema[k], 0.5 * raw[k], rtol=1e-6)
    whole = state_dicts.read_torch_file(path)
    assert whole["args"].model == "tiny" and whole["args"].global_batch_size == 256
    assert "state" in whole["opt"] and "param_groups" in whole["opt"]
    plain = state_dicts.read_state_dict(data_dir / "dit_tiny_ema_state_dict.pth")
    for k in ema:
        np.testing.assert_array_equal(plain[k], ema[k])


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
    arg = (
        f"open({str(marker)!r}, 'w').write('x')"
        if fn in (eval, exec)
        else (f"touch {marker}" if fn is os.system else str(marker))
    )
    if fn is os.remove:
        marker.write_text("keep me")
    path = tmp_path / "evil.pt"
    _torch_like_zip(path, pickle.dumps({"w": _Evil(fn, arg)}, protocol=2))
    with pytest.raises(state_dicts.UnsafeCheckpointError) as info:
        state_dicts.read_state_dict(path)
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
    with pytest.raises(state_dicts.CheckpointError, match="truncated.pt"):
        state_dicts.read_state_dict(truncated)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(state_dicts.CheckpointError, match="legacy"):
        state_dicts.read_state_dict(legacy)
    # a storage record shorter than the tensor it backs
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(data_dir / "torch_formats.pt") as src, zipfile.ZipFile(short, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            dst.writestr(item, data[:2] if item.endswith("/data/0") else data)
    with pytest.raises(state_dicts.CheckpointError, match="truncated or corrupt"):
        state_dicts.read_torch_file(short)
    with pytest.raises(state_dicts.CheckpointError, match="no such file"):
        state_dicts.read_state_dict(tmp_path / "missing.pt")
    with pytest.raises(state_dicts.CheckpointError, match="unknown checkpoint type"):
        state_dicts.read_state_dict(data_dir / "make_torch_data.py")


def test_safetensors_round_trip_and_lies(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    path = tmp_path / "w.safetensors"
    state_dicts.write_safetensors(path, tensors)
    back = state_dicts.read_safetensors(path)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    # claims more data than there is
    header = raw[8 : 8 + n].replace(b'"shape":[2,3]', b'"shape":[4,3]')
    assert header != raw[8 : 8 + n]
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(n.to_bytes(8, "little") + header + raw[8 + n :])
    with pytest.raises(state_dicts.CheckpointError, match=r"lying.safetensors: tensor 'a' claims"):
        state_dicts.read_safetensors(lying)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(state_dicts.CheckpointError, match="header claims"):
        state_dicts.read_state_dict(huge)


def test_safetensors_bfloat16_and_other_dtypes(tmp_path):
    tensors = {
        "bf16": np.arange(5).astype(ml_dtypes.bfloat16),
        "i64": np.arange(3, dtype=np.int64),
        "flag": np.array([True, False]),
        "scalar": np.float32(2.5).reshape(()),
    }
    path = tmp_path / "dtypes.safetensors"
    state_dicts.write_safetensors(path, tensors)
    back = state_dicts.read_state_dict(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
