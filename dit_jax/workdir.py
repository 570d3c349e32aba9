"""A training run's directory and what it holds, for training, sampling, evaluation and the
launchers alike:

  <workdir>/config.json     the config the run was started with
  <workdir>/checkpoints/    Orbax training checkpoints (dit_jax.checkpoints)
  <workdir>/metrics.jsonl   one JSON object per log or evaluation step
  <workdir>/samples/        EMA sample grids

and the two things a config needs a dataset for: its directory, and the model built for it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from dit_jax import checkpoints, files, models
from dit_jax.data import embedded, latents

RUN_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def save_run_config(workdir: str, config) -> None:
    files.write_atomically(
        os.path.join(workdir, RUN_CONFIG_FILE), config.to_json_best_effort(indent=1)
    )


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run was started with (workdir/config.json)."""
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{workdir} is not a training workdir (no {RUN_CONFIG_FILE}).")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def dataset_dir(config) -> str:
    """The latent dataset of `config.data.dir`; 'embedded' means the bundled MNIST set, built in
    the cache on first use (by process 0; the others wait for it)."""
    if config.data.dir == "embedded":
        size = config.data.image_size
        if not 8 <= size <= 32:
            raise ValueError(
                f"the embedded dataset holds 28px digits; config.data.image_size must "
                f"be in [8, 32], got {size}."
            )
        path = embedded.embedded_dataset_dir(size)
        if jax.process_index() == 0:
            embedded.ensure_embedded_dataset(path, image_size=size)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dit_jax.embedded_dataset")
        return path
    if not config.data.dir:
        raise ValueError(
            "config.data.dir is empty: give a latent dataset from "
            "dit_jax.data.encode, or 'embedded'."
        )
    if not os.path.isdir(config.data.dir):
        raise ValueError(
            f"dataset {config.data.dir} does not exist; encode one with "
            "python -m dit_jax.data.encode."
        )
    return config.data.dir


def model_for_dataset(config, meta: dict) -> models.DiT:
    """The DiT of `config.model` for a dataset with metadata `meta`: the size from the name and
    overrides, the latent shape and class count from the dataset."""
    h, w, c = meta["latent_shape"]
    if h != w:
        raise ValueError(f"the dataset's latents are {h}x{w}; DiT needs square inputs.")
    m = config.model
    sizes = ("depth", "hidden_size", "num_heads", "patch_size")
    if not m.name and any(m[k] is None for k in sizes):
        raise ValueError(
            "config.model.name is empty: give a model name (e.g. 'XL/2') or all of "
            "depth, hidden_size, num_heads and patch_size."
        )
    fields = dict(
        name=m.name or None,
        input_size=h,
        in_channels=c,
        num_classes=meta["num_classes"],
        block_type=m.block_type,
        class_dropout_prob=m.class_dropout_prob,
        learn_sigma=m.learn_sigma,
        dtype=jnp.dtype(m.dtype),
        remat=m.remat,
        remat_policy=m.get("remat_policy", "nothing"),
        scan_blocks=m.get("scan_blocks", False),  # runs saved before the field existed: looped
        attention=None if m.attention == "auto" else m.attention,
    )
    fields.update({k: m[k] for k in sizes if m[k] is not None})
    model = models.model_from_config(fields)
    model.check_config()
    return model


def load_ema(workdir: str, step: Optional[int] = None):
    """(model, EMA params, step, dataset metadata) of a run's latest (or given) checkpoint,
    verified against its fingerprint (the latest falls back to the previous good one). The
    checkpoints are opened read-only, so a run writing beside the reader is not disturbed."""
    config = load_run_config(workdir)
    meta = latents.read_metadata(dataset_dir(config))
    model = model_for_dataset(config, meta)
    manager = checkpoints.train_checkpoint_manager(checkpoint_dir(workdir), read_only=True)
    try:
        if step is None:  # the newest checkpoint that restores and verifies
            restored = checkpoints.restore_train_state(manager)
            if restored is None:
                raise ValueError(f"{workdir} has no checkpoint yet.")
            state, _, step = restored
        else:
            if step not in manager.all_steps():
                raise ValueError(
                    f"{workdir} has no checkpoint at step {step} "
                    f"(it has {list(manager.all_steps())})."
                )
            state, _ = checkpoints.restore_checkpoint(manager, step)
    finally:
        checkpoints.close_manager(manager)
    # a run may have switched model.scan_blocks: the EMA in the layout of the run's config
    return model, models.params_in_layout(jax.device_get(state["ema_params"]), model), step, meta


def append_metrics(workdir: str, step: int, values: dict) -> None:
    """Appends {"step": step, **values} as one line of workdir/metrics.jsonl."""
    with open(os.path.join(workdir, METRICS_FILE), "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")


def trim_metrics(workdir: str, step: int) -> None:
    """On resume from `step`: drops the metrics.jsonl lines of later steps (they are redone) and
    any line cut short by a kill, so the file reads as if the run had never stopped."""
    path = os.path.join(workdir, METRICS_FILE)
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
