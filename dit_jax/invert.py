"""DDIM inversion: an image -> (through the autoencoder) its latent -> the noise x_T that DDIM
(eta = 0) maps back to it; then the reconstruction from that noise.

  python -m dit_jax.invert --workdir=workdir/demo --images=digit.png --labels=3 --steps=50 \
      --output=inverted.png --noise_output=noise.npz

Images are ADM center-cropped to the model's image size. The output PNG shows each input and
its reconstruction side by side; the noise .npz holds `noise` [N, h, w, c] (NHWC) and `labels`,
ready to be edited and sampled from. Inversion is most faithful without guidance (cfg 1).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dit_jax import cli, diffusion, models
from dit_jax import sample as sample_lib


def invert_latents(model: models.DiT, params, latents: jax.Array, labels: jax.Array, *, steps: int = 50,
                   cfg_scale: float = 1.0, guidance_channels: Optional[int] = 3, clip_denoised: bool = False,
                   noise_schedule: str = "linear", diffusion_steps: int = 1000):
    """(x_T, x_0 reconstructed): DDIM inversion of scaled latents [N, h, w, c] to noise, then DDIM
    sampling back, on the model's training schedule. One compiled program."""
    process = diffusion.create_diffusion(f"ddim{steps}", learn_sigma=model.learn_sigma,
                                         noise_schedule=noise_schedule, diffusion_steps=diffusion_steps)
    return _invert(model, process, float(cfg_scale), guidance_channels, bool(clip_denoised), params, latents, labels)


def round_trip(process: diffusion.GaussianDiffusion, model_fn, x0: jax.Array, clip_denoised: bool = False):
    """(x_T, x_0 again): DDIM inversion of x0 with `model_fn(x, t)`, then DDIM (eta 0) back."""
    noise = process.ddim_reverse_sample_loop(model_fn, x0, clip_denoised=clip_denoised)
    return noise, process.ddim_sample_loop(model_fn, noise, clip_denoised=clip_denoised)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _invert(model, process, cfg_scale, guidance_channels, clip_denoised, params, latents, labels):
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if cfg_scale > 1.0:
        fn = diffusion.cfg_model_fn(apply, labels, model.num_classes, cfg_scale, guidance_channels)
    else:
        fn = lambda x, t: apply(x, t, labels)
    return round_trip(process, fn, latents, clip_denoised)


def load_images(paths: Sequence[str], image_size: int, channels: int) -> np.ndarray:
    """Image files -> uint8 [N, S, S, C] (ADM center crop; grayscale or RGB to match the model)."""
    from PIL import Image
    from dit_jax.data import sources
    out = []
    for path in paths:
        try:
            image = Image.open(path)
            image.load()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        image = image.convert("L" if channels == 1 else "RGB")
        array = sources.center_crop_arr(image, image_size)
        out.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [N, H, W, C]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


def define_flags():
    """Defines this tool's command-line flags (only when run as a program)."""
    global FLAGS
    flags.DEFINE_string("workdir", None, "A training workdir: its config, autoencoder and EMA weights.")
    flags.DEFINE_string("checkpoint", None, "Or: a dit_jax checkpoint dir or official .pt/.safetensors/.npz.")
    flags.DEFINE_string("model", "DiT-XL/2", "With --checkpoint: the model name.")
    flags.DEFINE_integer("image_size", 256, "With --checkpoint: the image side.")
    flags.DEFINE_integer("num_classes", 1000, "With --checkpoint: number of classes.")
    flags.DEFINE_string("vae", "stabilityai/sd-vae-ft-ema", "With --checkpoint: diffusers folder or hub id.")
    flags.DEFINE_list("images", None, "Image files to invert.")
    flags.DEFINE_list("labels", None, "The class of each image (one label for all, or one per image).")
    flags.DEFINE_integer("steps", 50, "DDIM steps.")
    flags.DEFINE_float("cfg_scale", 1.0, "Guidance scale during inversion and reconstruction (1 = off).")
    flags.DEFINE_enum("guidance", "official", ["official", "all"], "Guided channels (see dit_jax.sample).")
    flags.DEFINE_string("output", "inverted.png", "PNG: inputs (left) and reconstructions (right).")
    flags.DEFINE_string("noise_output", None, "Also write the inverted noise (.npz) here.")
    FLAGS = flags.FLAGS


def main(argv):
    f = FLAGS
    if not f.images:
        raise ValueError("--images is required (one or more image files).")
    if f.workdir:
        s = sample_lib.sampler_from_workdir(f.workdir)
    elif f.checkpoint:
        s = sample_lib.sampler_from_checkpoint(f.checkpoint, model_name=f.model, image_size=f.image_size,
                                               num_classes=f.num_classes, vae=f.vae)
    else:
        raise ValueError("give --workdir (a training run) or --checkpoint.")
    from dit_jax import autoencoder as autoencoder_lib
    ae = autoencoder_lib.load_autoencoder(s.autoencoder_spec)
    images = load_images(f.images, s.image_size, ae.channels)
    try:
        labels = [int(v) for v in (f.labels or [])]
    except ValueError:
        raise ValueError(f"--labels must be integers, got {f.labels}.") from None
    if len(labels) == 1:
        labels = labels * len(images)
    if len(labels) != len(images):
        raise ValueError(f"give one label, or one per image: {len(f.images)} images, labels {f.labels}.")
    if min(labels) < 0 or max(labels) >= s.model.num_classes:
        raise ValueError(f"--labels must be in [0, {s.model.num_classes - 1}], got {f.labels}.")
    mean, _ = ae.encode_moments(images)
    latents = mean * s.scaling_factor
    noise, recon = invert_latents(s.model, s.params, jnp.asarray(latents), jnp.asarray(labels, jnp.int32),
                                  steps=f.steps, cfg_scale=f.cfg_scale,
                                  guidance_channels=sample_lib.guidance_channels(f.guidance),
                                  clip_denoised=s.pixel_space, **s.schedule)
    decoded = sample_lib.images_to_uint8(s.decoder()(np.asarray(recon)))
    pairs = np.stack([images, decoded], axis=1).reshape(-1, *images.shape[1:])
    sample_lib.save_png(sample_lib.make_grid(pairs, ncol=2), f.output)
    if f.noise_output:
        np.savez(f.noise_output, noise=np.asarray(noise), labels=np.asarray(labels, np.int32))
    for path, value in zip(f.images, psnr(images, decoded)):
        print(f"{path}: reconstruction PSNR {value:.1f} dB")
    print(f"-> {f.output}" + (f", noise -> {f.noise_output}" if f.noise_output else ""))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
