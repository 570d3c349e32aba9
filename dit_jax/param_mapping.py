"""Official DiT state dicts <-> dit_jax Flax parameters: the name and layout mapping between the
PyTorch reference (facebookresearch/DiT) and `models.DiT`, checked key by key and shape by
shape, and the model sizes an official-layout state dict describes."""

from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np
from flax import traverse_util

from dit_jax import models
from dit_jax.state_dicts import CheckpointError


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path ('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
    parts = []
    for i, p in enumerate(path):
        last = i == len(path) - 1
        m = re.fullmatch(r"(blocks|mlp)_(\d+)", p)
        if m:
            parts += [m.group(1), m.group(2)]
        elif p == "adaLN_modulation":
            parts += [p, "1"]
        elif p == "x_embedder":
            parts += [p, "proj"]
        elif p == "embedding_table" and last:
            parts += [p, "weight"]
        elif last and p in ("kernel", "scale"):
            parts.append("weight")
        else:
            parts.append(p)
    return ".".join(parts)


def _to_flax(path: tuple[str, ...], value: np.ndarray, target_shape: tuple) -> np.ndarray:
    if path[-1] == "kernel" and path[0] == "x_embedder" and value.ndim == 4:
        # Conv2d weight [D, C, p, q] -> patch Linear [p*q*C, D] with (p, q, c) flattening.
        d = value.shape[0]
        return value.transpose(2, 3, 1, 0).reshape(-1, d)
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def _from_flax(path: tuple[str, ...], value: np.ndarray, patch_size: int) -> np.ndarray:
    if path[-1] == "kernel" and path[0] == "x_embedder":
        d = value.shape[1]
        c = value.shape[0] // (patch_size * patch_size)
        return value.reshape(patch_size, patch_size, c, d).transpose(3, 2, 0, 1)
    if path[-1] == "kernel":
        return value.T
    return value


def describe_state_dict(sd: Mapping[str, np.ndarray]) -> Optional[dict]:
    """Infers DiT hyper-parameters from an official-layout state dict (None if it is not one)."""
    try:
        _, tokens, hidden = sd["pos_embed"].shape
        d, c, p, _ = sd["x_embedder.proj.weight"].shape
        depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
        out = sd["final_layer.linear.weight"].shape[0] // (p * p)
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError):
        return None
    grid = int(round(np.sqrt(tokens)))
    return dict(
        hidden_size=int(hidden),
        depth=depth,
        patch_size=int(p),
        in_channels=int(c),
        input_size=int(grid * p),
        learn_sigma=out == 2 * c,
        num_classes_plus_null=int(rows),
    )


def _matching_names(info: dict) -> list[str]:
    """The model names whose depth, width and patch size are those `info` describes."""
    size = (info["depth"], info["hidden_size"], info["patch_size"])
    names = []
    for name in models.MODEL_NAMES:
        kw = models.model_kwargs_from_name(name)
        if (kw["depth"], kw["hidden_size"], kw["patch_size"]) == size:
            names.append(name)
    return names


def dit_params_from_state_dict(
    sd: Mapping[str, np.ndarray], model, *, source: str = "state dict"
) -> dict:
    """Official-layout DiT state dict -> Flax params for `model` (looped or scanned blocks),
    checking every key and shape."""
    scanned, model = model, model.clone(scan_blocks=False)
    target = models.abstract_params(model)
    items, used, missing, mismatched = [], set(), [], []
    for path, leaf in traverse_util.flatten_dict(target).items():
        key = _torch_key(path)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax(path, np.asarray(sd[key]), leaf.shape)
        if tuple(value.shape) != tuple(leaf.shape):
            want = _from_flax(path, np.zeros(leaf.shape, np.bool_), model.patch_size).shape
            mismatched.append(f"{key}: file {tuple(sd[key].shape)}, model {tuple(want)}")
            continue
        items.append((path, value.astype(np.float32)))
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or mismatched:
        lines = [
            f"{source} does not fit the model (depth {model.depth}, hidden "
            f"{model.hidden_size}, patch {model.patch_size}, input {model.input_size}, "
            f"{model.num_classes} classes, block {model.block_type}):"
        ]
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        for title, keys in problems:
            if keys:
                shown = keys[:12] + ([f"... ({len(keys) - 12} more)"] if len(keys) > 12 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        info = describe_state_dict(sd)
        if info:
            fits = _matching_names(info)
            lines.append(
                f"  the file looks like depth {info['depth']}, hidden {info['hidden_size']}, patch "
                f"{info['patch_size']}, input_size {info['input_size']} "
                f"({info['input_size'] * 8}px images), "
                f"{info['num_classes_plus_null'] - 1} classes + null"
                + (f": model name {' or '.join(fits)}" if fits else "")
            )
        raise CheckpointError("\n".join(lines))
    return models.params_in_layout(traverse_util.unflatten_dict(dict(items)), scanned)


def state_dict_from_dit_params(params: Mapping, patch_size: int) -> dict[str, np.ndarray]:
    """Flax params (looped or scanned blocks) -> official-layout state dict (numpy, float32)."""
    params = models.params_in_layout(params, models.DiT(scan_blocks=False))
    return {
        _torch_key(path): np.asarray(_from_flax(path, np.asarray(v, np.float32), patch_size))
        for path, v in traverse_util.flatten_dict(params).items()
    }
