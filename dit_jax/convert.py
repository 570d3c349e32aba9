"""Converts an official or diffusers DiT checkpoint to a dit_jax parameter checkpoint (Orbax),
or to a diffusers folder.

  python -m dit_jax.convert --model=XL/2 --input=DiT-XL-2-256x256.pt --output=/ckpts/xl2_256
  python -m dit_jax.convert --input=facebook/DiT-XL-2-256 --output=/ckpts/xl2_256
  python -m dit_jax.convert --model=XL/2 --input=DiT-XL-2-256x256.pt --format=diffusers \
      --vae=/models/sd-vae-ft-ema --output=/pipelines/dit_xl2_256

The input may also be a diffusers DiT folder (config.json + diffusion_pytorch_model.safetensors),
a DiTPipeline folder (its transformer/ is read) or a Hub id (with huggingface_hub installed).
`--format=diffusers` writes a DiTTransformer2DModel folder, or with `--vae` (a local diffusers
VAE folder, copied) a whole DiTPipeline folder.

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

from dit_jax import cli, diffusers_format, models, param_mapping, state_dicts, weights


def define_flags():
    """Defines this tool's command-line flags (only when run as a program)."""
    global _MODEL, _NUM_HEADS, _INPUT, _OUTPUT, _WHICH, _PREFIX, _INPUT_SIZE, _NUM_CLASSES
    global _FORMAT, _VAE, _SCHEDULER, _DIFFUSERS_FORWARD
    _MODEL = flags.DEFINE_string("model", None, "Model name, e.g. DiT-XL/2 or XL/2; omit for a custom size "
                                 "(depth, width and patch are read from the file, give --num_heads).")
    _NUM_HEADS = flags.DEFINE_integer("num_heads", 0, "Attention heads of a custom-size model (no --model).")
    _INPUT = flags.DEFINE_string("input", None, "Checkpoint file (.pt/.pth/.bin/.safetensors/.npz), "
                                 "diffusers DiT or pipeline folder, or Hub id.")
    _OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not exist).")
    _WHICH = flags.DEFINE_enum("which", "ema", ["ema", "model"], "Entry of a training checkpoint to take.")
    _PREFIX = flags.DEFINE_string("prefix", "", "Only keys under this prefix (stripped), e.g. 'state_dict/'.")
    _INPUT_SIZE = flags.DEFINE_integer("input_size", 0, "Latent side (image side / 8); 0: from the file.")
    _NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Number of classes; 0: from the file.")
    _FORMAT = flags.DEFINE_enum("format", "orbax", ["orbax", "diffusers"],
                                "orbax: a dit_jax checkpoint; diffusers: a DiTTransformer2DModel "
                                "folder (a DiTPipeline folder with --vae).")
    _VAE = flags.DEFINE_string("vae", None, "With --format=diffusers: a diffusers VAE folder to copy "
                               "into a whole pipeline folder.")
    _SCHEDULER = flags.DEFINE_enum("scheduler", "ddim", sorted(diffusers_format.SCHEDULER_CONFIGS),
                                   "The pipeline folder's scheduler (with --vae).")
    _DIFFUSERS_FORWARD = flags.DEFINE_bool(
        "diffusers_forward", False, "Give the model diffusers' forward (timestep frequencies "
        "shifted by 1, pre-MLP LayerNorm eps 1e-5 or the diffusers config's norm_eps).")


def _diffusers_config(src: str, model_name: Optional[str], diffusers_forward: bool):
    sd, kwargs = diffusers_format.read_diffusers_dit(src, diffusers_forward=diffusers_forward)
    size = (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"], kwargs["patch_size"])
    names = [n for n in models.MODEL_NAMES
             if tuple(models.model_kwargs_from_name(n)[k] for k in
                      ("depth", "hidden_size", "num_heads", "patch_size")) == size]
    if model_name and models.canonical_name(model_name) not in names:
        raise state_dicts.CheckpointError(
            f"{src}: holds depth {size[0]}, width {size[1]}, {size[2]} heads, patch {size[3]}, "
            f"not {models.canonical_name(model_name)}; omit --model to take the folder's size.")
    return sd, dict(name=names[0] if names else "custom", **kwargs, block_type="adaln_zero")


def convert(src: str, dst: str, model_name: Optional[str] = None, *, num_heads: int = 0,
            which: str = "ema", prefix: str = "", input_size: int = 0, num_classes: int = 0,
            output_format: str = "orbax", vae: Optional[str] = None, scheduler: str = "ddim",
            diffusers_forward: bool = False) -> dict:
    """Converts `src` for `model_name` (or a custom size read from the file with `num_heads`)
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
    if diffusers_forward:
        config.update(models.DIFFUSERS_FORWARD)
    return _write(src, dst, sd, config, output_format, vae, scheduler)


def _write(src, dst, sd, config, output_format, vae, scheduler) -> dict:
    model = models.model_from_config(config)
    params = param_mapping.dit_params_from_state_dict(sd, model, source=src)
    if output_format == "orbax":
        weights.save_params(dst, params, config)
    elif vae:
        diffusers_format.write_diffusers_pipeline(dst, params, model, vae, scheduler=scheduler)
    else:
        diffusers_format.write_diffusers_dit(dst, params, model)
    return config


def main(argv):
    for flag in (_INPUT, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required.")
    config = convert(_INPUT.value, _OUTPUT.value, _MODEL.value, num_heads=_NUM_HEADS.value,
                     which=_WHICH.value, prefix=_PREFIX.value, input_size=_INPUT_SIZE.value,
                     num_classes=_NUM_CLASSES.value, output_format=_FORMAT.value, vae=_VAE.value,
                     scheduler=_SCHEDULER.value, diffusers_forward=_DIFFUSERS_FORWARD.value)
    print(f"wrote {config['name']} ({config['input_size'] * 8}x{config['input_size'] * 8}, "
          f"{config['num_classes']} classes) to {os.path.abspath(_OUTPUT.value)}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
