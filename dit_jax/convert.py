"""Converts an official DiT checkpoint to a dit_jax parameter checkpoint (Orbax).

  python -m dit_jax.convert --model=XL/2 --input=DiT-XL-2-256x256.pt --output=/ckpts/xl2_256

Reads PyTorch `.pt/.pth/.bin` (a plain state dict, or a training checkpoint whose "ema"
entry is taken), `.safetensors` or `.npz` without PyTorch and without executing pickled
code; checks every key and shape against the named model and reports missing/unexpected
keys, or which model names would fit the file. Resolution and class count are read from the
file unless given.
"""

from __future__ import annotations

import os
from typing import Optional

from absl import app, flags

from dit_jax import cli, models, param_mapping, state_dicts, weights

def define_flags():
    """Defines this tool's command-line flags (only when run as a program)."""
    global _MODEL, _NUM_HEADS, _INPUT, _OUTPUT, _WHICH, _PREFIX, _INPUT_SIZE, _NUM_CLASSES
    _MODEL = flags.DEFINE_string("model", None, "Model name, e.g. DiT-XL/2 or XL/2; omit for a custom size "
                                 "(depth, width and patch are read from the file, give --num_heads).")
    _NUM_HEADS = flags.DEFINE_integer("num_heads", 0, "Attention heads of a custom-size model (no --model).")
    _INPUT = flags.DEFINE_string("input", None, "Checkpoint file (.pt/.pth/.bin/.safetensors/.npz).")
    _OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not exist).")
    _WHICH = flags.DEFINE_enum("which", "ema", ["ema", "model"], "Entry of a training checkpoint to take.")
    _PREFIX = flags.DEFINE_string("prefix", "", "Only keys under this prefix (stripped), e.g. 'state_dict/'.")
    _INPUT_SIZE = flags.DEFINE_integer("input_size", 0, "Latent side (image side / 8); 0: from the file.")
    _NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Number of classes; 0: from the file.")


def convert(src: str, dst: str, model_name: Optional[str] = None, *, num_heads: int = 0, which: str = "ema",
            prefix: str = "", input_size: int = 0, num_classes: int = 0) -> dict:
    """Converts `src` for `model_name` (or a custom size read from the file with `num_heads`)
    and writes it to `dst`; returns the model config that was saved with it."""
    sd = state_dicts.read_state_dict(src, which=which, prefix=prefix)
    info = param_mapping.describe_state_dict(sd)
    if model_name:
        model_kwargs = models.model_kwargs_from_name(model_name)
        name = models.canonical_name(model_name)
    elif info is None:
        raise state_dicts.CheckpointError(f"{src}: not an official-layout DiT state dict; give --model to see "
                                          "which keys are missing.")
    elif num_heads <= 0:
        raise ValueError("a custom-size model needs --num_heads (or give --model).")
    else:
        model_kwargs = dict(depth=info["depth"], hidden_size=info["hidden_size"], num_heads=num_heads,
                            patch_size=info["patch_size"])
        name = "custom"
    info = info or {}
    config = dict(
        name=name, **model_kwargs,
        input_size=input_size or info.get("input_size", 32),
        in_channels=info.get("in_channels", 4),
        learn_sigma=info.get("learn_sigma", True),
        num_classes=num_classes or info.get("num_classes_plus_null", 1001) - 1,
        class_dropout_prob=0.1, mlp_ratio=4.0, block_type="adaln_zero")
    model = models.model_from_config(config)
    params = param_mapping.dit_params_from_state_dict(sd, model, source=src)
    weights.save_params(dst, params, config)
    return config


def main(argv):
    for flag in (_INPUT, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required.")
    config = convert(_INPUT.value, _OUTPUT.value, _MODEL.value, num_heads=_NUM_HEADS.value, which=_WHICH.value,
                     prefix=_PREFIX.value, input_size=_INPUT_SIZE.value, num_classes=_NUM_CLASSES.value)
    print(f"wrote {config['name']} ({config['input_size'] * 8}x{config['input_size'] * 8}, "
          f"{config['num_classes']} classes) to {os.path.abspath(_OUTPUT.value)}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
