"""Class-conditional sampling with classifier-free guidance: PNG grids, and large sample sets
in the ADM evaluator's format.

A grid from a training run (its config, EMA weights and autoencoder), or from an official
checkpoint (model name, image size and VAE from flags):

  python -m dit_jax.sample --workdir=workdir/demo --labels=0,1,2,3 --output=grid.png
  python -m dit_jax.sample --checkpoint=DiT-XL-2-256x256.pt --model=XL/2 --image_size=256 \
      --vae=stabilityai/sd-vae-ft-ema --labels=207,360,387,974 --cfg_scale=4 --output=grid.png

An evaluation set (uniform random labels, cfg 1.5 by default, every local device and every
host, resumable; `arr_0` uint8 NHWC RGB and `arr_1` labels, as ADM's evaluator reads):

  python -m dit_jax.sample --checkpoint=DiT-XL-2-256x256.pt --model=XL/2 --num_samples=50000 \
      --per_device_batch=64 --output=samples.npz [--png_dir=samples/]

The sampling loop is one compiled program; the conditional and null halves of a guided batch
run in one forward. An `--output` ending in .npz in grid mode stores the raw latents instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import cli, diffusion, files, models, weights


def guidance_channels(guidance: str) -> Optional[int]:
    """'official' -> 3 (the reference guides latent channels 0-2 only); 'all' -> None (every channel)."""
    if guidance not in ("official", "all"):
        raise ValueError(f"guidance must be 'official' or 'all', got {guidance!r}.")
    return 3 if guidance == "official" else None


def sample_latents(model: models.DiT, params, labels: jax.Array, key: jax.Array, *,
                   sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 4.0,
                   guidance_channels: Optional[int] = 3, eta: float = 0.0, clip_denoised: bool = False,
                   noise: Optional[jax.Array] = None, noise_schedule: str = "linear",
                   diffusion_steps: int = 1000) -> jax.Array:
    """Samples one latent per label: [N, H, W, C]. cfg_scale <= 1 disables guidance.
    clip_denoised clips each x0 prediction to [-1, 1]: right for pixel space, not for VAE latents.
    `noise` ([N, H, W, C]) is the starting x_T (default: drawn from `key`). The batch follows the
    sharding of `labels`/`noise`: pass them split over devices to sample data-parallel.
    noise_schedule/diffusion_steps must be those the model was trained with."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"Unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'.")
    process = diffusion.create_diffusion(str(steps), learn_sigma=model.learn_sigma, noise_schedule=noise_schedule,
                                         diffusion_steps=diffusion_steps)
    noise_key, loop_key = jax.random.split(key)
    if noise is None:
        shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
        noise = jax.random.normal(noise_key, shape, jnp.float32)
    return _sample(model, process, sampler, float(cfg_scale), guidance_channels, float(eta), bool(clip_denoised),
                   params, labels, noise, loop_key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _sample(model, process, sampler, cfg_scale, guidance_channels, eta, clip_denoised, params, labels, z, key):
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if cfg_scale > 1.0:
        fn = diffusion.cfg_model_fn(apply, labels, model.num_classes, cfg_scale, guidance_channels)
    else:
        fn = lambda x, t: apply(x, t, labels)
    if sampler == "ddpm":
        return process.p_sample_loop(fn, z, key=key, clip_denoised=clip_denoised)
    return process.ddim_sample_loop(fn, z, eta=eta, key=key, clip_denoised=clip_denoised)


def images_to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 as the DiT sampling script does: clip(127.5 x + 128, 0, 255), truncated."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] images in [-1, 1] (or uint8) -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C]
    grid (row-major), converted as the reference does: clip(127.5 x + 128, 0, 255)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = images_to_uint8(images)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


# ----------------------------------------------------------------------------------------
# What to sample from: a training run, or a checkpoint plus a model description
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sampler:
    """A model, its weights, and how its latents become images."""
    model: models.DiT
    params: dict
    autoencoder_spec: str     # "" when there is nothing to decode with
    scaling_factor: float     # latents are divided by it before decoding
    image_size: int
    source: str               # for messages and manifests
    noise_schedule: str = "linear"   # the training diffusion's
    diffusion_steps: int = 1000

    @property
    def schedule(self) -> dict:
        return dict(noise_schedule=self.noise_schedule, diffusion_steps=self.diffusion_steps)

    @property
    def pixel_space(self) -> bool:
        return self.autoencoder_spec.startswith("identity")

    def decoder(self):
        """latents [N, h, w, c] as sampled -> images float32 [N, S, S, C] in [-1, 1]."""
        if not self.autoencoder_spec:
            raise ValueError("no autoencoder to decode the samples with; give --vae (a diffusers folder or hub id).")
        from dit_jax import autoencoder as autoencoder_lib
        ae = autoencoder_lib.load_autoencoder(self.autoencoder_spec)
        if self.pixel_space:  # the identity 'latents' are the image, padded
            return lambda z: ae.decode(np.asarray(z) / self.scaling_factor, image_size=self.image_size)
        return lambda z: ae.decode(np.asarray(z) / self.scaling_factor)


def sampler_from_workdir(workdir: str, step: Optional[int] = None) -> Sampler:
    """The EMA weights of a training run's latest (or given) checkpoint, with its autoencoder."""
    from dit_jax import train
    model, ema, step, meta = train.load_ema_from_workdir(workdir, step)
    diffusion_config = train.load_run_config(workdir).diffusion
    return Sampler(model, ema, meta["autoencoder"], float(meta["scaling_factor"]), int(meta["image_size"]),
                   f"{workdir} step {step}", diffusion_config.noise_schedule, int(diffusion_config.steps))


def sampler_from_checkpoint(checkpoint: Optional[str], *, model_name: str, image_size: int, num_classes: int,
                            vae: str, input_size: int = 0, in_channels: int = 4, seed: int = 0,
                            log=print) -> Sampler:
    """A converted dit_jax checkpoint (it knows its model) or an official .pt/.safetensors/.npz
    for `model_name`; latent side = image_size / the VAE's downsampling unless input_size is given.
    Without a checkpoint: random weights (a smoke run)."""
    saved = weights.saved_model_config(checkpoint) if checkpoint else None
    scaling, down = 0.18215, 8
    if vae.startswith("identity"):
        scaling, down = 1.0, 1
    if saved is not None:
        model = models.model_from_config(saved)
    else:
        if input_size <= 0:
            if image_size % down:
                raise ValueError(f"--image_size {image_size} is not a multiple of the VAE's downsampling {down}.")
            input_size = image_size // down
        model = models.create_model(model_name, input_size=input_size, num_classes=num_classes,
                                    in_channels=in_channels)
    model.check_config()
    if checkpoint:
        params = weights.load_dit_params(checkpoint, model)
    else:
        log("no checkpoint: random weights (smoke run)")
        params = models.init_params(model, jax.random.key(seed))
    size = image_size if saved is None and not input_size else model.input_size * down
    return Sampler(model, params, vae, scaling, size, checkpoint or "random weights")


# ----------------------------------------------------------------------------------------
# Evaluation sets: resumable, sharded over every device and host
# ----------------------------------------------------------------------------------------

def chunk_labels(seed: int, chunk: int, size: int, num_classes: int) -> np.ndarray:
    """Uniform random labels of one chunk, a pure function of (seed, chunk)."""
    return np.random.default_rng([seed, chunk]).integers(0, num_classes, size).astype(np.int32)


def local_data_parallel(params):
    """(params replicated over this process's devices, a sharding that splits a batch over them)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
    return jax.device_put(params, NamedSharding(mesh, P())), NamedSharding(mesh, P("data"))


def sample_chunk(model: models.DiT, params, chunk: int, seed: int, size: int, batch_sharding, **kwargs):
    """(latents [size, h, w, c], labels [size]) of chunk `chunk`: uniform labels and starting
    noise that are pure functions of (seed, chunk), the batch split by `batch_sharding`.
    kwargs go to `sample_latents`."""
    noise_key, loop_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), chunk))
    labels = chunk_labels(seed, chunk, size, model.num_classes)
    noise = jax.random.normal(noise_key, (size, model.input_size, model.input_size, model.in_channels), jnp.float32)
    latents = sample_latents(model, params, jax.device_put(labels, batch_sharding), loop_key,
                             noise=jax.device_put(noise, batch_sharding), **kwargs)
    return latents, labels


def sample_eval_set(s: Sampler, output: str, num_samples: int, *, per_device_batch: int = 32,
                    sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 1.5, guidance: Optional[int] = 3,
                    eta: float = 0.0, seed: int = 0, png_dir: Optional[str] = None, keep_parts: bool = False,
                    max_chunks: Optional[int] = None, progress: bool = True, log=print) -> Optional[str]:
    """Samples `num_samples` images with uniform random labels into an ADM-format .npz
    (`arr_0` uint8 [N, H, W, 3] NHWC, grayscale repeated to RGB as the evaluator expects;
    `arr_1` int labels).

    Work is split in chunks of per_device_batch x local devices; chunk c belongs to process
    c mod process_count and is a pure function of (seed, c), so the set does not depend on
    how often it was interrupted. Finished chunks live in `<output>.parts/` (written
    atomically) and are not redone; the final file is assembled by process 0 once all are
    there. `max_chunks` stops early (for tests); returns the output path when complete.
    """
    local = jax.local_devices()
    chunk_size = per_device_batch * len(local)
    n_chunks = -(-num_samples // chunk_size)
    parts = output + ".parts"
    settings = dict(source=s.source, **s.schedule, num_samples=num_samples, chunk_size=chunk_size, sampler=sampler, steps=steps,
                    cfg_scale=cfg_scale, guidance=guidance, eta=eta, seed=seed,
                    processes=jax.process_count())
    os.makedirs(parts, exist_ok=True)
    manifest = os.path.join(parts, "manifest.json")
    if jax.process_index() == 0:
        if os.path.exists(manifest):
            with open(manifest) as f:
                previous = json.load(f)
            if previous != settings:
                diff = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
                raise ValueError(f"{parts} holds chunks made with other settings {diff} (before, now); "
                                 "use the same settings to resume, or delete it to start over.")
        else:
            files.write_atomically(manifest, json.dumps(settings, indent=1).encode())
    decode = s.decoder()
    params, batch_sharding = local_data_parallel(s.params)
    mine = [c for c in range(n_chunks) if c % jax.process_count() == jax.process_index()]
    todo = [c for c in mine if not os.path.exists(_chunk_path(parts, c))]
    done = (len(mine) - len(todo)) * chunk_size
    if max_chunks is not None:
        todo = todo[:max_chunks]
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(mine) * chunk_size, initial=done, unit="img", desc="sampling", smoothing=0.1)
    for c in todo:
        latents, labels = sample_chunk(s.model, params, c, seed, chunk_size, batch_sharding, sampler=sampler,
                                       steps=steps, cfg_scale=cfg_scale, guidance_channels=guidance, eta=eta,
                                       clip_denoised=s.pixel_space, **s.schedule)
        images = images_to_uint8(decode(latents))
        buf = files.npz_bytes(images=np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images, labels=labels)
        files.write_atomically(_chunk_path(parts, c), buf)
        if png_dir:
            for i, image in enumerate(images):
                if c * chunk_size + i < num_samples:
                    save_png(image, os.path.join(png_dir, f"{c * chunk_size + i:06d}.png"))
        if bar is not None:
            bar.update(chunk_size)
    if bar is not None:
        bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("dit_jax.sample_eval_set")
    missing = [c for c in range(n_chunks) if not os.path.exists(_chunk_path(parts, c))]
    if missing:
        log(f"{n_chunks - len(missing)}/{n_chunks} chunks in {parts}; rerun the same command to finish.")
        return None
    if jax.process_index() == 0:
        images, labels = [], []
        for c in range(n_chunks):
            with np.load(_chunk_path(parts, c)) as part:
                images.append(part["images"])
                labels.append(part["labels"])
        images = np.concatenate(images)[:num_samples]
        labels = np.concatenate(labels)[:num_samples]
        files.write_atomically(output, files.npz_bytes(arr_0=images, arr_1=labels))
        if not keep_parts:
            for c in range(n_chunks):
                os.remove(_chunk_path(parts, c))
            os.remove(manifest)
            os.rmdir(parts)
        log(f"{len(images)} samples {images.shape[1:]} -> {output}")
    return output


def _chunk_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"chunk_{chunk:06d}.npz")




# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def define_flags():
    """Defines this tool's command-line flags (only when run as a program)."""
    global FLAGS
    flags.DEFINE_string("workdir", None, "A training workdir: its config, autoencoder and EMA weights.")
    flags.DEFINE_integer("step", None, "With --workdir: this checkpoint step (default: the latest).")
    flags.DEFINE_string("checkpoint", None, "dit_jax checkpoint dir or official .pt/.safetensors/.npz "
                        "(none: random weights, a smoke run).")
    flags.DEFINE_string("model", "DiT-XL/2", "Model name, e.g. XL/2 (a dit_jax checkpoint's own wins).")
    flags.DEFINE_integer("image_size", 256, "Image side; the latent side is image_size / 8 (1 for identity).")
    flags.DEFINE_integer("input_size", 0, "Latent side, overriding --image_size.")
    flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
    flags.DEFINE_integer("in_channels", 4, "Latent channels (4 for the SD VAE; 1 or 3 for identity).")
    flags.DEFINE_string("vae", "stabilityai/sd-vae-ft-ema",
                        "Autoencoder: a diffusers folder or hub id, or identity[:N] for pixel space.")
    flags.DEFINE_list("labels", ["207", "360", "387", "974", "88", "979", "417", "279"], "Grid class labels.")
    flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"], "Sampler.")
    flags.DEFINE_integer("steps", 250, "Number of sampling steps (respaced from 1000).")
    flags.DEFINE_float("eta", 0.0, "DDIM eta.")
    flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (1 = off); default 4 for grids, "
                       "1.5 for --num_samples.")
    flags.DEFINE_enum("guidance", "official", ["official", "all"],
                      "'official': guide the first 3 channels (reference DiT); 'all': every channel.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("output", "samples.png", "Grid: .png (decoded) or .npz (latents + labels). "
                        "With --num_samples: the ADM .npz.")
    flags.DEFINE_integer("num_samples", 0, "Sample this many images with uniform random labels (evaluation).")
    flags.DEFINE_integer("per_device_batch", 32, "With --num_samples: images per device per chunk.")
    flags.DEFINE_string("png_dir", None, "With --num_samples: also write every image as a PNG here.")
    FLAGS = flags.FLAGS


def main(argv: Sequence[str]):
    f = FLAGS
    if f.workdir and f.checkpoint:
        raise ValueError("give --workdir (a training run) or --checkpoint, not both.")
    if f.workdir:
        s = sampler_from_workdir(f.workdir, f.step)
    else:
        s = sampler_from_checkpoint(f.checkpoint, model_name=f.model, image_size=f.image_size,
                                    num_classes=f.num_classes, vae=f.vae, input_size=f.input_size,
                                    in_channels=f.in_channels, seed=f.seed)
    guidance = guidance_channels(f.guidance)
    if f.num_samples:
        if f.num_samples < 0 or f.per_device_batch <= 0:
            raise ValueError("--num_samples and --per_device_batch must be positive.")
        if not f.output.endswith(".npz"):
            raise ValueError(f"--output must be an .npz with --num_samples, got {f.output}.")
        cfg = 1.5 if f.cfg_scale is None else f.cfg_scale
        start = time.perf_counter()
        path = sample_eval_set(s, f.output, f.num_samples, per_device_batch=f.per_device_batch, sampler=f.sampler,
                               steps=f.steps, cfg_scale=cfg, guidance=guidance, eta=f.eta, seed=f.seed,
                               png_dir=f.png_dir)
        if path:
            print(f"{f.num_samples} samples ({f.sampler}-{f.steps}, cfg {cfg:g}) in {time.perf_counter() - start:.1f}s "
                  f"-> {path}")
        return
    try:
        labels = np.array([int(v) for v in f.labels], np.int32)
    except ValueError:
        raise ValueError(f"--labels must be integers, got {f.labels}") from None
    if labels.size == 0 or labels.min() < 0 or labels.max() >= s.model.num_classes:
        raise ValueError(f"--labels must be in [0, {s.model.num_classes - 1}], got {f.labels}.")
    if not f.output.endswith((".png", ".npz")):
        raise ValueError(f"--output must end in .png (a grid) or .npz (latents), got {f.output}.")
    cfg = 4.0 if f.cfg_scale is None else f.cfg_scale
    start = time.perf_counter()
    latents = sample_latents(s.model, s.params, jnp.asarray(labels), jax.random.key(f.seed), sampler=f.sampler,
                             steps=f.steps, cfg_scale=cfg, eta=f.eta, guidance_channels=guidance,
                             clip_denoised=s.pixel_space, **s.schedule)
    latents = np.asarray(latents)
    took = time.perf_counter() - start
    if f.output.endswith(".npz"):
        np.savez(f.output, latents=latents, labels=labels)
    else:
        images = s.decoder()(latents)
        save_png(make_grid(images, ncol=min(len(labels), 8)), f.output)
    print(f"{s.source}: {len(labels)} samples ({f.sampler}-{f.steps}, cfg {cfg:g}) in {took:.1f}s "
          f"(with compile) -> {f.output}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
