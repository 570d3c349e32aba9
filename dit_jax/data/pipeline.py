"""The training input pipeline over a latent dataset (Grain, no TensorFlow).

  every record index -> a global permutation per epoch (from seed and epoch) -> the stream of
  every epoch one after the other -> global batch k = stream positions [k*B, (k+1)*B) -> this
  process's rows of it (the rows its devices hold under the batch sharding) -> one parallel
  ArrayRecord read -> per example: pick image or flip, sample z = mean + std * eps, multiply
  by the dataset's scaling factor -> a global jax.Array [B, h, w, c] (float32) and labels [B]
  (int32) sharded over the mesh's batch axes.

Global batch k holds the same examples, flips and posterior noise whatever the number of
processes reading it: the order depends only on (seed, epoch), and each example's random
choices only on (seed, its global stream position). No process reads another's rows. The
iterator state is the global batch index (JSON), valid for any process count: batch k after
a restore on Q processes is batch k of an uninterrupted run on P.
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
        arr = lambda k: np.frombuffer(feature[k].bytes_list.value[0], np.float16).reshape(
            self._shape
        )
        return {
            "mean": arr("mean"),
            "logvar": arr("logvar"),
            "label": np.int32(feature["label"].int64_list.value[0]),
        }

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
    """Batch transform: choose image/flip, sample the posterior, scale. Each example's choices
    come from its own generator seeded by (seed, its global stream position)."""

    seed: int
    scaling_factor: float
    random_flip: bool = True
    sample_posterior: bool = True

    def __call__(self, positions: np.ndarray, batch: dict) -> dict:
        n = batch["label"].shape[0]
        shape = batch["mean"].shape[2:]
        view = np.zeros(n, np.int64)
        eps = np.empty((n,) + shape, np.float32) if self.sample_posterior else None
        if self.random_flip or self.sample_posterior:
            for i, position in enumerate(positions):
                rng = np.random.default_rng([self.seed, int(position)])
                if self.random_flip:
                    view[i] = rng.integers(0, 2)
                if self.sample_posterior:
                    rng.standard_normal(out=eps[i], dtype=np.float32)
        rows = np.arange(n)
        mean = batch["mean"][rows, view].astype(np.float32)
        if self.sample_posterior:
            std = np.exp(0.5 * batch["logvar"][rows, view].astype(np.float32))
            mean = mean + std * eps
        return {
            "latents": mean * np.float32(self.scaling_factor),
            "labels": batch["label"].astype(np.int32),
        }


def even_rows(global_batch_size: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Rows [p*B/P, (p+1)*B/P) of a global batch: process p's share when processes hold
    contiguous equal slices (what `process_rows` finds for the usual meshes)."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch {global_batch_size} is not divisible by the {process_count} processes."
        )
    n = global_batch_size // process_count
    return np.arange(process_index * n, (process_index + 1) * n)


def process_rows(sharding, global_batch_size: int) -> np.ndarray:
    """The rows of a global batch this process's devices hold under `sharding` (sorted): what
    this process reads, so that its devices' shards assemble the global array."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return np.asarray(sorted(rows), np.int64)


def make_dataset(
    data_dir: str,
    *,
    global_batch_size: int,
    seed: int,
    split: str = "train",
    rows=None,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = True,
    sample_posterior: bool = True,
):
    """An infinite grain.MapDataset whose element k is this process's rows of global batch k
    (dicts of numpy arrays). `rows` (global batch rows, e.g. from `process_rows`) defaults to
    `even_rows(global_batch_size, process_index, process_count)`."""
    import grain

    rows = (
        even_rows(global_batch_size, process_index, process_count)
        if rows is None
        else np.asarray(rows, np.int64)
    )
    if len(rows) and (rows.min() < 0 or rows.max() >= global_batch_size):
        raise ValueError(
            f"rows {rows.min()}..{rows.max()} are outside the global batch of {global_batch_size}."
        )
    records = LatentRecords(data_dir, split)
    if len(records) < global_batch_size:
        raise ValueError(
            f"{data_dir}: '{split}' has {len(records)} examples, fewer than the "
            f"global batch of {global_batch_size}."
        )
    sampler = PosteriorSampler(
        seed, float(records.meta["scaling_factor"]), random_flip, sample_posterior
    )

    def read(k, indices):
        positions = np.int64(k) * global_batch_size + rows
        return sampler(positions, records.read_batch(np.asarray(indices)[rows]))

    # Shuffle and batch *indices* (the whole global batch: ints only); each process then reads
    # its rows with one parallel ArrayRecord call.
    ds = (
        grain.MapDataset.range(len(records))
        .shuffle(seed=seed)
        .repeat()
        .batch(global_batch_size, drop_remainder=True)
        .map_with_index(read)
    )
    return ds, records.meta


class InputPipeline:
    """Iterator of global batches {'latents': [B, h, w, c], 'labels': [B]}.

    With `sharding` (a NamedSharding whose first axis spans the batch), this process reads the
    rows its devices hold and batches are global `jax.Array`s; without it, numpy arrays of the
    rows `even_rows(B, process_index, process_count)` (the whole batch for one process).
    """

    def __init__(
        self,
        data_dir: str,
        *,
        global_batch_size: int,
        seed: int,
        split: str = "train",
        sharding=None,
        random_flip: bool = True,
        sample_posterior: bool = True,
        num_threads: int = 2,
        prefetch: int = 4,
        process_index: Optional[int] = None,
        process_count: Optional[int] = None,
    ):
        if sharding is not None:
            rows = process_rows(sharding, global_batch_size)
        else:
            import jax

            rows = even_rows(
                global_batch_size,
                jax.process_index() if process_index is None else process_index,
                jax.process_count() if process_count is None else process_count,
            )
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.dataset, self.meta = make_dataset(
            data_dir,
            global_batch_size=global_batch_size,
            seed=seed,
            split=split,
            rows=rows,
            random_flip=random_flip,
            sample_posterior=sample_posterior,
        )
        self._options = (num_threads, prefetch)
        self.sharding = sharding
        self._iterator = None
        self._start(0)

    def _start(self, position: int) -> None:
        import grain

        self.close()
        threads, prefetch = self._options
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self._position = position
        self._iterator = iter(self.dataset[position:].to_iter_dataset(options))

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.meta["latent_shape"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._position += 1
        if self.sharding is None:
            return batch
        return {k: self._global_array(v) for k, v in batch.items()}

    def _global_array(self, local: np.ndarray):
        """The global array whose shard on each of this process's devices is its rows."""
        import jax

        shape = (self.global_batch_size,) + local.shape[1:]
        arrays, devices = [], []
        for device, index in self.sharding.addressable_devices_indices_map(shape).items():
            start, stop, _ = index[0].indices(self.global_batch_size)
            at = int(np.searchsorted(self.rows, start))
            arrays.append(local[at : at + stop - start][(slice(None),) + tuple(index[1:])])
            devices.append(device)
        return jax.make_array_from_single_device_arrays(
            shape, self.sharding, jax.device_put(arrays, devices)
        )

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream (store it in the training checkpoint): the
        next global batch, valid for any number of processes."""
        return {
            "global_batch": self._position,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
        }

    def set_state(self, state: dict) -> None:
        if "global_batch" not in state:  # an older pipeline's per-process Grain state
            print(
                f"note: the checkpoint's data position {state} is from an older input pipeline; "
                "going on from the same batch index with the new global order"
            )
            state = {"global_batch": int(state.get("next_index", 0))}
        if state.get("global_batch_size", self.global_batch_size) != self.global_batch_size:
            raise ValueError(
                f"the checkpoint's data position is in global batches of "
                f"{state['global_batch_size']}, this run's batch is "
                f"{self.global_batch_size}; resume with the same batch_size."
            )
        self._start(int(state["global_batch"]))

    def close(self) -> None:
        """Stops prefetch threads."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
