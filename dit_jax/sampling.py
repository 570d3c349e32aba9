"""Sampling: one place that turns (model, params, labels, noise, sampler name) into latents, and
latents into images; the weights to sample from (a training run or a checkpoint); resumable
evaluation sets in ADM's format over every device and host.

Used by the training loop (EMA grids), FID during training, the digit scorer, inversion and the
`dit_jax.sample` command line. NHWC throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from dit_jax import autoencoder as autoencoder_lib
from dit_jax import diffusion as diffusion_lib
from dit_jax import files, interpolants, models, solvers, weights, workdir as workdir_lib
from dit_jax.vae import images_to_uint8  # one conversion for grids, sets and evaluation

#: ddpm / ddim: the official samplers on the respaced schedule; dpm++2m / dpm++3m: DPM-Solver++
#: (multistep, order 2 / 3) with diffusers' linspace spacing (dit_jax.solvers).
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++3m")
#: Samplers of an interpolant (SiT) run: the probability-flow ODE (euler, heun; dopri5 adaptive,
#: atol 1e-6 rtol 1e-3) or the SDE with the "sigma" diffusion and SiT's "Mean" last step.
FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde-euler", "sde-heun")
GUIDANCE = ("official", "all")


def guidance_channels(guidance: str) -> Optional[int]:
    """'official' -> 3 (the reference guides latent channels 0-2 only); 'all' -> None (every
    epsilon channel)."""
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance must be 'official' or 'all', got {guidance!r}.")
    return 3 if guidance == "official" else None


def samplers_for(interpolant: Optional[interpolants.Interpolant]) -> tuple:
    """The sampler names of a DDPM run (interpolant None) or of an interpolant run."""
    return SAMPLERS if interpolant is None else FLOW_SAMPLERS


def schedule_from_config(config) -> dict:
    """How a run's model turns noise into data, from its config: the keyword arguments
    noise_schedule, diffusion_steps and interpolant (None for a DDPM run) of `sample_latents`."""
    flow = config.get("objective", "ddpm") == "interpolant"
    return dict(
        noise_schedule=config.diffusion.noise_schedule,
        diffusion_steps=int(config.diffusion.steps),
        interpolant=interpolants.from_config(config.interpolant) if flow else None,
    )


def sample_latents(
    model: models.DiT,
    params,
    labels: jax.Array,
    key: jax.Array,
    *,
    sampler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 4.0,
    guidance_channels: Optional[int] = 3,
    eta: float = 0.0,
    clip_denoised: bool = False,
    noise: Optional[jax.Array] = None,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    guidance_interval: Optional[tuple[float, float]] = None,
    interpolant: Optional[interpolants.Interpolant] = None,
) -> jax.Array:
    """Samples one latent per label: [N, H, W, C]. cfg_scale <= 1 disables guidance.
    clip_denoised clips each x0 prediction to [-1, 1]: right for pixel space, not for VAE latents.
    `noise` ([N, H, W, C]) is the starting x_T (default: drawn from `key`). The batch follows the
    sharding of `labels`/`noise`: pass them split over devices to sample data-parallel.
    noise_schedule/diffusion_steps must be those the model was trained with. `steps` is the
    number of model evaluations per sample (twice that many forwards with guidance).
    guidance_interval=(lo, hi): guide only at model timesteps lo <= t <= hi (None: all).
    An `interpolant` run (SiT) samples with FLOW_SAMPLERS on t in [0, 1] (1 is data); its
    noise_schedule and diffusion_steps are unused."""
    return _sample(
        *_sample_args(
            model,
            params,
            labels,
            key,
            noise=noise,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            guidance_channels=guidance_channels,
            eta=eta,
            clip_denoised=clip_denoised,
            noise_schedule=noise_schedule,
            diffusion_steps=diffusion_steps,
            guidance_interval=guidance_interval,
            interpolant=interpolant,
        )
    )


#: sample_latents' sampling settings and their defaults (noise aside)
_SAMPLE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(sample_latents).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "noise"
}


def lower_sample_latents(model: models.DiT, params, labels, key, *, noise, **kwargs):
    """The program `sample_latents` runs, lowered for abstract (jax.ShapeDtypeStruct) params,
    labels, key (uint32[2]) and noise: `.compile()` it ahead of time (dit_jax.planning).
    kwargs are `sample_latents`' sampling settings (sampler, steps, cfg_scale, ...)."""
    settings = {**_SAMPLE_DEFAULTS, **kwargs}
    return _sample.lower(
        *_sample_args(model, params, labels, key, noise=noise, split_key=False, **settings)
    )


def _sample_args(
    model,
    params,
    labels,
    key,
    *,
    sampler,
    steps,
    cfg_scale,
    guidance_channels,
    eta,
    clip_denoised,
    noise,
    noise_schedule,
    diffusion_steps,
    guidance_interval,
    interpolant,
    split_key=True,
) -> tuple:
    """`_sample`'s arguments, checked."""
    names = samplers_for(interpolant)
    if sampler not in names:
        kind = "a DDPM" if interpolant is None else "an interpolant"
        raise ValueError(
            f"Unknown sampler {sampler!r} for {kind} model; choose one of {', '.join(names)}."
        )
    if steps < (2 if sampler in ("ddpm", "ddim") else 1):
        raise ValueError(
            f"steps must be at least {2 if sampler in ('ddpm', 'ddim') else 1} for "
            f"{sampler}, got {steps}."
        )
    if interpolant is None:  # DPM-Solver++ picks its timesteps on the full schedule
        process = diffusion_lib.create_diffusion(
            "" if sampler.startswith("dpm") else str(steps),
            learn_sigma=model.learn_sigma,
            noise_schedule=noise_schedule,
            diffusion_steps=diffusion_steps,
        )
    else:
        process = interpolant
    loop_key = key
    if split_key:
        noise_key, loop_key = jax.random.split(key)
        if noise is None:
            shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
            noise = jax.random.normal(noise_key, shape, jnp.float32)
    interval = None if guidance_interval is None else tuple(float(v) for v in guidance_interval)
    return (
        model,
        process,
        sampler,
        int(steps),
        float(cfg_scale),
        guidance_channels,
        interval,
        float(eta),
        bool(clip_denoised),
        params,
        labels,
        noise,
        loop_key,
    )


def model_fn(
    model: models.DiT,
    params,
    labels: jax.Array,
    cfg_scale: float,
    guidance_channels: Optional[int],
    guidance_interval=None,
):
    """(x, t) -> model output for fixed labels, guided in one batched forward when cfg_scale > 1."""
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if cfg_scale > 1.0:
        return diffusion_lib.cfg_model_fn(
            apply, labels, model.num_classes, cfg_scale, guidance_channels, guidance_interval
        )
    return lambda x, t: apply(x, t, labels)


@functools.partial(jax.jit, static_argnums=tuple(range(9)))
def _sample(
    model,
    process,
    sampler,
    steps,
    cfg_scale,
    guidance_channels,
    guidance_interval,
    eta,
    clip_denoised,
    params,
    labels,
    z,
    key,
):
    """`process` is how the model was trained: a GaussianDiffusion or an Interpolant."""
    fn = model_fn(model, params, labels, cfg_scale, guidance_channels, guidance_interval)
    if isinstance(process, interpolants.Interpolant):
        return flow_sample(process, sampler, steps, fn, z, key)
    if sampler == "ddpm":
        return process.p_sample_loop(fn, z, key=key, clip_denoised=clip_denoised)
    if sampler == "ddim":
        return process.ddim_sample_loop(fn, z, eta=eta, key=key, clip_denoised=clip_denoised)
    order = {"dpm++2m": 2, "dpm++3m": 3}[sampler]
    return solvers.dpm_solver_sample_loop(
        fn, z, steps, order=order, schedule=process, clip_denoised=clip_denoised
    )


def invert_latents(
    model: models.DiT,
    params,
    latents: jax.Array,
    labels: jax.Array,
    *,
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_channels: Optional[int] = 3,
    clip_denoised: bool = False,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    interpolant: Optional[interpolants.Interpolant] = None,
):
    """(noise, latents reconstructed) of scaled latents [N, h, w, c], on the model's training
    process, as one compiled program: DDIM inversion and DDIM back for a DDPM model; for an
    interpolant model the probability-flow ODE run backwards (Heun, `steps` evaluations) and
    forwards again."""
    if interpolant is not None:
        process = interpolant
    else:
        process = diffusion_lib.create_diffusion(
            f"ddim{steps}",
            learn_sigma=model.learn_sigma,
            noise_schedule=noise_schedule,
            diffusion_steps=diffusion_steps,
        )
    return _invert(
        model,
        process,
        int(steps),
        float(cfg_scale),
        guidance_channels,
        bool(clip_denoised),
        params,
        latents,
        labels,
    )


def round_trip(
    diffusion: diffusion_lib.GaussianDiffusion, fn, x0: jax.Array, clip_denoised: bool = False
):
    """(x_T, x_0 again): DDIM inversion of x0 with the model function `fn(x, t)`, then DDIM
    (eta 0) back."""
    noise = diffusion.ddim_reverse_sample_loop(fn, x0, clip_denoised=clip_denoised)
    return noise, diffusion.ddim_sample_loop(fn, noise, clip_denoised=clip_denoised)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _invert(
    model, process, steps, cfg_scale, guidance_channels, clip_denoised, params, latents, labels
):
    fn = model_fn(model, params, labels, cfg_scale, guidance_channels)
    if isinstance(process, interpolants.Interpolant):
        grid = max(steps // 2, 1) + 1
        noise = process.sample_ode(fn, latents, method="heun2", num_steps=grid, reverse=True)
        return noise, process.sample_ode(fn, noise, method="heun2", num_steps=grid)
    return round_trip(process, fn, latents, clip_denoised)


def flow_sample(interpolant: interpolants.Interpolant, sampler: str, steps: int, fn, z, key):
    """Noise z -> data with an interpolant model function `fn(x, t)` in about `steps` model
    evaluations (dopri5 chooses its own)."""
    if sampler == "euler":
        return interpolant.sample_ode(fn, z, method="euler", num_steps=steps + 1)
    if sampler == "heun":  # two evaluations a step
        return interpolant.sample_ode(fn, z, method="heun2", num_steps=max(steps // 2, 1) + 1)
    if sampler == "dopri5":
        return interpolant.sample_ode(fn, z, method="dopri5", num_steps=2)
    method = {"sde-euler": "Euler", "sde-heun": "Heun"}[sampler]
    grid = steps if method == "Euler" else max(steps // 2, 1)
    return interpolant.sample_sde(
        fn,
        z,
        method=method,
        diffusion_form="sigma",
        last_step="Mean",
        num_steps=max(grid, 2),
        key=key,
    )


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------


def make_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] images in [-1, 1] (or uint8) -> one uint8 [rows*(H+pad)+pad,
    ncol*(W+pad)+pad, C] grid (row-major), converted as the reference does."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = images_to_uint8(images)
    n, h, w, c = images.shape
    rows = -(-n // ncol)
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str) -> None:
    """uint8 [H, W, C] (C = 1 or 3) -> PNG, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


# ----------------------------------------------------------------------------------------
# What to sample from: a training run, or a checkpoint plus a model description
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generator:
    """A model, its weights, how it was trained (noise schedule, guidance) and how its latents
    become images."""

    model: models.DiT
    params: dict
    autoencoder_spec: str  # "" when there is nothing to decode with
    scaling_factor: float  # latents are divided by it before decoding
    image_size: int
    source: str  # for messages and manifests
    noise_schedule: str = "linear"  # the training diffusion's
    diffusion_steps: int = 1000
    guidance: str = "official"  # the run's configured guidance (official or all)
    step: Optional[int] = None  # the training step of a run's checkpoint
    guidance_interval: Optional[tuple] = None  # the run's configured interval (None: always)
    interpolant: Optional[interpolants.Interpolant] = None  # an interpolant (SiT) run's

    @property
    def schedule(self) -> dict:
        """How the model was trained, as `sample_latents` keywords."""
        return dict(
            noise_schedule=self.noise_schedule,
            diffusion_steps=self.diffusion_steps,
            interpolant=self.interpolant,
        )

    @property
    def pixel_space(self) -> bool:
        return self.autoencoder_spec.startswith("identity")

    def decoder(self):
        """latents [N, h, w, c] as sampled -> images float32 [N, S, S, C] in [-1, 1]."""
        if not self.autoencoder_spec:
            raise ValueError(
                "no autoencoder to decode the samples with; give --vae (a diffusers "
                "folder or hub id)."
            )
        return latent_decoder(
            autoencoder_lib.load_autoencoder(self.autoencoder_spec),
            self.scaling_factor,
            self.image_size,
        )

    def sample_images(self, labels, key: jax.Array, **kwargs) -> np.ndarray:
        """Decoded samples float32 [N, S, S, C] in [-1, 1], one per label; kwargs are
        `sample_latents` settings (sampler, steps, cfg_scale, ...), the model's own schedule and
        pixel-space clipping filled in."""
        latents = sample_latents(
            self.model,
            self.params,
            jnp.asarray(labels),
            key,
            clip_denoised=self.pixel_space,
            **self.schedule,
            **kwargs,
        )
        return np.asarray(self.decoder()(latents))


def latent_decoder(autoencoder, scaling_factor: float, image_size: int):
    """latents [N, h, w, c] as sampled (scaled) -> images float32 [N, S, S, C] in [-1, 1]."""
    return lambda z: autoencoder.decode(np.asarray(z) / scaling_factor, image_size=image_size)


def generator_from_workdir(workdir: str, step: Optional[int] = None) -> Generator:
    """The EMA weights of a training run's latest (or given) checkpoint, with its autoencoder,
    its noise schedule and its configured guidance."""
    model, ema, step, meta = workdir_lib.load_ema(workdir, step)
    config = workdir_lib.load_run_config(workdir)
    schedule = schedule_from_config(config)
    return Generator(
        model,
        ema,
        meta["autoencoder"],
        float(meta["scaling_factor"]),
        int(meta["image_size"]),
        f"{workdir} step {step}",
        schedule["noise_schedule"],
        schedule["diffusion_steps"],
        config.sample.get("guidance", "official"),
        step,
        tuple(config.sample.get("guidance_interval", ())) or None,
        schedule["interpolant"],
    )


def generator_from_checkpoint(
    checkpoint: Optional[str],
    *,
    model_name: str,
    image_size: int,
    num_classes: int,
    vae: str,
    input_size: int = 0,
    in_channels: int = 4,
    seed: int = 0,
    log=print,
) -> Generator:
    """A converted dit_jax checkpoint (it knows its model) or an official
    .pt/.safetensors/.npz for `model_name`; latent side = image_size / the VAE's downsampling
    unless input_size is given. Without a checkpoint: random weights (a smoke run)."""
    saved = weights.saved_model_config(checkpoint) if checkpoint else None
    scaling, down = 0.18215, 8
    if vae.startswith("identity"):
        scaling, down = 1.0, 1
    if saved is not None:
        model = models.model_from_config(saved)
    else:
        if input_size <= 0:
            if image_size % down:
                raise ValueError(
                    f"--image_size {image_size} is not a multiple of the VAE's downsampling {down}."
                )
            input_size = image_size // down
        model = models.create_model(
            model_name, input_size=input_size, num_classes=num_classes, in_channels=in_channels
        )
    model.check_config()
    if checkpoint:
        params = weights.load_dit_params(checkpoint, model)
    else:
        log("no checkpoint: random weights (smoke run)")
        params = models.init_params(model, jax.random.key(seed))
    size = image_size if saved is None and not input_size else model.input_size * down
    return Generator(model, params, vae, scaling, size, checkpoint or "random weights")


# ----------------------------------------------------------------------------------------
# Evaluation sets: resumable, sharded over every device and host
# ----------------------------------------------------------------------------------------


def chunk_labels(seed: int, chunk: int, size: int, num_classes: int) -> np.ndarray:
    """Uniform random labels of one chunk, a pure function of (seed, chunk)."""
    return np.random.default_rng([seed, chunk]).integers(0, num_classes, size).astype(np.int32)


def local_data_parallel(params):
    """(params replicated over this process's devices, a sharding that splits a batch over
    them)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
    return jax.device_put(params, NamedSharding(mesh, P())), NamedSharding(mesh, P("data"))


def sample_chunk(
    model: models.DiT, params, chunk: int, seed: int, size: int, batch_sharding, **kwargs
):
    """(latents [size, h, w, c], labels [size]) of chunk `chunk`: uniform labels and starting
    noise that are pure functions of (seed, chunk), the batch split by `batch_sharding`.
    kwargs go to `sample_latents`."""
    noise_key, loop_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), chunk))
    labels = chunk_labels(seed, chunk, size, model.num_classes)
    shape = (size, model.input_size, model.input_size, model.in_channels)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    latents = sample_latents(
        model,
        params,
        jax.device_put(labels, batch_sharding),
        loop_key,
        noise=jax.device_put(noise, batch_sharding),
        **kwargs,
    )
    return latents, labels


def sample_eval_set(
    g: Generator,
    output: str,
    num_samples: int,
    *,
    per_device_batch: int = 32,
    sampler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.5,
    guidance: Optional[int] = 3,
    guidance_interval=None,
    eta: float = 0.0,
    seed: int = 0,
    png_dir: Optional[str] = None,
    keep_parts: bool = False,
    max_chunks: Optional[int] = None,
    progress: bool = True,
    log=print,
) -> Optional[str]:
    """Samples `num_samples` images with uniform random labels into an ADM-format .npz
    (`arr_0` uint8 [N, H, W, 3] NHWC, grayscale repeated to RGB as the evaluator expects;
    `arr_1` int labels). `guidance` is a number of guided channels (`guidance_channels`),
    `guidance_interval` as in `sample_latents`.

    Work is split in chunks of per_device_batch x local devices; chunk c belongs to process
    c mod process_count and is a pure function of (seed, c), so the set does not depend on
    how often it was interrupted. Finished chunks live in `<output>.parts/` (written
    atomically) and are not redone; the final file is assembled by process 0 once all are
    there. `max_chunks` stops early (for tests); returns the output path when complete.
    """
    chunk_size = per_device_batch * len(jax.local_devices())
    n_chunks = -(-num_samples // chunk_size)
    parts = output + ".parts"
    settings = dict(
        source=g.source,
        **g.schedule,
        num_samples=num_samples,
        chunk_size=chunk_size,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        guidance=guidance,
        eta=eta,
        seed=seed,
        processes=jax.process_count(),
    )
    if guidance_interval:
        settings["guidance_interval"] = [float(v) for v in guidance_interval]
    os.makedirs(parts, exist_ok=True)
    manifest = os.path.join(parts, "manifest.json")
    if jax.process_index() == 0:
        if os.path.exists(manifest):
            with open(manifest) as f:
                previous = json.load(f)
            if previous != settings:
                diff = {
                    k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v
                }
                raise ValueError(
                    f"{parts} holds chunks made with other settings {diff} (before, "
                    "now); use the same settings to resume, or delete it to start "
                    "over."
                )
        else:
            files.write_atomically(manifest, json.dumps(settings, indent=1).encode())
    decode = g.decoder()
    params, batch_sharding = local_data_parallel(g.params)
    mine = [c for c in range(n_chunks) if c % jax.process_count() == jax.process_index()]
    todo = [c for c in mine if not os.path.exists(_chunk_path(parts, c))]
    done = (len(mine) - len(todo)) * chunk_size
    if max_chunks is not None:
        todo = todo[:max_chunks]
    bar = None
    if progress and jax.process_index() == 0:
        bar = tqdm(
            total=len(mine) * chunk_size, initial=done, unit="img", desc="sampling", smoothing=0.1
        )
    for c in todo:
        latents, labels = sample_chunk(
            g.model,
            params,
            c,
            seed,
            chunk_size,
            batch_sharding,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            guidance_channels=guidance,
            guidance_interval=guidance_interval,
            eta=eta,
            clip_denoised=g.pixel_space,
            **g.schedule,
        )
        images = images_to_uint8(decode(latents))
        rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
        files.write_atomically(_chunk_path(parts, c), files.npz_bytes(images=rgb, labels=labels))
        if png_dir:
            for i, image in enumerate(images):
                if c * chunk_size + i < num_samples:
                    save_png(image, os.path.join(png_dir, f"{c * chunk_size + i:06d}.png"))
        if bar is not None:
            bar.update(chunk_size)
    if bar is not None:
        bar.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dit_jax.sample_eval_set")
    missing = [c for c in range(n_chunks) if not os.path.exists(_chunk_path(parts, c))]
    if missing:
        log(
            f"{n_chunks - len(missing)}/{n_chunks} chunks in {parts}; rerun the same command to "
            "finish."
        )
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
