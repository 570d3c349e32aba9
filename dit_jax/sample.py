"""Class-conditional samples with classifier-free guidance: a PNG grid, or a large sample set in
the ADM evaluator's format (the work is done by dit_jax.sampling).

A grid from a training run (its config, EMA weights, autoencoder, noise schedule and guidance),
or from an official checkpoint (model name, image size and VAE from flags):

  python -m dit_jax.sample --workdir=workdir/demo --labels=0,1,2,3 --output=grid.png
  python -m dit_jax.sample --checkpoint=DiT-XL-2-256x256.pt --model=XL/2 --image_size=256 \\
      --vae=stabilityai/sd-vae-ft-ema --labels=207,360,387,974 --cfg_scale=4 --output=grid.png

An evaluation set (uniform random labels, cfg 1.5 by default, every local device and every
host, resumable; `arr_0` uint8 NHWC RGB and `arr_1` labels, as ADM's evaluator reads):

  python -m dit_jax.sample --checkpoint=DiT-XL-2-256x256.pt --model=XL/2 --num_samples=50000 \\
      --per_device_batch=64 --output=samples.npz [--png_dir=samples/]

An `--output` ending in .npz in grid mode stores the raw latents instead.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dit_jax import cli, sampling, sharding

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training workdir: its config, autoencoder and EMA weights."
)
_STEP = flags.DEFINE_integer(
    "step", None, "With --workdir: this checkpoint step (default: the latest)."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "dit_jax checkpoint dir or official .pt/.safetensors/.npz (none: random weights, a smoke run).",
)
_MODEL = flags.DEFINE_string(
    "model", "DiT-XL/2", "Model name, e.g. XL/2 (a dit_jax checkpoint's own wins)."
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 256, "Image side; the latent side is image_size / 8 (1 for identity)."
)
_INPUT_SIZE = flags.DEFINE_integer("input_size", 0, "Latent side, overriding --image_size.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
_IN_CHANNELS = flags.DEFINE_integer(
    "in_channels", 4, "Latent channels (4 for the SD VAE; 1 or 3 for identity)."
)
_VAE = flags.DEFINE_string(
    "vae",
    "stabilityai/sd-vae-ft-ema",
    "Autoencoder: a diffusers folder or hub id, or identity[:N] for pixel space.",
)
_LABELS = flags.DEFINE_list(
    "labels", ["207", "360", "387", "974", "88", "979", "417", "279"], "Grid class labels."
)
_SAMPLER = flags.DEFINE_enum(
    "sampler",
    None,
    list(sampling.SAMPLERS + sampling.FLOW_SAMPLERS),
    "DDPM models: ddpm, ddim, dpm++2m, dpm++3m (default ddpm); interpolant (SiT) models: euler, "
    "heun, dopri5, sde-euler, sde-heun (default heun).",
)
_STEPS = flags.DEFINE_integer(
    "steps", 250, "Model evaluations per sample (DDPM/DDIM: respaced from the training steps)."
)
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta.")
_CFG_SCALE = flags.DEFINE_float(
    "cfg_scale",
    None,
    "Classifier-free guidance scale (1 = off); default 4 for grids, 1.5 for --num_samples.",
)
_GUIDANCE = flags.DEFINE_enum(
    "guidance",
    None,
    list(sampling.GUIDANCE),
    "'official': guide the first 3 channels (reference DiT); 'all': every "
    "channel. Default: the run's configured guidance, else official.",
)
_GUIDANCE_INTERVAL = flags.DEFINE_list(
    "guidance_interval",
    None,
    "lo,hi: guide only at training timesteps lo..hi (high is noisy); "
    "default: the run's configured interval, else every step.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUTPUT = flags.DEFINE_string(
    "output",
    "samples.png",
    "Grid: .png (decoded) or .npz (latents + labels). With --num_samples: the ADM .npz.",
)
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 0, "Sample this many images with uniform random labels (evaluation)."
)
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", 32, "With --num_samples: images per device per chunk."
)
_PNG_DIR = flags.DEFINE_string(
    "png_dir", None, "With --num_samples: also write every image as a PNG here."
)


def main(argv):
    sharding.maybe_initialize_distributed()  # several processes: launch.local, TPU pods, SLURM
    if _WORKDIR.value and _CHECKPOINT.value:
        raise ValueError("give --workdir (a training run) or --checkpoint, not both.")
    if _WORKDIR.value:
        g = sampling.generator_from_workdir(_WORKDIR.value, _STEP.value)
    else:
        g = sampling.generator_from_checkpoint(
            _CHECKPOINT.value,
            model_name=_MODEL.value,
            image_size=_IMAGE_SIZE.value,
            num_classes=_NUM_CLASSES.value,
            vae=_VAE.value,
            input_size=_INPUT_SIZE.value,
            in_channels=_IN_CHANNELS.value,
            seed=_SEED.value,
        )
    guidance = sampling.guidance_channels(_GUIDANCE.value or g.guidance)
    interval = g.guidance_interval
    if _GUIDANCE_INTERVAL.value is not None:
        try:
            interval = tuple(float(v) for v in _GUIDANCE_INTERVAL.value) or None
        except ValueError:
            interval = ()
        if interval is not None and len(interval) != 2:
            raise ValueError(
                f"--guidance_interval must be lo,hi, got {','.join(_GUIDANCE_INTERVAL.value)}."
            )
    sampler = _SAMPLER.value or ("ddpm" if g.interpolant is None else "heun")
    name = f"{sampler}-{_STEPS.value}"
    if _NUM_SAMPLES.value:
        if _NUM_SAMPLES.value < 0 or _PER_DEVICE_BATCH.value <= 0:
            raise ValueError("--num_samples and --per_device_batch must be positive.")
        if not _OUTPUT.value.endswith(".npz"):
            raise ValueError(f"--output must be an .npz with --num_samples, got {_OUTPUT.value}.")
        cfg = 1.5 if _CFG_SCALE.value is None else _CFG_SCALE.value
        start = time.perf_counter()
        path = sampling.sample_eval_set(
            g,
            _OUTPUT.value,
            _NUM_SAMPLES.value,
            per_device_batch=_PER_DEVICE_BATCH.value,
            sampler=sampler,
            steps=_STEPS.value,
            cfg_scale=cfg,
            guidance=guidance,
            guidance_interval=interval,
            eta=_ETA.value,
            seed=_SEED.value,
            png_dir=_PNG_DIR.value,
        )
        if path:
            print(
                f"{_NUM_SAMPLES.value} samples ({name}, cfg {cfg:g}) in "
                f"{time.perf_counter() - start:.1f}s -> {path}"
            )
        return
    try:
        labels = np.array([int(v) for v in _LABELS.value], np.int32)
    except ValueError:
        raise ValueError(f"--labels must be integers, got {_LABELS.value}") from None
    if labels.size == 0 or labels.min() < 0 or labels.max() >= g.model.num_classes:
        raise ValueError(
            f"--labels must be in [0, {g.model.num_classes - 1}], got {_LABELS.value}."
        )
    if not _OUTPUT.value.endswith((".png", ".npz")):
        raise ValueError(
            f"--output must end in .png (a grid) or .npz (latents), got {_OUTPUT.value}."
        )
    cfg = 4.0 if _CFG_SCALE.value is None else _CFG_SCALE.value
    start = time.perf_counter()
    latents = sampling.sample_latents(
        g.model,
        g.params,
        jnp.asarray(labels),
        jax.random.key(_SEED.value),
        sampler=sampler,
        steps=_STEPS.value,
        cfg_scale=cfg,
        eta=_ETA.value,
        guidance_channels=guidance,
        guidance_interval=interval,
        clip_denoised=g.pixel_space,
        **g.schedule,
    )
    latents = np.asarray(latents)
    took = time.perf_counter() - start
    if _OUTPUT.value.endswith(".npz"):
        np.savez(_OUTPUT.value, latents=latents, labels=labels)
    else:
        images = g.decoder()(latents)
        sampling.save_png(sampling.make_grid(images, ncol=min(len(labels), 8)), _OUTPUT.value)
    print(
        f"{g.source}: {len(labels)} samples ({name}, cfg {cfg:g}) in {took:.1f}s "
        f"(with compile) -> {_OUTPUT.value}"
    )


if __name__ == "__main__":
    cli.run(main)
