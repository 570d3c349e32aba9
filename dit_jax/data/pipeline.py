"""The training input pipeline over a latent dataset (Grain, no TensorFlow).

  records (ArrayRecord, random access) -> this process's slice [p::P] -> shuffle (a new
  permutation every epoch) -> batch of global_batch / P -> per batch: pick image or flip at
  random, sample z = mean + std * eps, multiply by the dataset's scaling factor -> a global
  jax.Array [B, h, w, c] (float32) and labels [B] (int32) sharded over the mesh's batch axes.

Every random choice comes from (seed, process, batch index), so the stream is deterministic
and `get_state()`/`set_state()` resume it exactly: batch k after a restore is batch k of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dit_jax.data import latents as latents_lib


class LatentRecords:
    """Random-access source of (mean, logvar, label) from the dataset's shards; parses the
    TFDS tf.Example records directly with numpy (no TensorFlow, no per-feature decoders)."""

    def __init__(self, data_dir: str, split: str = "train"):
        from array_record.python.array_record_data_source import ArrayRecordDataSource
        from tensorflow_datasets.proto import tf_example_pb2
        self.meta = latents_lib.read_metadata(data_dir)
        self._example = tf_example_pb2.Example
        self._shape = (2,) + tuple(self.meta["latent_shape"])
        self._source = ArrayRecordDataSource(latents_lib.shard_files(data_dir, split))

    def __len__(self) -> int:
        return len(self._source)

    def _parse(self, record: bytes) -> dict:
        feature = self._example.FromString(record).features.feature
        arr = lambda k: np.frombuffer(feature[k].bytes_list.value[0], np.float16).reshape(self._shape)
        return {"mean": arr("mean"), "logvar": arr("logvar"), "label": np.int32(feature["label"].int64_list.value[0])}

    def __getitem__(self, index: int) -> dict:
        return self._parse(self._source[index])

    def __getitems__(self, indices) -> list:
        return [self._parse(r) for r in self._source.__getitems__(list(indices))]

    def read_batch(self, indices) -> dict:
        """Stacked {'mean', 'logvar': [n, 2, h, w, c] float16, 'label': [n] int32}; one
        parallel ArrayRecord read for the whole batch."""
        examples = self.__getitems__([int(i) for i in indices])
        return {k: np.stack([e[k] for e in examples]) for k in ("mean", "logvar", "label")}


@dataclasses.dataclass(frozen=True)
class PosteriorSampler:
    """Batch transform: choose image/flip, sample the posterior, scale. Seeded per batch."""
    seed: int
    process_index: int
    scaling_factor: float
    random_flip: bool = True
    sample_posterior: bool = True

    def __call__(self, index: int, batch: dict) -> dict:
        rng = np.random.default_rng([self.seed, self.process_index, index])
        n = batch["label"].shape[0]
        view = rng.integers(0, 2, n) if self.random_flip else np.zeros(n, np.int64)
        rows = np.arange(n)
        mean = batch["mean"][rows, view].astype(np.float32)
        if self.sample_posterior:
            std = np.exp(0.5 * batch["logvar"][rows, view].astype(np.float32))
            mean = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        return {"latents": mean * np.float32(self.scaling_factor), "labels": batch["label"].astype(np.int32)}


def make_dataset(data_dir: str, *, global_batch_size: int, seed: int, split: str = "train",
                 process_index: int = 0, process_count: int = 1, random_flip: bool = True,
                 sample_posterior: bool = True):
    """An infinite grain.MapDataset of this process's batches (dicts of numpy arrays)."""
    import grain
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by the {process_count} processes.")
    local_batch = global_batch_size // process_count
    records = LatentRecords(data_dir, split)
    # Shuffle and batch *indices*; each batch is then read with one parallel ArrayRecord call.
    ds = grain.MapDataset.range(len(records))[process_index::process_count]
    if len(ds) < local_batch:
        raise ValueError(f"{data_dir}: this process's share of '{split}' has {len(ds)} examples, fewer than "
                         f"its batch of {local_batch}.")
    sampler = PosteriorSampler(seed, process_index, float(records.meta["scaling_factor"]), random_flip,
                               sample_posterior)
    return (ds.shuffle(seed=seed).repeat()
            .batch(local_batch, drop_remainder=True)
            .map_with_index(lambda i, idx: sampler(i, records.read_batch(idx)))), records.meta


class InputPipeline:
    """Iterator of global batches {'latents': [B, h, w, c], 'labels': [B]}.

    With `sharding` (a NamedSharding whose first axis spans the batch), batches are global
    `jax.Array`s assembled from each process's share; without it, numpy arrays.
    """

    def __init__(self, data_dir: str, *, global_batch_size: int, seed: int, split: str = "train",
                 sharding=None, random_flip: bool = True, sample_posterior: bool = True,
                 num_threads: int = 2, prefetch: int = 4, process_index: Optional[int] = None,
                 process_count: Optional[int] = None):
        import grain
        import jax
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.dataset, self.meta = make_dataset(
            data_dir, global_batch_size=global_batch_size, seed=seed, split=split,
            process_index=self.process_index, process_count=self.process_count,
            random_flip=random_flip, sample_posterior=sample_posterior)
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._iterator = iter(self.dataset.to_iter_dataset(options))
        self.sharding = sharding

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.meta["latent_shape"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        if self.sharding is None:
            return batch
        import jax
        return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream (store it in the training checkpoint)."""
        return dict(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops prefetch threads."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
