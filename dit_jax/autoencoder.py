"""Autoencoders between images and DiT latents, behind one small interface.

  encode_moments(images uint8 [N, S, S, C]) -> (mean, logvar), float32 [N, h, w, c], raw (unscaled)
  decode(latents [N, h, w, c] raw, image_size) -> images float32 [N, S, S, C] in [-1, 1]

Where the latent scale lives: datasets store the *raw* posterior; the training input
pipeline multiplies samples by `scaling_factor` (0.18215 for the SD VAEs) and the sampler
divides by it before `decode`. Nothing else applies it.

Specs (`load_autoencoder`):
  identity[:<pad_to>]        pixel space: [-1, 1] grayscale/RGB padded to pad_to x pad_to (default 32);
                             logvar = -30 (a point mass) and scale 1. Needs no weights.
  <diffusers folder or hub id>  an AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema), see dit_jax.vae.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dit_jax import vae

IDENTITY_LOGVAR = -30.0  # the VAE's own clip floor: std = exp(-15) ~ 3e-7


@dataclasses.dataclass
class IdentityAutoencoder:
    """Pixel space as a 'latent' space: x / 127.5 - 1, padded with -1 (black) to `pad_to`."""

    pad_to: int = 32
    channels: int = 1
    scaling_factor: float = 1.0

    @property
    def spec(self) -> str:
        return f"identity:{self.pad_to}"

    @property
    def downsample(self) -> int:
        return 1

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size > self.pad_to:
            raise ValueError(
                f"identity autoencoder pads to {self.pad_to}, but the images are {image_size} wide."
            )
        return (self.pad_to, self.pad_to, self.channels)

    def encode_moments(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[-1] != self.channels:
            raise ValueError(
                f"identity autoencoder expects {self.channels} channel(s), got {images.shape[-1]}."
            )
        x = images.astype(np.float32) / 127.5 - 1.0
        n, h, w, c = x.shape
        top, left = (self.pad_to - h) // 2, (self.pad_to - w) // 2
        mean = np.full((n, self.pad_to, self.pad_to, c), -1.0, np.float32)
        mean[:, top : top + h, left : left + w] = x
        return mean, np.full_like(mean, IDENTITY_LOGVAR)

    def decode(self, latents, image_size: Optional[int] = None) -> np.ndarray:
        latents = np.asarray(latents, np.float32)
        size = image_size or self.pad_to
        top = (latents.shape[1] - size) // 2
        return np.clip(latents[:, top : top + size, top : top + size], -1.0, 1.0)


@dataclasses.dataclass
class KLAutoencoder:
    """A diffusers AutoencoderKL (dit_jax.vae) behind the interface above; encode/decode run
    jitted over all local devices in chunks of `batch_size`."""

    model: object
    params: dict
    spec: str
    dtype: str = "float32"
    batch_size: int = 64

    @classmethod
    def load(cls, spec: str, dtype: str = "float32", **kwargs) -> "KLAutoencoder":
        model, params = vae.load_vae(spec)
        return cls(model, vae.replicate_params(params), spec, dtype, **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def channels(self) -> int:
        return self.config.in_channels

    @property
    def downsample(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(
                f"image_size {image_size} is not a multiple of the VAE's downsampling {self.downsample}."
            )
        side = image_size // self.downsample
        return (side, side, self.config.latent_channels)

    def encode_moments(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        posterior = vae.encode_images(
            self.model,
            self.params,
            np.asarray(images),
            dtype=self.dtype,
            batch_size=self.batch_size,
        )
        return np.asarray(posterior.mean), np.asarray(posterior.logvar)

    def decode(self, latents, image_size: Optional[int] = None) -> np.ndarray:
        """image_size is the VAE's own output size here (accepted for the common interface)."""
        images = vae.decode_latents(
            self.model,
            self.params,
            np.asarray(latents, np.float32),
            dtype=self.dtype,
            batch_size=self.batch_size,
        )
        return np.clip(images, -1.0, 1.0)


def load_autoencoder(spec: str, **kwargs):
    """An autoencoder from its spec string (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "identity":
        try:
            pad_to = int(arg) if arg else 32
        except ValueError:
            raise ValueError(f"bad autoencoder spec {spec!r}; use identity[:<pad_to>].") from None
        return IdentityAutoencoder(pad_to=pad_to, **kwargs)
    return KLAutoencoder.load(spec, **kwargs)
