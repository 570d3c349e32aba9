"""Training checkpoints (Orbax CheckpointManager): the train state, the data iterator state and
a fingerprint of both, saved asynchronously and verified on restore. A step that fails to
restore or verify is reported and the previous one is tried; with `set_aside_bad` the failed
steps are moved aside so that training can write them again.

Reading official or converted DiT weights is elsewhere: `state_dicts` (files to state dicts),
`param_mapping` (official names <-> Flax parameters) and `weights` (parameter checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import traceback
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dit_jax import models
from dit_jax.state_dicts import CheckpointError


def train_checkpoint_manager(directory: str, config=None, *, read_only: bool = False):
    """Async Orbax manager keeping the last `config.keep_checkpoints` steps plus every
    `config.keep_every_steps`-th; leftovers of interrupted saves are removed in the background
    from the start. `read_only` (for readers such as sampling, which may run beside training):
    never writes, deletes or cleans anything. Close it with `close_manager`."""
    if read_only:
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, cleanup_tmp_directories=False
        )
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            keep_period=config.keep_every_steps or None,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            create=True,
        )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def close_manager(manager) -> None:
    """Waits for pending saves and for the start-up clean-up of interrupted saves (Orbax itself
    waits for that only at the next save, so a run stopping before one would exit with it still
    running), then closes the manager."""
    wait_for_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_for_cleanup is not None:
        try:
            wait_for_cleanup()
        except Exception:  # a failed clean-up of leftovers must not hide why the run stopped
            pass
    manager.close()


FINGERPRINT_ITEM = "fingerprint"


def _key_name(key) -> str:
    """A key-path entry as a plain name, the same for a TrainState field and the dict key
    Orbax restores it under (and for a tuple index and its restored list index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def state_fingerprint(state, data_state: Optional[dict] = None) -> dict:
    """{"state": {leaf path: [two uint32 digests]}, "data": sha256 of the data state}: saved
    with every training checkpoint and checked on restore, so a checkpoint whose bytes changed
    after it was written (a garbled or half-overwritten file) is never loaded silently."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    names = ["/".join(_key_name(k) for k in path) for path, _ in flat]
    digests = jax.device_get(_digest_leaves([leaf for _, leaf in flat]))
    out = {"state": {n: [int(v) for v in np.asarray(d)] for n, d in zip(names, digests)}}
    if data_state is not None:
        out["data"] = hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()
    return out


def _digest_leaves(leaves) -> list[np.ndarray]:
    """[2] uint32 digests of every leaf, computed on the host. A leaf this process holds whole
    (fully addressable, or replicated: a local copy) is digested alone; a leaf sharded over
    several processes is digested shard by shard (each shard once, at its global element
    indices) and the processes' partial sums are added in one gather that every process joins,
    in the same order: no device program per leaf runs beside the training step's (on CPU
    several such programs in flight could meet their cross-process collectives in different
    orders and deadlock)."""
    out: list = []
    partial: list[tuple[int, np.ndarray]] = []
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            out.append(_leaf_digest_host(np.asarray(jax.device_get(leaf))))
        elif leaf.sharding.is_fully_replicated:
            out.append(_leaf_digest_host(np.asarray(leaf.addressable_data(0))))
        else:
            sums = np.zeros(2, np.uint64)
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:  # every element counted once over all processes
                    data = np.asarray(shard.data)
                    sums += _leaf_digest_host(data, _flat_index(leaf.shape, shard.index, data))
            partial.append((len(out), (sums % 2**32).astype(np.uint32)))
            out.append(None)
    if partial:  # the same leaves on every process: every process gathers once
        gathered = multihost_utils.process_allgather(np.stack([p for _, p in partial]))
        totals = (np.asarray(gathered, np.uint64).reshape(-1, len(partial), 2).sum(0)) % 2**32
        for (i, _), total in zip(partial, totals.astype(np.uint32)):
            out[i] = total
    return out


def _flat_index(shape: tuple, index: tuple, data: np.ndarray) -> np.ndarray:
    """Row-major flat indices (in the whole array of `shape`) of the shard at `index` (a tuple
    of slices), in the layout `_leaf_digest_host` digests (8-byte values: a trailing 2)."""
    ranges = [np.arange(*sl.indices(dim)) for sl, dim in zip(index, shape)]
    full = tuple(shape)
    if data.dtype.itemsize == 8:
        ranges.append(np.arange(2))
        full = full + (2,)
    if not ranges:
        return np.zeros((), np.uint32)
    return np.ravel_multi_index(np.ix_(*ranges), full).astype(np.uint32)


def _leaf_digest_host(x: np.ndarray, index: Optional[np.ndarray] = None) -> np.ndarray:
    """Two uint32 sums of a leaf's raw bits, each element weighted by an odd hash of its flat
    index (`index`: the elements' indices in the whole leaf, default 0..size-1). Wrapping
    integer sums do not depend on the order of summation (so shards may be summed apart and
    added), and changing any one element changes both sums."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if x.dtype.itemsize == 8:
        u = x.view(np.uint32).reshape(*x.shape, 2)
    else:
        u = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
    u = u.astype(np.uint32)
    if index is None:
        index = np.arange(u.size, dtype=np.uint64).astype(np.uint32).reshape(u.shape)

    def weight(h):
        with np.errstate(over="ignore"):
            h = h * np.uint32(0x9E3779B1)
            h = h ^ (h >> np.uint32(16))
            h = h * np.uint32(0x85EBCA6B)
            return (h ^ (h >> np.uint32(13))) | np.uint32(1)

    with np.errstate(over="ignore"):
        return np.stack(
            [
                np.sum(u * weight(index), dtype=np.uint32),
                np.sum(u * weight(index ^ np.uint32(0x5BD1E995)), dtype=np.uint32),
            ]
        )


def save_train_state(manager, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves the train state (params, EMA, optimizer, step, RNG), the data iterator state and
    their fingerprint (checked by `restore_checkpoint`)."""
    fingerprint = {"step": int(step), **state_fingerprint(state, data_state)}
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            **{FINGERPRINT_ITEM: ocp.args.JsonSave(fingerprint)},
        ),
        force=force,
    )


def _step_dir(manager, step: int):
    """The step's directory as an etils Path (local or cloud storage)."""
    return manager.directory / str(step)


def _is_late_callback_to_closed_loop(args) -> bool:
    """An exception of a TensorStore read that completed after Orbax's restore had already
    failed on another read and closed its asyncio loop: `call_soon_threadsafe` on the closed loop."""
    if args.exc_type is not RuntimeError or str(args.exc_value) != "Event loop is closed":
        return False
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(args.exc_traceback)]
    return "call_soon_threadsafe" in frames


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's 'exception was never retrieved' reports of Orbax shard reads that failed
    in the same restore as the one reported (a gather of reads whose first failure was raised;
    the others are logged, with tracebacks, whenever the garbage collector meets them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "exception was never retrieved" in message
            and "Encountered error while reading array index" in message
        )


def _drop_late_callbacks_to_closed_loops() -> None:
    """Installs (once) an unraisable-exception hook that drops `_is_late_callback_to_closed_loop`
    reports, and an asyncio log filter that drops unretrieved read errors of the same failed
    restore, which would otherwise print dozens of harmless tracebacks after it. Every other
    unraisable exception goes to the hook that was there before; other asyncio logs pass."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadErrors) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadErrors())
    previous = sys.unraisablehook
    if getattr(previous, "_dit_jax_filter", False):
        return

    def hook(args):
        if not _is_late_callback_to_closed_loop(args):
            previous(args)

    hook._dit_jax_filter = True
    sys.unraisablehook = hook


def saved_block_layout(manager) -> Optional[bool]:
    """Whether the newest checkpoint's parameters have the scanned block layout (`blocks`,
    True) or the looped one (`blocks_0` ..., False); None without a readable checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    try:
        metadata = ocp.StandardCheckpointer().metadata(str(_step_dir(manager, step) / "state"))
    except Exception:  # noqa: BLE001  (a damaged newest checkpoint: the restore reports it)
        return None
    return models.block_layout(getattr(metadata, "item_metadata", metadata).get("params", {}))


def _local_target(state_dir, where: str):
    """The saved tree as ShapeDtypeStructs on this process's first device: readers (sampling,
    tests) load a checkpoint whatever devices or processes wrote it."""
    try:
        metadata = ocp.StandardCheckpointer().metadata(str(state_dir))
    except Exception as e:  # a missing or damaged metadata file
        raise CheckpointError(
            f"{where} cannot be restored ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from None
    tree = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
    )


def restore_checkpoint(manager, step: int, abstract_state=None, shardings=None, log=print):
    """(state, data_state) of training checkpoint `step`, placed as `abstract_state` with
    `shardings` (or as saved, when None) and verified against the fingerprint saved with it.
    Raises CheckpointError naming the step and what is wrong with it."""
    where = f"checkpoint step {step} in {manager.directory}"
    if abstract_state is not None:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            shardings,
        )
    else:
        target = _local_target(_step_dir(manager, step) / "state", where)
    items = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    has_fingerprint = (_step_dir(manager, step) / FINGERPRINT_ITEM).exists()
    if has_fingerprint:
        items[FINGERPRINT_ITEM] = ocp.args.JsonRestore()
    _drop_late_callbacks_to_closed_loops()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax/TensorStore raise many types for missing or damaged files
        while (e.__cause__ or e.__context__) is not None:  # the innermost error names the file
            e = e.__cause__ or e.__context__
        message = " ".join(str(e).split()).split(" See full TensorStore details")[0]
        raise CheckpointError(
            f"{where} cannot be restored ({type(e).__name__}: {message[:300]})"
        ) from None
    if not has_fingerprint:
        log(
            f"warning: {where} has no fingerprint (written by an older version); its contents are not verified"
        )
        return restored["state"], restored["data"]
    saved = restored[FINGERPRINT_ITEM]
    got = {"step": int(step), **state_fingerprint(restored["state"], restored["data"])}
    if saved != got:
        wrong = sorted(
            k
            for k in set(saved.get("state", {})) | set(got["state"])
            if saved.get("state", {}).get(k) != got["state"].get(k)
        )
        if saved.get("data") != got.get("data"):
            wrong.append("the data iterator state")
        if saved.get("step") != step:
            wrong.append(f"the step (saved as {saved.get('step')})")
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise CheckpointError(
            f"{where} is corrupt: its contents do not match the fingerprint written with it "
            f"({shown})"
        )
    return restored["state"], restored["data"]


def restore_train_state(
    manager, abstract_state=None, shardings=None, log=print, *, set_aside_bad: bool = False
):
    """(state, data_state, step) from the newest checkpoint that restores and verifies, or None
    if there is none. A checkpoint that fails is reported by step and the previous one is
    tried; nothing is taken from a checkpoint that fails. With `set_aside_bad`, failed steps
    newer than the one restored are moved to `<checkpoints>.unusable/` (so that training can
    write those steps again). If every checkpoint fails, CheckpointError: none is touched."""
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data = restore_checkpoint(manager, step, abstract_state, shardings, log=log)
        except CheckpointError as e:
            log(f"{e}; trying the previous one")
            failures.append(step)
            continue
        if failures and set_aside_bad:
            _set_aside(manager, failures, log)
        return state, data, step
    if failures:
        raise CheckpointError(
            f"none of the checkpoints in {manager.directory} (steps "
            f"{', '.join(map(str, sorted(failures)))}) could be restored; they were left as they "
            "are. Move them away to start over, or restore a backup."
        )
    return None


def _set_aside(manager, steps, log) -> None:
    if jax.process_index() == 0:
        root = manager.directory.parent / (manager.directory.name + ".unusable")
        root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            dest = root / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
            _step_dir(manager, step).rename(dest)
            log(f"moved the unusable checkpoint step {step} to {dest}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dit_jax.set_aside_checkpoints")
    manager.reload()
