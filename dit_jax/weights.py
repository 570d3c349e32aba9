"""DiT weights on disk: the project's own parameter checkpoints (an Orbax tree of parameters
plus the model config beside it, written by `save_params` and `dit_jax.convert`), and
`load_dit_params`, which gives parameters for a model from one of those or from any official
.pt/.pth/.bin/.safetensors/.npz state dict."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from dit_jax import models
from dit_jax.param_mapping import dit_params_from_state_dict
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
            f"{directory}: not a dit_jax parameter checkpoint (no {MODEL_CONFIG_FILE}).")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(os.path.join(directory, "params"))
        except Exception as e:  # orbax raises many types for bad trees/files
            raise CheckpointError(f"{directory}: cannot restore parameters "
                                  f"({type(e).__name__}: {e}).") from None
    params = jax.tree_util.tree_map(np.asarray, restored["params"])
    if model is not None:  # Orbax does not check shapes against a target; do it here
        target = traverse_util.flatten_dict(models.abstract_params(model))
        want = {path: tuple(v.shape) for path, v in target.items()}
        have = {path: tuple(v.shape) for path, v in traverse_util.flatten_dict(params).items()}
        wrong = [f"{'/'.join(p)}: file {have.get(p)}, model {want.get(p)}"
                 for p in sorted(set(want) | set(have)) if want.get(p) != have.get(p)]
        if wrong:
            shown = wrong[:8] + ([f"... ({len(wrong) - 8} more)"] if len(wrong) > 8 else [])
            raise CheckpointError(f"{directory}: parameters do not fit the model ({len(wrong)} "
                                  f"differ; the checkpoint was saved for {config}): "
                                  + "; ".join(shown))
    return params, config


def load_dit_params(path: str, model, *, which: str = "ema", prefix: str = "") -> dict:
    """Parameters for `model` from any supported file: an Orbax directory written by
    `save_params`/`dit_jax.convert`, or an official-layout .pt/.pth/.bin/.safetensors/.npz."""
    if os.path.isdir(path):
        return load_params(path, model)[0]
    sd = read_state_dict(path, which=which, prefix=prefix)
    return dit_params_from_state_dict(sd, model, source=os.fspath(path))
