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

import os

from absl import app, flags

from dit_jax import cli, diffusers_format, weights


_MODEL = flags.DEFINE_string(
    "model",
    None,
    "Model name, e.g. DiT-XL/2 or XL/2; omit for a custom size "
    "(depth, width and patch are read from the file, give --num_heads).",
)
_NUM_HEADS = flags.DEFINE_integer(
    "num_heads", 0, "Attention heads of a custom-size model (no --model)."
)
_INPUT = flags.DEFINE_string(
    "input",
    None,
    "Checkpoint file (.pt/.pth/.bin/.safetensors/.npz), "
    "diffusers DiT or pipeline folder, or Hub id.",
)
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not exist).")
_WHICH = flags.DEFINE_enum(
    "which", "ema", ["ema", "model"], "Entry of a training checkpoint to take."
)
_PREFIX = flags.DEFINE_string(
    "prefix", "", "Only keys under this prefix (stripped), e.g. 'state_dict/'."
)
_INPUT_SIZE = flags.DEFINE_integer(
    "input_size", 0, "Latent side (image side / 8); 0: from the file."
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Number of classes; 0: from the file.")
_FORMAT = flags.DEFINE_enum(
    "format",
    "orbax",
    ["orbax", "diffusers"],
    "orbax: a dit_jax checkpoint; diffusers: a DiTTransformer2DModel "
    "folder (a DiTPipeline folder with --vae).",
)
_VAE = flags.DEFINE_string(
    "vae",
    None,
    "With --format=diffusers: a diffusers VAE folder to copy into a whole pipeline folder.",
)
_SCHEDULER = flags.DEFINE_enum(
    "scheduler",
    "ddim",
    sorted(diffusers_format.SCHEDULER_CONFIGS),
    "The pipeline folder's scheduler (with --vae).",
)
_DIFFUSERS_FORWARD = flags.DEFINE_bool(
    "diffusers_forward",
    False,
    "Give the model diffusers' forward (timestep frequencies "
    "shifted by 1, pre-MLP LayerNorm eps 1e-5 or the diffusers config's norm_eps).",
)


def main(argv):
    for flag in (_INPUT, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required.")
    config = weights.convert(
        _INPUT.value,
        _OUTPUT.value,
        _MODEL.value,
        num_heads=_NUM_HEADS.value,
        which=_WHICH.value,
        prefix=_PREFIX.value,
        input_size=_INPUT_SIZE.value,
        num_classes=_NUM_CLASSES.value,
        output_format=_FORMAT.value,
        vae=_VAE.value,
        scheduler=_SCHEDULER.value,
        diffusers_forward=_DIFFUSERS_FORWARD.value,
    )
    print(
        f"wrote {config['name']} ({config['input_size'] * 8}x{config['input_size'] * 8}, "
        f"{config['num_classes']} classes) to {os.path.abspath(_OUTPUT.value)}"
    )


if __name__ == "__main__":
    cli.run(main)
