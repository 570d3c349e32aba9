"""Class-conditional sampling with classifier-free guidance.

  python -m dit_jax.sample --model=XL/2 --checkpoint=DiT-XL-2-256x256.pt --labels=207,360,387,974 \
      --sampler=ddpm --steps=250 --cfg_scale=4.0 --output=samples.npz

Writes the sampled latents ([N, H, W, C] float32, NHWC) and their labels to an .npz. The
whole sampling loop is one compiled program; the conditional and null halves of the guided
batch run in one forward. Without --checkpoint the model has random weights (a smoke run).
"""

from __future__ import annotations

import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dit_jax import cli, checkpoints, diffusion, models


def guidance_channels(guidance: str) -> Optional[int]:
    """'official' -> 3 (the reference guides latent channels 0-2 only); 'all' -> None (every channel)."""
    if guidance not in ("official", "all"):
        raise ValueError(f"guidance must be 'official' or 'all', got {guidance!r}.")
    return 3 if guidance == "official" else None


def sample_latents(model: models.DiT, params, labels: jax.Array, key: jax.Array, *,
                   sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 4.0,
                   guidance_channels: Optional[int] = 3, eta: float = 0.0, clip_denoised: bool = False) -> jax.Array:
    """Samples one latent per label: [N, H, W, C]. cfg_scale <= 1 disables guidance.
    clip_denoised clips each x0 prediction to [-1, 1]: right for pixel space, not for VAE latents."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"Unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'.")
    process = diffusion.create_diffusion(str(steps), learn_sigma=model.learn_sigma)
    return _sample(model, process, sampler, float(cfg_scale), guidance_channels, float(eta), bool(clip_denoised),
                   params, labels, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _sample(model, process, sampler, cfg_scale, guidance_channels, eta, clip_denoised, params, labels, key):
    shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
    noise_key, loop_key = jax.random.split(key)
    z = jax.random.normal(noise_key, shape, jnp.float32)
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if cfg_scale > 1.0:
        fn = diffusion.cfg_model_fn(apply, labels, model.num_classes, cfg_scale, guidance_channels)
    else:
        fn = lambda x, t: apply(x, t, labels)
    if sampler == "ddpm":
        return process.p_sample_loop(fn, z, key=loop_key, clip_denoised=clip_denoised)
    return process.ddim_sample_loop(fn, z, eta=eta, key=loop_key, clip_denoised=clip_denoised)


def make_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] images in [-1, 1] -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] grid
    (row-major), converted as the reference does: clip(127.5 x + 128, 0, 255)."""
    images = np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)
    n, h, w, c = images.shape
    rows = -(-n // ncol)
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str) -> None:
    """uint8 [H, W, C] (C = 1 or 3) -> PNG, creating the folder."""
    from PIL import Image
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def define_flags():
    """Defines this tool's command-line flags (only when run as a program)."""
    global _MODEL, _CHECKPOINT, _INPUT_SIZE, _NUM_CLASSES, _LABELS, _SAMPLER, _STEPS, _ETA, _CFG, _GUIDANCE, _SEED, _OUTPUT
    _MODEL = flags.DEFINE_string("model", "DiT-XL/2", "Model name, e.g. XL/2 (a dit_jax checkpoint's own wins).")
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "dit_jax checkpoint dir or official .pt/.safetensors/.npz.")
    _INPUT_SIZE = flags.DEFINE_integer("input_size", 32, "Latent side (image side / 8).")
    _NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
    _LABELS = flags.DEFINE_list("labels", ["207", "360", "387", "974", "88", "979", "417", "279"], "Class labels.")
    _SAMPLER = flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"], "Sampler.")
    _STEPS = flags.DEFINE_integer("steps", 250, "Number of sampling steps (respaced from 1000).")
    _ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta.")
    _CFG = flags.DEFINE_float("cfg_scale", 4.0, "Classifier-free guidance scale (1 = off).")
    _GUIDANCE = flags.DEFINE_enum("guidance", "official", ["official", "all"],
                                  "'official': guide the first 3 channels (reference DiT); 'all': every channel.")
    _SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
    _OUTPUT = flags.DEFINE_string("output", "samples.npz", "Output .npz (latents NHWC + labels).")


def main(argv: Sequence[str]):
    saved = checkpoints.saved_model_config(_CHECKPOINT.value) if _CHECKPOINT.value else None
    if saved is not None:  # a dit_jax checkpoint knows its model
        model = models.model_from_config(saved)
    else:
        model = models.create_model(_MODEL.value, input_size=_INPUT_SIZE.value, num_classes=_NUM_CLASSES.value)
    model.check_config()
    try:
        labels = np.array([int(v) for v in _LABELS.value], np.int32)
    except ValueError:
        raise ValueError(f"--labels must be integers, got {_LABELS.value}") from None
    if labels.size == 0 or labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(f"--labels must be in [0, {model.num_classes - 1}], got {_LABELS.value}.")
    if _CHECKPOINT.value:
        params = checkpoints.load_dit_params(_CHECKPOINT.value, model)
    else:
        print("no --checkpoint: random weights (smoke run)")
        params = models.init_params(model, jax.random.key(_SEED.value))
    kwargs = dict(sampler=_SAMPLER.value, steps=_STEPS.value, cfg_scale=_CFG.value, eta=_ETA.value,
                  guidance_channels=guidance_channels(_GUIDANCE.value))
    key = jax.random.key(_SEED.value)
    start = time.perf_counter()
    latents = jax.block_until_ready(sample_latents(model, params, jnp.asarray(labels), key, **kwargs))
    first = time.perf_counter() - start
    start = time.perf_counter()
    latents = jax.block_until_ready(sample_latents(model, params, jnp.asarray(labels), key, **kwargs))
    run = time.perf_counter() - start
    latents = np.asarray(latents)
    np.savez(_OUTPUT.value, latents=latents, labels=labels)
    print(f"DiT depth {model.depth} width {model.hidden_size} patch {model.patch_size} {_SAMPLER.value}-{_STEPS.value} cfg {_CFG.value}: "
          f"{len(labels)} samples {latents.shape[1:]} in {run:.2f}s ({len(labels) / run:.2f} samples/s; "
          f"first call with compile {first:.2f}s); mean {latents.mean():+.3f} std {latents.std():.3f} "
          f"-> {_OUTPUT.value}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
