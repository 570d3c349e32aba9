"""Training: the train state, one sharded jit-compiled step, EMA, and the loop with
checkpoints, monitoring, sample grids and preemption handling.

Everything random derives from (config.seed, step): the step's key is `fold_in(rng, step)`,
so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
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

from dit_jax import checkpoints, diffusion as diffusion_lib, files, flops, models, sharding, weights
from dit_jax.data import encode as encode_lib
from dit_jax.data import latents as latents_lib
from dit_jax.data import pipeline as pipeline_lib


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array            # raw uint32[2] key; each step uses fold_in(rng, step)
    nonfinite_step: jax.Array  # first step whose loss or gradient was not finite (-1: none)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...), with what to do about it."""


# ----------------------------------------------------------------------------------------
# Construction and validation (before anything compiles)
# ----------------------------------------------------------------------------------------

def resolve_data_dir(config) -> str:
    """The dataset directory; 'embedded' means the bundled MNIST set, built on first use."""
    if config.data.dir == "embedded":
        if not 8 <= config.data.image_size <= 32:
            raise ValueError(f"the embedded dataset holds 28px digits; config.data.image_size must be in [8, 32], "
                             f"got {config.data.image_size}.")
        cache = os.environ.get("DIT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dit_jax"))
        size = config.data.image_size
        path = os.path.join(cache, f"embedded_mnist5k_{size}px")
        if jax.process_index() == 0:
            encode_lib.ensure_embedded_dataset(path, image_size=size)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("dit_jax.embedded_dataset")
        return path
    if not config.data.dir:
        raise ValueError("config.data.dir is empty: give a latent dataset from dit_jax.data.encode, or 'embedded'.")
    if not os.path.isdir(config.data.dir):
        raise ValueError(f"dataset {config.data.dir} does not exist; encode one with python -m dit_jax.data.encode.")
    return config.data.dir


def model_from_config(config, meta: dict) -> models.DiT:
    """The DiT for this config and dataset: size from the name and overrides, latent shape
    and class count from the dataset."""
    h, w, c = meta["latent_shape"]
    if h != w:
        raise ValueError(f"the dataset's latents are {h}x{w}; DiT needs square inputs.")
    kwargs = dict(input_size=h, in_channels=c, num_classes=meta["num_classes"],
                  block_type=config.model.block_type, class_dropout_prob=config.model.class_dropout_prob,
                  learn_sigma=config.model.learn_sigma, dtype=jnp.dtype(config.model.dtype),
                  remat=config.model.remat, attention=None if config.model.attention == "auto" else config.model.attention)
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        if config.model[key] is not None:
            kwargs[key] = config.model[key]
    name = config.model.name or None
    if name is None and any(config.model[k] is None for k in ("depth", "hidden_size", "num_heads", "patch_size")):
        raise ValueError("config.model.name is empty: give a model name (e.g. 'XL/2') or all of depth, "
                         "hidden_size, num_heads and patch_size.")
    model = models.create_model(name, **kwargs)
    model.check_config()
    return model


def validate_config(config, meta: dict, num_devices: int) -> None:
    if config.batch_size <= 0 or config.batch_size % num_devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {num_devices} devices.")
    if meta["image_size"] != config.data.image_size:
        raise ValueError(f"config.data.image_size {config.data.image_size} does not match the dataset "
                         f"({meta['image_size']}px, latents {meta['latent_shape']}).")
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
        raise ValueError(f"config.model.dtype {config.model.dtype!r} is not a dtype (e.g. 'bfloat16', 'float32').") from None
    if config.sample.every_steps:
        classes = list(config.sample.classes)
        if not classes or min(classes) < 0 or max(classes) >= meta["num_classes"]:
            raise ValueError(f"config.sample.classes {tuple(classes)} must lie in [0, {meta['num_classes'] - 1}] "
                             f"(the dataset has {meta['num_classes']} classes).")


def lr_schedule(config):
    """Constant (the paper) or cosine decay to 10% over the run, after an optional linear warm-up."""
    o = config.optimizer
    if o.schedule == "constant":
        main = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.learning_rate, max(config.num_train_steps - o.warmup_steps, 1), alpha=0.1)
    else:
        raise ValueError(f"config.optimizer.schedule must be 'constant' or 'cosine', got {o.schedule!r}.")
    if not o.warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), main], [o.warmup_steps])


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, optionally after global-norm clipping. The fixed position table
    gets a zero gradient from the model (stop_gradient) and no weight decay, so it never moves."""
    o = config.optimizer

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[0], "key", None) != "pos_embed", params)

    adamw = optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip else adamw


def init_state_fn(model, tx, seed: int, init_params=None):
    """rng -> boxed TrainState (logical partitioning metadata kept for the shardings)."""

    def init(rng):
        variables = model.init({"params": rng}, *models.dummy_inputs(model))
        params = variables["params"]
        if init_params is not None:
            params = jax.tree_util.tree_map(
                lambda box, value: box.replace_boxed(jnp.asarray(value)) if isinstance(box, nn.meta.AxisMetadata) else value,
                params, init_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(seed),
                          nonfinite_step=jnp.full((), -1, jnp.int32))

    return init


# ----------------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------------

def train_step(state: TrainState, batch: dict, *, model: models.DiT, diffusion: diffusion_lib.GaussianDiffusion,
               tx: optax.GradientTransformation, config) -> tuple[TrainState, dict]:
    """One optimisation step on a global batch {'latents': [B,h,w,c], 'labels': [B]}.
    A step whose loss or gradient is not finite leaves the state untouched and is recorded."""
    x, y = batch["latents"], batch["labels"]
    key = jax.random.fold_in(state.rng, state.step)
    t_key, noise_key, drop_key = jax.random.split(key, 3)
    t = jax.random.randint(t_key, (x.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_key, x.shape, jnp.float32)

    def loss_fn(params):
        model_fn = lambda xt, tt: model.apply({"params": params}, xt, tt, y, train=True,
                                              rngs={"label_dropout": drop_key})
        terms = diffusion.training_losses(model_fn, x, t, noise)
        return terms["loss"].mean(), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = config.ema_decay
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params), ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step))
    metrics = {"loss": loss, "mse": terms["mse"].mean(), "vb": terms["vb"].mean(), "grad_norm": grad_norm,
               "learning_rate": lr_schedule(config)(state.step)}
    return new_state, metrics


# ----------------------------------------------------------------------------------------
# Throughput accounting
# ----------------------------------------------------------------------------------------

#: Dense bf16 peak FLOP/s per device by `device_kind` prefix (vendor figures).
PEAK_FLOPS = {
    "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H20": 148e12, "NVIDIA A100": 312e12,
    "NVIDIA GH200": 989e12, "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(config) -> Optional[float]:
    if config.peak_flops_per_device:
        return float(config.peak_flops_per_device)
    kind = jax.devices()[0].device_kind
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


# ----------------------------------------------------------------------------------------
# Sample grids
# ----------------------------------------------------------------------------------------

def write_sample_grid(model, ema_params, config, step: int, workdir: str, writer, autoencoder, scaling_factor):
    from dit_jax import sample as sample_lib
    s = config.sample
    labels = np.repeat(np.asarray(s.classes, np.int32), s.num_per_class)
    if labels.max(initial=0) >= model.num_classes:
        raise ValueError(f"config.sample.classes {tuple(s.classes)} has labels >= {model.num_classes} classes.")
    if autoencoder is None:  # nothing to decode the grid with: skip the sampling
        return None
    latents = sample_lib.sample_latents(
        model, jax.device_get(ema_params), jnp.asarray(labels), jax.random.PRNGKey(config.seed + 1),
        sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale,
        guidance_channels=sample_lib.guidance_channels(s.guidance), clip_denoised=s.clip_denoised,
        noise_schedule=config.diffusion.noise_schedule, diffusion_steps=config.diffusion.steps)
    images = autoencoder.decode(np.asarray(latents) / scaling_factor)
    grid = sample_lib.make_grid(images, ncol=s.num_per_class if s.num_per_class > 1 else len(labels))
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    sample_lib.save_png(grid, path)
    writer.write_images(step, {"ema_samples": grid[None]})
    return path


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Optional[TrainState]:
    """Trains until config.num_train_steps (resuming from `workdir` if it has checkpoints).
    Returns the final state, or None when stopped early by a preemption signal."""
    data_dir = resolve_data_dir(config)
    meta = latents_lib.read_metadata(data_dir)
    devices = jax.devices()[: config.mesh.num_devices or None]
    validate_config(config, meta, len(devices))
    model = model_from_config(config, meta)
    fid = None
    if config.eval.every_steps and jax.process_index() == 0:  # checked now, built on first use
        from dit_jax.evaluation import during_training
        fid = during_training.FidDuringTraining(config, model, meta, data_dir, workdir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)
    diffusion = diffusion_lib.create_diffusion("", noise_schedule=config.diffusion.noise_schedule,
                                               diffusion_steps=config.diffusion.steps,
                                               learn_sigma=config.model.learn_sigma)
    tx = make_optimizer(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    manager = checkpoints.train_checkpoint_manager(os.path.join(workdir, "checkpoints"), config)
    writer = pipeline = None
    try:  # from here on, close the manager (and what else was opened) however this ends
        init_params = None
        if manager.latest_step() is None and config.model.init_checkpoint:
            init_params = weights.load_dit_params(config.model.init_checkpoint, model)
        init = init_state_fn(model, tx, config.seed, init_params)
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        state_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        state_sharding = nn.meta.unbox(state_sharding)
        batch_sharding = sharding.batch_sharding(mesh)
        pipeline = pipeline_lib.InputPipeline(
            data_dir, global_batch_size=config.batch_size, seed=config.seed, split=config.data.split,
            sharding=batch_sharding, random_flip=config.data.random_flip,
            num_threads=config.data.num_threads, prefetch=config.data.prefetch)

        restored = checkpoints.restore_train_state(manager, nn.meta.unbox(abstract), state_sharding,
                                                   set_aside_bad=True)
        if restored is not None:
            state, data_state, restored_step = restored
            pipeline.set_state(data_state)
            if is_main:
                trim_metrics(workdir, restored_step)
                print(f"resumed from step {restored_step} in {workdir}")
        else:
            state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))

        step_fn = jax.jit(functools.partial(train_step, model=model, diffusion=diffusion, tx=tx, config=config),
                          in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                          donate_argnums=0)

        from clu import metric_writers, periodic_actions  # imports TensorFlow: after the config checks
        writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
        if is_main:
            save_run_config(workdir, config)
        if is_main and restored is None:
            writer.write_hparams({k: str(v) for k, v in _flatten_config(config).items()})
        hooks = []
        if is_main:
            hooks.append(periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer))
            if config.profile_steps:
                hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                                      first_profile=int(jax.device_get(state.step)) + 10))
        peak = peak_flops_per_device(config)
        # MFU needs the training flops: fwd + bwd = 3 forwards, a multiply-add = 2 flops. Traced only when used.
        train_flops_per_image = 3 * 2 * flops.forward_flops(model) if peak else None
        autoencoder = None
        if config.sample.every_steps and config.sample.autoencoder and is_main:
            from dit_jax import autoencoder as autoencoder_lib
            autoencoder = autoencoder_lib.load_autoencoder(config.sample.autoencoder)

        step = int(jax.device_get(state.step))
        last_saved = manager.latest_step()
        window, t_window, steps_window = [], time.perf_counter(), 0

        def check_finite():
            bad = int(jax.device_get(state.nonfinite_step))
            if bad >= 0:
                good = manager.latest_step()
                where = (f"the last good checkpoint is step {good} in {manager.directory}" if good is not None
                         else "there is no checkpoint yet")
                raise TrainingError(
                    f"loss or gradient became non-finite at step {bad}; parameters were not updated from it and "
                    f"{where}. Try a lower learning rate, config.optimizer.grad_clip, or config.model.dtype='float32'.")

        def save(force=False):
            nonlocal last_saved
            check_finite()  # never write a checkpoint of a diverged run
            checkpoints.save_train_state(manager, step, state, pipeline.get_state(), force=force)
            last_saved = step

        with _Preemption() as preemption:
            while step < config.num_train_steps:
                batch = next(pipeline)
                state, metrics = step_fn(state, batch)
                step += 1
                steps_window += 1
                window.append(metrics)
                for hook in hooks:
                    hook(step)
                if step % config.log_every_steps == 0 or step == config.num_train_steps:
                    check_finite()
                    fetched = jax.device_get(window)
                    elapsed = time.perf_counter() - t_window
                    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    scalars["steps_per_sec"] = steps_window / elapsed
                    scalars["images_per_sec"] = scalars["steps_per_sec"] * config.batch_size
                    if peak:
                        scalars["mfu"] = scalars["images_per_sec"] * train_flops_per_image / (peak * len(devices))
                    writer.write_scalars(step, scalars)
                    if is_main:
                        log_metrics(workdir, step, scalars, config.num_train_steps)
                    window, t_window, steps_window = [], time.perf_counter(), 0
                if step % config.checkpoint_every_steps == 0 or manager.reached_preemption(step):
                    save(force=True)
                if config.sample.every_steps and step % config.sample.every_steps == 0 and is_main:
                    path = write_sample_grid(model, state.ema_params, config, step, workdir, writer, autoencoder,
                                             meta["scaling_factor"])
                    if path:
                        print(f"step {step}: EMA samples -> {path}")
                    t_window = time.perf_counter()  # sampling time is not training time
                if fid is not None and step % config.eval.every_steps == 0:
                    start = time.perf_counter()
                    values = fid(state.ema_params, step)
                    writer.write_scalars(step, values)
                    log_eval(workdir, step, values, time.perf_counter() - start)
                    t_window = time.perf_counter()
                if preemption.requested or manager.reached_preemption(step):
                    if last_saved != step:
                        save(force=True)
                    manager.wait_until_finished()
                    print(f"preempted: saved step {step} in {manager.directory}; rerun the same command to resume")
                    return None
        if last_saved != step:
            save(force=True)
        return state
    finally:
        checkpoints.close_manager(manager)  # never leave an async save half-written
        if writer is not None:
            writer.flush()
        if pipeline is not None:
            pipeline.close()


RUN_CONFIG_FILE = "config.json"


def save_run_config(workdir: str, config) -> None:
    files.write_atomically(os.path.join(workdir, RUN_CONFIG_FILE), config.to_json_best_effort(indent=1))


def trim_metrics(workdir: str, step: int) -> None:
    """On resume from `step`: drops the metrics.jsonl lines of later steps (they are redone) and
    any line cut short by a kill, so the file reads as if the run had never stopped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    files.write_atomically(path, "".join(kept))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run was started with (workdir/config.json)."""
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{workdir} is not a training workdir (no {RUN_CONFIG_FILE}).")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_ema_from_workdir(workdir: str, step: Optional[int] = None):
    """(model, EMA params, step, dataset metadata) of a run's latest (or given) checkpoint,
    verified against its fingerprint (the latest falls back to the previous good one)."""
    config = load_run_config(workdir)
    meta = latents_lib.read_metadata(resolve_data_dir(config))
    model = model_from_config(config, meta)
    manager = checkpoints.train_checkpoint_manager(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        if step is None:  # the newest checkpoint that restores and verifies
            restored = checkpoints.restore_train_state(manager)
            if restored is None:
                raise ValueError(f"{workdir} has no checkpoint yet.")
            state, _, step = restored
        else:
            if step not in manager.all_steps():
                raise ValueError(f"{workdir} has no checkpoint at step {step} (it has {list(manager.all_steps())}).")
            state, _ = checkpoints.restore_checkpoint(manager, step)
    finally:
        checkpoints.close_manager(manager)
    return model, jax.device_get(state["ema_params"]), step, meta


def log_metrics(workdir: str, step: int, scalars: dict, total_steps: int) -> None:
    """One console line per log step, and the same figures appended to workdir/metrics.jsonl."""
    eta = (total_steps - step) / max(scalars["steps_per_sec"], 1e-9)
    extra = f" mfu {scalars['mfu']:.1%}" if "mfu" in scalars else ""
    print(f"step {step}/{total_steps}: loss {scalars['loss']:.4f} (mse {scalars['mse']:.4f} vb {scalars['vb']:.4f}) "
          f"grad {scalars['grad_norm']:.3f} lr {scalars['learning_rate']:.2e} | {scalars['steps_per_sec']:.2f} steps/s "
          f"{scalars['images_per_sec']:.1f} img/s{extra} | eta {eta / 60:.1f} min", flush=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")


def log_eval(workdir: str, step: int, values: dict, seconds: float) -> None:
    """Evaluation figures on the console and in workdir/metrics.jsonl (a line of their own)."""
    print(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in values.items()) + f" ({seconds:.0f}s)", flush=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")


def _flatten_config(config, prefix="") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
