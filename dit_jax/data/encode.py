"""Encodes an image source into a latent dataset (TFDS ArrayRecord), resumably.

  python -m dit_jax.data.encode --source=folder:/data/my_images --autoencoder=stabilityai/sd-vae-ft-ema \
      --image_size=256 --output=/data/latents/my_images
  python -m dit_jax.data.encode --source=imagenet:/data/imagenet_manual --split=train --image_size=256 ...
  python -m dit_jax.data.encode --source=embedded --autoencoder=identity:32 --image_size=28 --output=...

Multi-host: run the same command on every host with --process_index/--process_count (or under
jax.distributed, which fills them in); each host encodes its own shards and process 0 writes
the metadata. Re-running after an interruption skips finished shards.
"""

from __future__ import annotations

import jax
from absl import flags
from jax.experimental import multihost_utils

from dit_jax import autoencoder as autoencoder_lib
from dit_jax import cli, sharding
from dit_jax.data import latents, sources

_SOURCE = flags.DEFINE_string(
    "source", "embedded", "folder:<root>, imagenet:<manual_dir>, tfds:<name>[@dir], embedded."
)
_SPLIT = flags.DEFINE_string(
    "split", "train", "Split to encode (ImageNet/TFDS: train or validation)."
)
_AUTOENCODER = flags.DEFINE_string(
    "autoencoder",
    "stabilityai/sd-vae-ft-ema",
    "Diffusers VAE folder or hub id, or identity[:pad_to].",
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 256, "Center-crop size (a multiple of 8 for a VAE)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Output dataset directory.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 64, "Images per autoencoder call (image and flip: twice that)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype.")
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", None, "This process (default: jax.process_index())."
)
_PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", None, "Processes (default: jax.process_count())."
)


def main(argv):
    if not _OUTPUT.value:
        raise ValueError("--output is required.")
    if _BATCH.value <= 0:
        raise ValueError(f"--batch_size must be positive, got {_BATCH.value}.")
    if _PROCESS_INDEX.value is None:  # several processes: launch.local, TPU pods, SLURM
        sharding.maybe_initialize_distributed()
    process_index = jax.process_index() if _PROCESS_INDEX.value is None else _PROCESS_INDEX.value
    process_count = jax.process_count() if _PROCESS_COUNT.value is None else _PROCESS_COUNT.value
    if not 0 <= process_index < process_count:
        raise ValueError(f"--process_index {process_index} must be in [0, {process_count}).")
    source = sources.open_source(_SOURCE.value, _SPLIT.value)
    kwargs = {} if _AUTOENCODER.value.startswith("identity") else {"dtype": _DTYPE.value}
    ae = autoencoder_lib.load_autoencoder(_AUTOENCODER.value, **kwargs)
    barrier = None
    if jax.process_count() > 1:
        barrier = lambda: multihost_utils.sync_global_devices("dit_jax.encode")
    latents.encode_dataset(
        source,
        ae,
        _OUTPUT.value,
        image_size=_IMAGE_SIZE.value,
        split=_SPLIT.value,
        batch_size=_BATCH.value,
        process_index=process_index,
        process_count=process_count,
        barrier=barrier,
    )


if __name__ == "__main__":
    cli.run(main)
