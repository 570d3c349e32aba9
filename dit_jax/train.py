"""Training: the train state, one sharded jit-compiled step, EMA, and the loop with
checkpoints, monitoring, sample grids and preemption handling.

Everything random derives from (config.seed, step): the step's key is `fold_in(rng, step)`,
so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from dit_jax import autoencoder as autoencoder_lib
from dit_jax import checkpoints, diffusion as diffusion_lib, flops, models, sampling, sharding
from dit_jax import weights
from dit_jax import workdir as workdir_lib
from dit_jax.data import latents as latents_lib
from dit_jax.data import pipeline as pipeline_lib
from dit_jax.evaluation import during_training


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; each step uses fold_in(rng, step)
    nonfinite_step: jax.Array  # first step whose loss or gradient was not finite (-1: none)


OBJECTIVES = ("ddpm", "interpolant")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...), with what to do about it."""


# ----------------------------------------------------------------------------------------
# Construction and validation (before anything compiles)
# ----------------------------------------------------------------------------------------


def validate_config(config, meta: dict, num_devices: int) -> None:
    if config.batch_size <= 0 or config.batch_size % num_devices:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {num_devices} devices."
        )
    if meta["image_size"] != config.data.image_size:
        raise ValueError(
            f"config.data.image_size {config.data.image_size} does not match the dataset "
            f"({meta['image_size']}px, latents {meta['latent_shape']})."
        )
    if config.num_train_steps <= 0:
        raise ValueError(f"num_train_steps must be positive, got {config.num_train_steps}.")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {config.ema_decay}.")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}.")
    try:
        jnp.dtype(config.model.dtype)
    except TypeError:
        raise ValueError(
            f"config.model.dtype {config.model.dtype!r} is not a dtype (e.g. 'bfloat16', 'float32')."
        ) from None
    if config.objective not in OBJECTIVES:
        raise ValueError(f"config.objective must be one of {OBJECTIVES}, got {config.objective!r}.")
    interpolant = sampling.schedule_from_config(config)["interpolant"]  # checks its fields
    for section in ("sample", "eval"):
        c = config[section]
        names = sampling.samplers_for(interpolant)
        if c.sampler not in names:
            raise ValueError(
                f"config.{section}.sampler must be one of {names} for objective "
                f"{config.objective!r}, got {c.sampler!r}."
            )
        sampling.guidance_channels(c.guidance)  # checks the name
        if len(c.guidance_interval) not in (0, 2):
            raise ValueError(
                f"config.{section}.guidance_interval must be () or (lo, hi), "
                f"got {tuple(c.guidance_interval)}."
            )
    if config.sample.every_steps:
        classes = list(config.sample.classes)
        if not classes or min(classes) < 0 or max(classes) >= meta["num_classes"]:
            raise ValueError(
                f"config.sample.classes {tuple(classes)} must lie in "
                f"[0, {meta['num_classes'] - 1}] (the dataset has "
                f"{meta['num_classes']} classes)."
            )


def lr_schedule(config):
    """Constant (the paper) or cosine decay to 10% over the run, after an optional linear warm-up."""
    o = config.optimizer
    if o.schedule == "constant":
        main = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(
            o.learning_rate, max(config.num_train_steps - o.warmup_steps, 1), alpha=0.1
        )
    else:
        raise ValueError(
            f"config.optimizer.schedule must be 'constant' or 'cosine', got {o.schedule!r}."
        )
    if not o.warmup_steps:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), main], [o.warmup_steps]
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, optionally after global-norm clipping. The fixed position table
    gets a zero gradient from the model (stop_gradient) and no weight decay, so it never moves."""
    o = config.optimizer
    adamw = optax.adamw(
        lr_schedule(config),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        mask=models.trainable_mask,
    )
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip else adamw


def init_state_fn(model, tx, seed: int, init_params=None):
    """rng -> boxed TrainState (logical partitioning metadata kept for the shardings). A model
    with scan_blocks starts from the looped model's initial weights, stacked: the seed gives
    the same run in either layout."""

    def init(rng):
        variables = model.init({"params": rng}, *models.dummy_inputs(model))
        params = variables["params"]
        start = init_params
        if start is None and model.scan_blocks:
            looped = model.clone(scan_blocks=False)
            start = nn.meta.unbox(looped.init({"params": rng}, *models.dummy_inputs(looped)))
            start = models.params_in_layout(start["params"], model)
        if start is not None:
            params = jax.tree_util.tree_map(
                lambda box, value: (
                    box.replace_boxed(jnp.asarray(value))
                    if isinstance(box, nn.meta.AxisMetadata)
                    else value
                ),
                params,
                start,
                is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
            )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            nonfinite_step=jnp.full((), -1, jnp.int32),
        )

    return init


def train_state_shardings(config, model: models.DiT, tx, mesh, init_params=None):
    """(init: rng -> boxed TrainState, the abstract (unboxed) TrainState, its NamedShardings)
    under `config.mesh.rules`: what training runs and what ahead-of-time compilation lowers."""
    init = init_state_fn(model, tx, config.seed, init_params)
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.logical_rules(config))
    return init, nn.meta.unbox(boxed), nn.meta.unbox(shardings)


def in_block_layout(tree, model: models.DiT):
    """Every parameter-shaped dict in `tree` (params, EMA, the optimizer's moments) in `model`'s
    block layout (`models.params_in_layout`); everything else as it is."""

    def is_params(x):
        return isinstance(x, dict) and models.block_layout(x) is not None

    return jax.tree_util.tree_map(
        lambda x: models.params_in_layout(x, model) if is_params(x) else x, tree, is_leaf=is_params
    )


def create_train_state(config, model: models.DiT, tx, mesh, manager):
    """The state to train from: restored from the newest checkpoint in `manager` that verifies
    (bad newer ones are set aside), else initialised (from config.model.init_checkpoint when
    given). Returns (state, its shardings, the data position or None, the restored step or None)."""
    init_params = None
    if manager.latest_step() is None and config.model.init_checkpoint:
        init_params = weights.load_dit_params(config.model.init_checkpoint, model)
    init, abstract, state_sharding = train_state_shardings(config, model, tx, mesh, init_params)
    saved = checkpoints.saved_block_layout(manager)
    relayout = saved is not None and saved != model.scan_blocks
    restore_abstract, restore_sharding = abstract, state_sharding
    if relayout:  # written with the other block layout: restore it as it was saved
        other = model.clone(scan_blocks=saved)
        _, restore_abstract, restore_sharding = train_state_shardings(config, other, tx, mesh)
    restored = checkpoints.restore_train_state(
        manager, restore_abstract, restore_sharding, set_aside_bad=True
    )
    if restored is not None:
        state, data_state, step = restored
        if relayout:  # restack parameters, EMA and optimizer moments into this model's layout
            state = jax.jit(lambda s: in_block_layout(s, model), out_shardings=state_sharding)(
                state
            )
            print(
                f"restored step {step} written with model.scan_blocks={saved}; its parameters, "
                f"EMA and optimizer state are restacked for scan_blocks={model.scan_blocks}",
                flush=True,
            )
        return state, state_sharding, data_state, step
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)(
        jax.random.PRNGKey(config.seed)
    )
    return state, state_sharding, None, None


# ----------------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------------


def training_diffusion(config) -> diffusion_lib.GaussianDiffusion:
    """The diffusion of `config` (all training timesteps, no respacing)."""
    return diffusion_lib.create_diffusion(
        "",
        noise_schedule=config.diffusion.noise_schedule,
        diffusion_steps=config.diffusion.steps,
        learn_sigma=config.model.learn_sigma,
    )


def training_losses(config):
    """The per-example losses of config.objective:
    (model_fn(x, t), x [B,h,w,c], t_key, noise_key) -> {'loss': [B], other terms: [B]}.
    ddpm: DiT's hybrid loss (mse + vb) at integer timesteps; interpolant: SiT's loss at
    continuous t in [0, 1]. Both draw t from t_key and the noise from noise_key."""
    if config.objective == "interpolant":
        interpolant = sampling.schedule_from_config(config)["interpolant"]

        def interpolant_losses(model_fn, x, t_key, noise_key):
            t = interpolant.sample_t(t_key, x.shape[0])
            noise = jax.random.normal(noise_key, x.shape, jnp.float32)
            return {"loss": interpolant.training_losses(model_fn, x, t=t, noise=noise)["loss"]}

        return interpolant_losses
    diffusion = training_diffusion(config)

    def ddpm_losses(model_fn, x, t_key, noise_key):
        t = jax.random.randint(t_key, (x.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(noise_key, x.shape, jnp.float32)
        terms = diffusion.training_losses(model_fn, x, t, noise)
        return {"loss": terms["loss"], "mse": terms["mse"], "vb": terms["vb"]}

    return ddpm_losses


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: models.DiT,
    losses,
    tx: optax.GradientTransformation,
    config,
) -> tuple[TrainState, dict]:
    """One optimisation step on a global batch {'latents': [B,h,w,c], 'labels': [B]} with
    `losses` from `training_losses`. A step whose loss or gradient is not finite leaves the
    state untouched and is recorded."""
    x, y = batch["latents"], batch["labels"]
    key = jax.random.fold_in(state.rng, state.step)
    t_key, noise_key, drop_key = jax.random.split(key, 3)

    def loss_fn(params):
        model_fn = lambda xt, tt: model.apply(
            {"params": params}, xt, tt, y, train=True, rngs={"label_dropout": drop_key}
        )
        terms = losses(model_fn, x, t_key, noise_key)
        return terms["loss"].mean(), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    decay = config.ema_decay

    def update(params, opt_state, ema):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, opt_state, ema

    # One branch instead of a select over every leaf of params, optimizer state and EMA:
    # a non-finite step leaves all three bit-for-bit as they were, and XLA updates the
    # donated buffers in place without copying the state first.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state, ema = jax.lax.cond(
        finite, update, lambda *old: old, state.params, state.opt_state, state.ema_params
    )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        nonfinite_step=jnp.where(
            (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
        ),
    )
    metrics = {
        **{k: v.mean() for k, v in terms.items()},
        "grad_norm": grad_norm,
        "learning_rate": lr_schedule(config)(state.step),
    }
    return new_state, metrics


def jit_train_step(config, model: models.DiT, tx, state_sharding, batch_sharding):
    """`train_step` jitted with the state's and the batch's shardings, the state donated."""
    step = functools.partial(
        train_step, model=model, losses=training_losses(config), tx=tx, config=config
    )
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------------------
# Sample grids
# ----------------------------------------------------------------------------------------


def write_sample_grid(model, ema_params, config, step: int, workdir: str, writer, decode):
    """EMA samples of config.sample.classes as workdir/samples/step_<step>.png (and to the
    metric writer); `decode` turns sampled latents into images."""
    s = config.sample
    labels = np.repeat(np.asarray(s.classes, np.int32), s.num_per_class)
    latents = sampling.sample_latents(
        model,
        jax.device_get(ema_params),
        jnp.asarray(labels),
        jax.random.PRNGKey(config.seed + 1),
        sampler=s.sampler,
        steps=s.steps,
        cfg_scale=s.cfg_scale,
        guidance_channels=sampling.guidance_channels(s.guidance),
        clip_denoised=s.clip_denoised,
        guidance_interval=tuple(s.guidance_interval) or None,
        **sampling.schedule_from_config(config),
    )
    ncol = s.num_per_class if s.num_per_class > 1 else len(labels)
    grid = sampling.make_grid(decode(latents), ncol=ncol)
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    sampling.save_png(grid, path)
    writer.write_images(step, {"ema_samples": grid[None]})
    return path


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps. With several processes, jax's
    preemption sync manager takes SIGTERM instead and `manager.reached_preemption(step)` names
    the same step in every process (a flag per process could stop them at different steps)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1 and _preemption_sync_manager() is not None:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _preemption_sync_manager():
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager
    except (ImportError, AttributeError):
        return None


def ema_on_host(state: TrainState):
    """The EMA parameters as host arrays: an all-gather across processes when they are sharded
    over several (fsdp across hosts), which every process must join."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(state.ema_params, tiled=True)
    return jax.device_get(state.ema_params)


def check_finite(state: TrainState, manager) -> None:
    """Raises TrainingError naming the first non-finite step and the last good checkpoint."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        good = manager.latest_step()
        where = (
            f"the last good checkpoint is step {good} in {manager.directory}"
            if good is not None
            else "there is no checkpoint yet"
        )
        raise TrainingError(
            f"loss or gradient became non-finite at step {bad}; parameters were not updated from "
            f"it and {where}. Try a lower learning rate, config.optimizer.grad_clip, or "
            "config.model.dtype='float32'."
        )


def save_checkpoint(manager, step: int, state: TrainState, pipeline) -> None:
    """A checkpoint of `state` and the data position; never of a diverged run."""
    check_finite(state, manager)
    checkpoints.save_train_state(manager, step, state, pipeline.get_state(), force=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Optional[TrainState]:
    """Trains until config.num_train_steps (resuming from `workdir` if it has checkpoints).
    Returns the final state, or None when stopped early by a preemption signal."""
    data_dir = workdir_lib.dataset_dir(config)
    meta = latents_lib.read_metadata(data_dir)
    devices = jax.devices()[: config.mesh.num_devices or None]
    validate_config(config, meta, len(devices))
    model = workdir_lib.model_for_dataset(config, meta)
    is_main = jax.process_index() == 0
    fid = None
    if config.eval.every_steps and is_main:  # checked now, built on first use
        fid = during_training.FidDuringTraining(config, model, meta, data_dir, workdir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    tx = make_optimizer(config)
    os.makedirs(workdir, exist_ok=True)

    manager = checkpoints.train_checkpoint_manager(workdir_lib.checkpoint_dir(workdir), config)
    writer = pipeline = None
    try:  # from here on, close the manager (and what else was opened) however this ends
        state, state_sharding, data_state, restored_step = create_train_state(
            config, model, tx, mesh, manager
        )
        batch_sharding = sharding.batch_sharding(mesh)
        pipeline = pipeline_lib.InputPipeline(
            data_dir,
            global_batch_size=config.batch_size,
            seed=config.seed,
            split=config.data.split,
            sharding=batch_sharding,
            random_flip=config.data.random_flip,
            num_threads=config.data.num_threads,
            prefetch=config.data.prefetch,
        )
        if restored_step is not None:
            pipeline.set_state(data_state)
            if is_main:
                workdir_lib.trim_metrics(workdir, restored_step)
                print(f"resumed from step {restored_step} in {workdir}")
        step_fn = jit_train_step(config, model, tx, state_sharding, batch_sharding)

        from clu import metric_writers, periodic_actions  # imports TensorFlow: after the checks

        writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
        hooks = []
        if is_main:
            workdir_lib.save_run_config(workdir, config)
            if restored_step is None:
                writer.write_hparams({k: str(v) for k, v in _flatten_config(config).items()})
            hooks.append(
                periodic_actions.ReportProgress(
                    num_train_steps=config.num_train_steps, writer=writer
                )
            )
            if config.profile_steps:
                hooks.append(
                    periodic_actions.Profile(
                        logdir=workdir,
                        num_profile_steps=config.profile_steps,
                        first_profile=int(jax.device_get(state.step)) + 10,
                    )
                )
        peak = config.peak_flops_per_device or flops.peak_flops_per_device(jax.devices()[0])
        # MFU needs the training flops: fwd + bwd = 3 forwards, a multiply-add = 2 flops.
        train_flops_per_image = 3 * 2 * flops.forward_flops(model) if peak else None
        decode = None
        if config.sample.every_steps and config.sample.autoencoder and is_main:
            decode = sampling.latent_decoder(
                autoencoder_lib.load_autoencoder(config.sample.autoencoder),
                meta["scaling_factor"],
                meta["image_size"],
            )

        step = int(jax.device_get(state.step))
        last_saved = manager.latest_step()
        window, t_window, steps_window = [], time.perf_counter(), 0
        with _Preemption() as preemption:
            while step < config.num_train_steps:
                state, metrics = step_fn(state, next(pipeline))
                step += 1
                steps_window += 1
                window.append(metrics)
                for hook in hooks:
                    hook(step)
                if step % config.log_every_steps == 0 or step == config.num_train_steps:
                    check_finite(state, manager)
                    fetched = jax.device_get(window)
                    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    scalars["steps_per_sec"] = steps_window / (time.perf_counter() - t_window)
                    scalars["images_per_sec"] = scalars["steps_per_sec"] * config.batch_size
                    if peak:
                        scalars["mfu"] = (
                            scalars["images_per_sec"]
                            * train_flops_per_image
                            / (peak * len(devices))
                        )
                    writer.write_scalars(step, scalars)
                    if is_main:
                        log_metrics(workdir, step, scalars, config.num_train_steps)
                    window, t_window, steps_window = [], time.perf_counter(), 0
                if step % config.checkpoint_every_steps == 0 or manager.reached_preemption(step):
                    save_checkpoint(manager, step, state, pipeline)
                    last_saved = step
                grid_due = bool(
                    config.sample.every_steps
                    and config.sample.autoencoder
                    and step % config.sample.every_steps == 0
                )
                eval_due = bool(config.eval.every_steps and step % config.eval.every_steps == 0)
                if grid_due or eval_due:  # every process takes part in gathering the EMA
                    ema = ema_on_host(state)
                    if grid_due and decode:
                        path = write_sample_grid(model, ema, config, step, workdir, writer, decode)
                        print(f"step {step}: EMA samples -> {path}")
                    if eval_due and fid is not None:
                        start = time.perf_counter()
                        values = fid(ema, step)
                        writer.write_scalars(step, values)
                        log_eval(workdir, step, values, time.perf_counter() - start)
                    t_window = time.perf_counter()  # sampling time is not training time
                if preemption.requested or manager.reached_preemption(step):
                    if last_saved != step:
                        save_checkpoint(manager, step, state, pipeline)
                    manager.wait_until_finished()
                    print(
                        f"preempted: saved step {step} in {manager.directory}; rerun the same "
                        "command to resume"
                    )
                    return None
        if last_saved != step:
            save_checkpoint(manager, step, state, pipeline)
        return state
    finally:
        checkpoints.close_manager(manager)  # never leave an async save half-written
        if writer is not None:
            writer.flush()
        if pipeline is not None:
            pipeline.close()


def log_metrics(workdir: str, step: int, scalars: dict, total_steps: int) -> None:
    """One console line per log step, and the same figures appended to workdir/metrics.jsonl."""
    eta = (total_steps - step) / max(scalars["steps_per_sec"], 1e-9)
    extra = f" mfu {scalars['mfu']:.1%}" if "mfu" in scalars else ""
    terms = f" (mse {scalars['mse']:.4f} vb {scalars['vb']:.4f})" if "vb" in scalars else ""
    print(
        f"step {step}/{total_steps}: loss {scalars['loss']:.4f}{terms} "
        f"grad {scalars['grad_norm']:.3f} "
        f"lr {scalars['learning_rate']:.2e} | {scalars['steps_per_sec']:.2f} steps/s "
        f"{scalars['images_per_sec']:.1f} img/s{extra} | eta {eta / 60:.1f} min",
        flush=True,
    )
    workdir_lib.append_metrics(workdir, step, scalars)


def log_eval(workdir: str, step: int, values: dict, seconds: float) -> None:
    """Evaluation figures on the console and in workdir/metrics.jsonl (a line of their own)."""
    print(
        f"step {step}: "
        + " ".join(f"{k} {v:.3f}" for k, v in values.items())
        + f" ({seconds:.0f}s)",
        flush=True,
    )
    workdir_lib.append_metrics(workdir, step, values)


def _flatten_config(config, prefix="") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
