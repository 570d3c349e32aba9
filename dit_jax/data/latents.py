"""Pre-encoded latent datasets: TFDS ArrayRecord shards of VAE posteriors.

Each example holds the posterior of the image *and* of its horizontal flip, so flip
augmentation and posterior sampling happen at training time:

  mean    float16 [2, h, w, c]   raw (unscaled) posterior means; [0] image, [1] flipped image
  logvar  float16 [2, h, w, c]   posterior log-variances (clipped to [-30, 20] by the encoder)
  label   int64                  class index
  id      text                   a stable id (relative path, archive member, row)

float16 keeps the data half the size of float32 with a relative rounding error of 2^-11
(~5e-4): for SD-VAE latents (|mean| rarely above ~30, i.e. ~5 after the 0.18215 scale) that
is ~1e-3 in scaled units, far below the noise the diffusion adds at its first step
(sqrt(1 - alpha_bar_1) = 0.01) and below typical posterior std; logvar in [-30, 20] is kept
to ~1e-2, a 0.5% error in std. bfloat16 would be 8x coarser (2^-8) for no gain in range,
which the clipped values do not need.

Layout on disk (readable by `tfds.builder_from_directory(dir)` and `tfds.data_source`):
  <dir>/dataset_info.json, features.json                  TFDS metadata (written when complete)
  <dir>/<name>-<split>.array_record-0000i-of-0000n         one shard per source unit
  <dir>/<name>-<split>.array_record-0000i-of-0000n.json    per-shard sidecar: count, skipped images
  <dir>/dit_latents.json                                   autoencoder, scale, sizes, classes
  <dir>/skipped.txt                                        every unreadable image and why
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np

from dit_jax import files
from dit_jax.data import sources as sources_lib

META_FILE = "dit_latents.json"
SKIPPED_FILE = "skipped.txt"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def shard_path(out_dir: str, name: str, split: str, index: int, count: int) -> str:
    return os.path.join(out_dir, f"{name}-{split}.array_record-{index:05d}-of-{count:05d}")


def latent_features(latent_shape: Sequence[int], class_names: Sequence[str]):
    import tensorflow_datasets as tfds

    raw = tfds.features.Encoding.BYTES
    shape = (2,) + tuple(latent_shape)
    return tfds.features.FeaturesDict(
        {
            "mean": tfds.features.Tensor(shape=shape, dtype=np.float16, encoding=raw),
            "logvar": tfds.features.Tensor(shape=shape, dtype=np.float16, encoding=raw),
            "label": tfds.features.ClassLabel(names=[str(c) for c in class_names]),
            "id": tfds.features.Text(),
        }
    )


# ----------------------------------------------------------------------------------------
# Encoding images to examples
# ----------------------------------------------------------------------------------------


def _prepare(example: sources_lib.Example, image_size: int, channels: int):
    """Loads and crops one image; returns (example, uint8 array [S, S, C]) or (example, error)."""
    try:
        image = example.load().convert("L" if channels == 1 else "RGB")
        arr = sources_lib.center_crop_arr(image, image_size)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape != (image_size, image_size, channels):
            raise ValueError(
                f"cropped to {arr.shape}, expected {(image_size, image_size, channels)}"
            )
        return example, arr
    except Exception as e:  # any unreadable/corrupt image is skipped and listed, never fatal
        return example, f"{type(e).__name__}: {e}"


def encode_examples(
    examples: Iterator[sources_lib.Example],
    autoencoder,
    image_size: int,
    *,
    batch_size: int = 64,
    skipped: Optional[list] = None,
    pool: Optional[concurrent.futures.Executor] = None,
) -> Iterator[tuple[str, dict]]:
    """Yields (id, example dict) with the posterior of each image and its flip, in source order.
    Unreadable images are appended to `skipped` as (id, reason) and not yielded."""
    channels = getattr(autoencoder, "channels", 3)
    own_pool = pool is None
    pool = pool or concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2))
    try:
        batch = []

        def flush():
            images = np.stack([arr for _, arr in batch])
            both = np.concatenate([images, images[:, :, ::-1]], axis=0)
            mean, logvar = autoencoder.encode_moments(both)
            n = len(batch)
            for i, (ex, _) in enumerate(batch):
                yield (
                    ex.id,
                    {
                        "mean": np.stack([mean[i], mean[n + i]]).astype(np.float16),
                        "logvar": np.stack([logvar[i], logvar[n + i]]).astype(np.float16),
                        "label": int(ex.label),
                        "id": ex.id,
                    },
                )
            batch.clear()

        for ex, result in pool.map(lambda e: _prepare(e, image_size, channels), examples):
            if isinstance(result, str):
                if skipped is not None:
                    skipped.append((ex.id, result))
                continue
            batch.append((ex, result))
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()
    finally:
        if own_pool:
            pool.shutdown()


# ----------------------------------------------------------------------------------------
# Resumable, sharded writing
# ----------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar over images with images/s and ETA (when the total is known)."""

    def __init__(self, total: Optional[int], desc: str):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="img",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=2.0,
            disable=None,
        )

    def update(self, n: int = 1):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def encode_dataset(
    source: sources_lib.ImageSource,
    autoencoder,
    out_dir: str,
    *,
    image_size: int,
    split: str = "train",
    name: Optional[str] = None,
    batch_size: int = 64,
    process_index: int = 0,
    process_count: int = 1,
    barrier=None,
    log=print,
) -> Optional[dict]:
    """Encodes `source` into `out_dir`, one ArrayRecord shard per source unit.

    Process p of P encodes the units u with u % P == p. A finished shard has a sidecar JSON;
    finished shards are skipped, so an interrupted run resumes where it stopped. When every
    shard is done, process 0 writes the TFDS metadata and returns the dataset summary
    (None if shards are still missing). `barrier()` (multi-host) is called before that.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    name = name or source.name
    os.makedirs(out_dir, exist_ok=True)
    latent_shape = autoencoder.latent_shape(image_size)
    features = latent_features(latent_shape, source.class_names)
    units = source.units()
    n_units = len(units)
    mine = [u for u in range(n_units) if u % process_count == process_index]
    todo = [
        u
        for u in mine
        if not os.path.isfile(shard_path(out_dir, name, split, u, n_units) + ".json")
    ]
    if len(todo) < len(mine):
        log(
            f"resuming: {len(mine) - len(todo)} of {len(mine)} shards of this process are already done"
        )
    total = source.num_examples()
    progress = Progress(
        total and int(total * len(todo) / max(n_units, 1)), f"encode {name}/{split}"
    )
    from array_record.python.array_record_module import ArrayRecordWriter

    start = time.time()
    encoded = 0
    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        for u in todo:
            path = shard_path(out_dir, name, split, u, n_units)
            skipped: list = []
            ids: list = []
            writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
            try:
                for ex_id, example in encode_examples(
                    source.examples(units[u]),
                    autoencoder,
                    image_size,
                    batch_size=batch_size,
                    skipped=skipped,
                    pool=pool,
                ):
                    writer.write(features.serialize_example(example))
                    ids.append(ex_id)
                    progress.update()
            finally:
                writer.close()
            progress.update(len(skipped))
            os.replace(path + ".tmp", path)
            sidecar = {
                "count": len(ids),
                "num_bytes": os.path.getsize(path),
                "skipped": skipped,
                "first_id": ids[0] if ids else None,
                "last_id": ids[-1] if ids else None,
            }
            files.write_atomically(path + ".json", json.dumps(sidecar))
            encoded += len(ids)
    progress.close()
    if todo:
        rate = encoded / max(time.time() - start, 1e-9)
        log(f"encoded {encoded} images into {len(todo)} shards ({rate:.1f} images/s)")
    if barrier is not None:
        barrier()
    if process_index != 0:
        return None
    return finalize_dataset(
        out_dir,
        name=name,
        split=split,
        n_units=n_units,
        features=features,
        meta=dict(
            autoencoder=autoencoder.spec,
            scaling_factor=autoencoder.scaling_factor,
            image_size=image_size,
            latent_shape=list(latent_shape),
            num_classes=len(source.class_names),
            class_names=list(source.class_names),
            name=name,
        ),
        log=log,
    )


def finalize_dataset(
    out_dir: str, *, name: str, split: str, n_units: int, features, meta: dict, log=print
) -> Optional[dict]:
    """Writes TFDS metadata once every shard has its sidecar; returns the summary."""
    import tensorflow_datasets as tfds

    sidecars = []
    for u in range(n_units):
        path = shard_path(out_dir, name, split, u, n_units) + ".json"
        if not os.path.isfile(path):
            log(
                f"{n_units - u} or fewer shards still to encode (first missing: {os.path.basename(path)}); "
                "run the remaining processes, then this again"
            )
            return None
        with open(path) as f:
            sidecars.append(json.load(f))
    lengths = [s["count"] for s in sidecars]
    skipped = [(i, r) for s in sidecars for i, r in s["skipped"]]
    if sum(lengths) == 0:
        raise ValueError(
            f"no image could be read from the source ({len(skipped)} failed); see {SKIPPED_FILE}."
        )
    template = tfds.core.ShardedFileTemplate(
        data_dir=out_dir,
        template=FILE_TEMPLATE,
        dataset_name=name,
        split=split,
        filetype_suffix="array_record",
    )
    split_info = tfds.core.SplitInfo(
        name=split,
        shard_lengths=lengths,
        num_bytes=sum(s["num_bytes"] for s in sidecars),
        filename_template=template,
    )
    existing = _existing_splits(out_dir, exclude=split)
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir,
        features=features,
        split_infos=existing + [split_info],
        filename_template=FILE_TEMPLATE,
        check_data=False,
        description="DiT latent posteriors (image and flip)",
    )
    meta_path = os.path.join(out_dir, META_FILE)
    old = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
    splits = {
        **old.get("splits", {}),
        split: {"num_examples": sum(lengths), "num_skipped": len(skipped)},
    }
    summary = {**meta, "splits": splits}
    # The skipped list first (this split's lines replaced, so a re-run adds none twice), the
    # metadata last: it marks the dataset complete, so it is written whole or not at all.
    skipped_path = os.path.join(out_dir, SKIPPED_FILE)
    lines = []
    if os.path.isfile(skipped_path):
        with open(skipped_path) as f:
            lines = [l for l in f if l.strip() and not l.startswith(f"{split}\t")]
    lines += [f"{split}\t{i}\t{reason}\n" for i, reason in skipped]
    files.write_atomically(skipped_path, "".join(lines))
    files.write_atomically(meta_path, json.dumps(summary, indent=1))
    log(
        f"{out_dir}: {split} has {sum(lengths)} examples in {n_units} shards; {len(skipped)} images skipped"
        + (f" (listed in {SKIPPED_FILE})" if skipped else "")
    )
    return summary


def _existing_splits(out_dir: str, exclude: str) -> list:
    """SplitInfos already recorded in the directory (so encoding 'validation' keeps 'train')."""
    import tensorflow_datasets as tfds

    if not os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
        return []
    try:
        info = tfds.builder_from_directory(out_dir).info
    except Exception:
        return []
    return [s for name, s in info.splits.items() if name != exclude]


def read_metadata(data_dir: str) -> dict:
    path = os.path.join(data_dir, META_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"{data_dir} is not a complete latent dataset (no {META_FILE}); encode it first "
            "with python -m dit_jax.data.encode."
        )
    with open(path) as f:
        return json.load(f)


def shard_files(data_dir: str, split: str = "train") -> list[str]:
    meta = read_metadata(data_dir)
    shards = sorted(
        glob.glob(os.path.join(data_dir, f"{meta['name']}-{split}.array_record-*-of-*[0-9]"))
    )
    if not shards:
        raise ValueError(
            f"{data_dir} has no '{split}' shards (splits: {sorted(meta.get('splits', {}))})."
        )
    return shards
