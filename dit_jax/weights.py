"""DiT weights on disk: the project's own parameter checkpoints (an Orbax tree of parameters
plus the model config beside it, written by `save_params` and `dit_jax.convert`),
`load_dit_params`, which gives parameters for a model from one of those or from any official
.pt/.pth/.bin/.safetensors/.npz state dict, and `convert`, from any of those or a diffusers
folder to a parameter checkpoint or a diffusers folder."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from dit_jax import diffusers_format, models, param_mapping
from dit_jax.state_dicts import CheckpointError, read_state_dict

MODEL_CONFIG_FILE = "dit_model.json"


def save_params(directory: str, params: Mapping, model_config: Mapping) -> str:
    """Writes `params` as an Orbax checkpoint in `directory` (absolute) with the model's config."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise CheckpointError(f"{directory}: already exists; choose a new output path.")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), {"params": params})
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(dict(model_config), f, indent=1, sort_keys=True)
    return directory


def saved_model_config(path: str) -> Optional[dict]:
    """The model config stored with a dit_jax parameter checkpoint, or None for other paths."""
    cfg_path = os.path.join(path, MODEL_CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        return json.load(f)


def load_params(directory: str, model=None) -> tuple[dict, dict]:
    """Reads (params, model_config) written by `save_params`; checks shapes against `model`."""
    directory = os.path.abspath(directory)
    config = saved_model_config(directory)
    if config is None:
        raise CheckpointError(
            f"{directory}: not a dit_jax parameter checkpoint (no {MODEL_CONFIG_FILE})."
        )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(os.path.join(directory, "params"))
        except Exception as e:  # orbax raises many types for bad trees/files
            raise CheckpointError(
                f"{directory}: cannot restore parameters ({type(e).__name__}: {e})."
            ) from None
    params = jax.tree_util.tree_map(np.asarray, restored["params"])
    if model is not None:  # Orbax does not check shapes against a target; do it here
        params = models.params_in_layout(params, model)
        target = traverse_util.flatten_dict(models.abstract_params(model))
        want = {path: tuple(v.shape) for path, v in target.items()}
        have = {path: tuple(v.shape) for path, v in traverse_util.flatten_dict(params).items()}
        wrong = [
            f"{'/'.join(p)}: file {have.get(p)}, model {want.get(p)}"
            for p in sorted(set(want) | set(have))
            if want.get(p) != have.get(p)
        ]
        if wrong:
            shown = wrong[:8] + ([f"... ({len(wrong) - 8} more)"] if len(wrong) > 8 else [])
            raise CheckpointError(
                f"{directory}: parameters do not fit the model ({len(wrong)} "
                f"differ; the checkpoint was saved for {config}): " + "; ".join(shown)
            )
    return params, config


def load_dit_params(path: str, model, *, which: str = "ema", prefix: str = "") -> dict:
    """Parameters for `model` from any supported file: an Orbax directory written by
    `save_params`/`dit_jax.convert`, or an official-layout .pt/.pth/.bin/.safetensors/.npz."""
    if os.path.isdir(path):
        return load_params(path, model)[0]
    sd = read_state_dict(path, which=which, prefix=prefix)
    return param_mapping.dit_params_from_state_dict(sd, model, source=os.fspath(path))


# ----------------------------------------------------------------------------------------
# Conversion between formats (the dit_jax.convert command line)
# ----------------------------------------------------------------------------------------


def _diffusers_config(src: str, model_name: Optional[str], diffusers_forward: bool):
    sd, kwargs = diffusers_format.read_diffusers_dit(src, diffusers_forward=diffusers_forward)
    size = (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"], kwargs["patch_size"])
    names = [
        n
        for n in models.MODEL_NAMES
        if tuple(
            models.model_kwargs_from_name(n)[k]
            for k in ("depth", "hidden_size", "num_heads", "patch_size")
        )
        == size
    ]
    if model_name and models.canonical_name(model_name) not in names:
        raise CheckpointError(
            f"{src}: holds depth {size[0]}, width {size[1]}, {size[2]} heads, patch {size[3]}, "
            f"not {models.canonical_name(model_name)}; omit --model to take the folder's size."
        )
    return sd, dict(name=names[0] if names else "custom", **kwargs, block_type="adaln_zero")


def convert(
    src: str,
    dst: str,
    model_name: Optional[str] = None,
    *,
    num_heads: int = 0,
    which: str = "ema",
    prefix: str = "",
    input_size: int = 0,
    num_classes: int = 0,
    output_format: str = "orbax",
    vae: Optional[str] = None,
    scheduler: str = "ddim",
    diffusers_forward: bool = False,
) -> dict:
    """Converts a DiT checkpoint `src` (any format this module reads) for `model_name` (or a custom size read from the file with `num_heads`)
    and writes it to `dst`; returns the model config that was saved with it.

    `src` may be a diffusers DiT / pipeline folder or Hub id (its config gives the model);
    output_format="diffusers" writes a diffusers folder (a pipeline with `vae`)."""
    if output_format not in ("orbax", "diffusers"):
        raise ValueError(f"output_format must be 'orbax' or 'diffusers', got {output_format!r}.")
    if vae and output_format != "diffusers":
        raise ValueError("--vae makes a diffusers pipeline folder; it needs --format=diffusers.")
    if diffusers_format.is_diffusers_source(src):
        sd, config = _diffusers_config(src, model_name, diffusers_forward)
        return _write(src, dst, sd, config, output_format, vae, scheduler)
    sd = read_state_dict(src, which=which, prefix=prefix)
    info = param_mapping.describe_state_dict(sd)
    if model_name:
        model_kwargs = models.model_kwargs_from_name(model_name)
        name = models.canonical_name(model_name)
    elif info is None:
        raise CheckpointError(
            f"{src}: not an official-layout DiT state dict; give --model to see "
            "which keys are missing."
        )
    elif num_heads <= 0:
        raise ValueError("a custom-size model needs --num_heads (or give --model).")
    else:
        model_kwargs = dict(
            depth=info["depth"],
            hidden_size=info["hidden_size"],
            num_heads=num_heads,
            patch_size=info["patch_size"],
        )
        name = "custom"
    info = info or {}
    config = dict(
        name=name,
        **model_kwargs,
        input_size=input_size or info.get("input_size", 32),
        in_channels=info.get("in_channels", 4),
        learn_sigma=info.get("learn_sigma", True),
        num_classes=num_classes or info.get("num_classes_plus_null", 1001) - 1,
        class_dropout_prob=0.1,
        mlp_ratio=4.0,
        block_type="adaln_zero",
    )
    if diffusers_forward:
        config.update(models.DIFFUSERS_FORWARD)
    return _write(src, dst, sd, config, output_format, vae, scheduler)


def _write(src, dst, sd, config, output_format, vae, scheduler) -> dict:
    model = models.model_from_config(config)
    params = param_mapping.dit_params_from_state_dict(sd, model, source=src)
    if output_format == "orbax":
        save_params(dst, params, config)
    elif vae:
        diffusers_format.write_diffusers_pipeline(dst, params, model, vae, scheduler=scheduler)
    else:
        diffusers_format.write_diffusers_dit(dst, params, model)
    return config
