"""Sample-quality metrics as the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py)
computes them, and its reference-batch .npz files.

  FID / sFID         Frechet distance of Inception pool / spatial feature statistics
  Inception Score    exp(E KL(p(y|x) || p(y))) over splits of 5000 samples, 1008-way softmax
  precision, recall  k-NN manifold estimates (Kynkaanniemi et al. 2019), k = 3

Features are [N, D] arrays (rows are images); FID statistics are (mu float32 [D], sigma
float64 [D, D]). Pairwise distances for precision/recall run in JAX in blocks, so 50k x 50k
fits in memory; the rest is numpy/scipy on the host.

A reference batch .npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz) holds `arr_0` uint8 images
[N, H, W, 3] (NHWC RGB) and optionally `mu`, `sigma` (pool) and `mu_s`, `sigma_s` (spatial)
statistics of the whole dataset; a sample batch .npz holds `arr_0` only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import time
import warnings
import zipfile
from typing import Iterable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from dit_jax.data import sources

IS_SPLIT_SIZE = 5000
NEAREST_K = 3


# ----------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureStatistics:
    """Mean (float32 [D]) and covariance (float64 [D, D], N - 1 normalised) of features."""

    mu: np.ndarray
    sigma: np.ndarray

    def frechet_distance(
        self, other: "FeatureStatistics", eps: float = 1e-6, method: str = "sqrtm"
    ) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps, method)


def compute_statistics(features: np.ndarray) -> FeatureStatistics:
    """ADM's statistics of features [N, D]: np.mean (in the features' dtype, float32 for
    Inception features) and np.cov(rowvar=False) (float64)."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need features [N >= 2, D], got shape {features.shape}.")
    return FeatureStatistics(np.mean(features, axis=0), np.cov(features, rowvar=False))


class StatisticsAccumulator:
    """Mean and covariance of a stream of feature batches [b, D], accumulated in float64
    around the first batch's mean (so no catastrophic cancellation), for datasets whose
    features do not fit in memory. Equals compute_statistics up to float64 rounding."""

    def __init__(self):
        self.count, self._shift, self._sum, self._outer = 0, None, None, None

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}.")
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self._shift
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        self.count += len(x)

    def statistics(self) -> FeatureStatistics:
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 feature vectors, got {self.count}.")
        mean = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return FeatureStatistics((mean + self._shift).astype(np.float32), sigma)


FID_METHODS = ("sqrtm", "eigh")


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """|mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr sqrtm(S1 S2).

    method 'sqrtm' is ADM's computation: scipy.linalg.sqrtm(S1 S2); if that is not finite, eps
    is added to both diagonals and it is retried; a non-negligible imaginary part of the
    diagonal is an error, otherwise the real part is used. It takes about a minute for
    2048 x 2048 on a small CPU. method 'eigh' computes the same trace from symmetric
    eigendecompositions, Tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), several times faster
    and equal to 'sqrtm' to about 1e-7 relative on well-conditioned statistics."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}; both must come from the same features (pool: 2048, spatial: 2023)."
        )
    if method not in FID_METHODS:
        raise ValueError(f"FID method must be one of {FID_METHODS}, got {method!r}.")
    diff = mu1 - mu2
    if method == "eigh":
        trace_covmean = _trace_sqrt_product(
            np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
        )
    else:
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(
                    f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}."
                )
            covmean = covmean.real
        trace_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm without its deprecated `disp` argument (same result as ADM's disp=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        result = linalg.sqrtm(matrix)
    return result[0] if isinstance(result, tuple) else result


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrtm(S1 S2) for symmetric PSD S1, S2: the eigenvalues of S1 S2 are those of the
    symmetric A S2 A with A = S1^1/2 (negative rounding noise clipped to 0)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(eigenvalues, 0, None))))


# ----------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of logits [N, 1008] (pool features @ the softmax/logits weights,
    no bias): p = softmax(logits); per consecutive split of `split_size` rows,
    exp(mean_i sum_y p_iy (log p_iy - log mean_i p_iy)); the mean over splits (10 splits
    for 50k samples). The softmax is taken in float64, where ADM's float32 one can underflow
    to 0 (and give NaN); 0 log 0 counts as 0."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or not len(logits):
        raise ValueError(
            f"inception_score needs logits [N >= 1, classes], got shape {logits.shape}."
        )
    z = logits - logits.max(axis=1, keepdims=True)
    preds = np.exp(z)
    preds /= preds.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds, squared euclidean distances, blocks in JAX)
# ----------------------------------------------------------------------------------------


def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """[a, D], [b, D] -> [a, b]: max(|u|^2 - 2 u.v + |v|^2, 0), float32."""
    norm_u = jnp.sum(u * u, axis=1)[:, None]
    norm_v = jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(
        norm_u - 2 * jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST) + norm_v, 0.0
    )


@functools.partial(jax.jit, static_argnums=(4,))
def _nearest_update(
    best: jax.Array, rows: jax.Array, cols: jax.Array, num_cols: jax.Array, k: int
) -> jax.Array:
    """best [r, k+1] smallest distances so far, merged with the distances to the first
    num_cols rows of `cols` (the rest is padding)."""
    d = _squared_distances(rows, cols)
    d = jnp.where(jnp.arange(cols.shape[0])[None, :] < num_cols, d, jnp.inf)
    merged = jnp.concatenate([best, d], axis=1)
    return -jax.lax.top_k(-merged, k + 1)[0]


@jax.jit
def _inside(rows: jax.Array, row_radii: jax.Array, cols: jax.Array, col_radii: jax.Array):
    """(rows inside some col's ball [r], cols inside some row's ball [c]); padded entries have
    radius -inf, so nothing is inside them."""
    d = _squared_distances(rows, cols)
    return jnp.any(d <= col_radii[None, :], axis=1), jnp.any(d <= row_radii[:, None], axis=0)


def _blocks(features: np.ndarray, size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, count, block padded with zeros to `size` rows) over the rows of features."""
    for start in range(0, len(features), size):
        block = features[start : start + size]
        count = len(block)
        if count < size:
            block = np.concatenate(
                [block, np.zeros((size - count, features.shape[1]), block.dtype)]
            )
        yield start, count, block


def _block_size(n: int, block_size: int) -> int:
    return max(1, min(block_size, n))


def manifold_radii(features: np.ndarray, k: int = NEAREST_K, block_size: int = 4096) -> np.ndarray:
    """float32 [N]: the squared distance from each feature vector [N, D] to its k-th nearest
    neighbour (itself excluded; ADM: np.partition of the distance row at k)."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) <= k:
        raise ValueError(f"manifold radii need features [N > {k}, D], got shape {features.shape}.")
    size = _block_size(len(features), block_size)
    radii = np.empty(len(features), np.float32)
    for start, count, rows in _blocks(features, size):
        best = jnp.full((size, k + 1), jnp.inf, jnp.float32)
        for _, num_cols, cols in _blocks(features, size):
            best = _nearest_update(best, rows, cols, num_cols, k)
        radii[start : start + count] = np.asarray(best[:count, k])
    return radii


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    k: int = NEAREST_K,
    block_size: int = 4096,
) -> tuple[float, float]:
    """(precision, recall) as ADM: precision = fraction of samples within the k-NN ball of some
    reference; recall = fraction of references within the k-NN ball of some sample.
    Features [N, D]; distances are squared euclidean in float32 (ADM: float16, then float32
    if that overflows)."""
    ref = np.asarray(ref_features, np.float32)
    sample = np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(
            f"precision/recall need features [N, D] with the same D, got {ref.shape} and {sample.shape}."
        )
    ref_radii = manifold_radii(ref, k, block_size)
    sample_radii = manifold_radii(sample, k, block_size)
    ref_in = np.zeros(len(ref), bool)
    sample_in = np.zeros(len(sample), bool)
    ref_size, sample_size = _block_size(len(ref), block_size), _block_size(len(sample), block_size)
    pad = lambda r, size: np.concatenate([r, np.full(size - len(r), -np.inf, np.float32)])
    for r0, rn, rows in _blocks(ref, ref_size):
        rows_radii = pad(ref_radii[r0 : r0 + rn], ref_size)
        for c0, cn, cols in _blocks(sample, sample_size):
            a, b = _inside(rows, rows_radii, cols, pad(sample_radii[c0 : c0 + cn], sample_size))
            ref_in[r0 : r0 + rn] |= np.asarray(a)[:rn]
            sample_in[c0 : c0 + cn] |= np.asarray(b)[:cn]
    return float(np.mean(sample_in)), float(np.mean(ref_in))


# ----------------------------------------------------------------------------------------
# All of ADM's metrics
# ----------------------------------------------------------------------------------------


def evaluate_features(
    sample: dict,
    ref: Optional[dict] = None,
    *,
    ref_stats: Optional[FeatureStatistics] = None,
    ref_spatial_stats: Optional[FeatureStatistics] = None,
    sample_stats: Optional[FeatureStatistics] = None,
    sample_spatial_stats: Optional[FeatureStatistics] = None,
    k: int = NEAREST_K,
    block_size: int = 4096,
    fid_method: str = "sqrtm",
) -> dict:
    """ADM's evaluation of Inception features ({'pool': [N, 2048], 'spatial': [N, 2023],
    optional 'logits': [N, 1008]}) of samples against a reference:
    {'inception_score' (when the samples have logits), 'fid', 'sfid', 'precision', 'recall'
    (when there are reference features)}. Precomputed statistics (a reference batch's
    mu/sigma, mu_s/sigma_s) are used instead of the features' when given, as ADM does.
    fid_method: 'sqrtm' (ADM's) or 'eigh' (faster), see frechet_distance."""
    if ref_stats is None and ref is None:
        raise ValueError("the reference needs either images (features) or precomputed statistics.")
    results = {}
    if "logits" in sample:
        results["inception_score"] = inception_score(sample["logits"])
    sample_stats = sample_stats or compute_statistics(sample["pool"])
    sample_spatial_stats = sample_spatial_stats or compute_statistics(sample["spatial"])
    ref_stats = ref_stats or compute_statistics(ref["pool"])
    ref_spatial_stats = ref_spatial_stats or compute_statistics(ref["spatial"])
    results["fid"] = sample_stats.frechet_distance(ref_stats, method=fid_method)
    results["sfid"] = sample_spatial_stats.frechet_distance(ref_spatial_stats, method=fid_method)
    if ref is not None:
        results["precision"], results["recall"] = precision_recall(
            ref["pool"], sample["pool"], k, block_size
        )
    return results


# ----------------------------------------------------------------------------------------
# Reference / sample batch files
# ----------------------------------------------------------------------------------------

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass
class ReferenceBatch:
    """An ADM-style batch file: images (`arr_0`, uint8 [N, H, W, 3], read lazily) and optional
    precomputed pool (`mu`, `sigma`) and spatial (`mu_s`, `sigma_s`) statistics."""

    path: str
    image_shape: Optional[tuple] = None  # shape of arr_0, None if absent
    stats: Optional[FeatureStatistics] = None
    spatial_stats: Optional[FeatureStatistics] = None

    @property
    def num_images(self) -> int:
        return self.image_shape[0] if self.image_shape else 0

    def iter_images(self, batch_size: int = 256) -> Iterator[np.ndarray]:
        """arr_0 in batches of uint8 [b, H, W, 3], streamed from the file."""
        if not self.image_shape:
            raise ValueError(f"{self.path} has no images (arr_0).")
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
            _read_npy_header(f, self.path)
            per_image = int(np.prod(self.image_shape[1:]))
            for start in range(0, self.image_shape[0], batch_size):
                n = min(batch_size, self.image_shape[0] - start)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(
                        f"{self.path}: arr_0 is truncated (image {start + len(data) // per_image} "
                        f"of {self.image_shape[0]})."
                    )
                yield np.frombuffer(data, np.uint8).reshape(n, *self.image_shape[1:])

    def images(self) -> np.ndarray:
        return np.concatenate(list(self.iter_images()))


def _read_npy_header(f, path: str) -> tuple:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as e:
        raise ValueError(f"{path}: arr_0 is not a valid .npy array ({e}).") from None
    if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{path}: arr_0 must be uint8 images [N, H, W, 3] (NHWC RGB, C-order), "
            f"got {dtype} {shape}{' Fortran-order' if fortran else ''}."
        )
    return shape


def read_reference_batch(path: str) -> ReferenceBatch:
    """Opens an ADM reference or sample batch .npz; images stay on disk until iterated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file.")
    with zipfile.ZipFile(path) as archive:
        names = {n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")}
        shape = None
        if "arr_0" in names:
            with archive.open("arr_0.npy") as f:
                shape = tuple(_read_npy_header(f, path))
    present = [k for k in STAT_KEYS if k in names]
    if present and len(present) != len(STAT_KEYS):
        raise ValueError(
            f"{path}: has {present} but not {[k for k in STAT_KEYS if k not in names]}; "
            "precomputed statistics need all of mu, sigma, mu_s, sigma_s."
        )
    if shape is None and not present:
        raise ValueError(
            f"{path}: has neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s); "
            f"it holds {sorted(names) or 'nothing'}."
        )
    batch = ReferenceBatch(path, shape)
    if present:
        with np.load(path, allow_pickle=False) as data:
            batch.stats = FeatureStatistics(data["mu"], data["sigma"])
            batch.spatial_stats = FeatureStatistics(data["mu_s"], data["sigma_s"])
    return batch


def write_reference_batch(
    path: str,
    images: Optional[np.ndarray] = None,
    stats: Optional[FeatureStatistics] = None,
    spatial_stats: Optional[FeatureStatistics] = None,
) -> None:
    """Writes an ADM-style .npz: arr_0 (uint8 [N, H, W, 3]) and/or mu, sigma, mu_s, sigma_s."""
    arrays = {}
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}."
            )
        arrays["arr_0"] = images
    if (stats is None) != (spatial_stats is None):
        raise ValueError("write both the pool and the spatial statistics, or neither.")
    if stats is not None:
        arrays.update(
            mu=stats.mu, sigma=stats.sigma, mu_s=spatial_stats.mu, sigma_s=spatial_stats.sigma
        )
    if not arrays:
        raise ValueError("nothing to write: give images and/or statistics.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Reference statistics from a dataset
# ----------------------------------------------------------------------------------------


def reference_from_images(
    extractor,
    images: Union[np.ndarray, Iterable[np.ndarray]],
    *,
    keep_images: int = 10_000,
    seed: int = 0,
) -> dict:
    """Statistics of a dataset for a reference batch: {'stats': pool FeatureStatistics,
    'spatial_stats': spatial FeatureStatistics, 'images': uint8 [min(N, keep_images), H, W, 3]
    (a uniformly random subset, in stream order, for precision/recall; None if keep_images
    is 0)} of images uint8 [N, H, W, 3] or an iterable of such batches, through `extractor`
    (an inception.InceptionExtractor). One streaming pass: statistics are accumulated batch
    by batch and the subset is drawn by reservoir sampling, so N can be a whole dataset.
    `write_reference_batch(path, **result)` writes it."""
    batches = [images] if isinstance(images, np.ndarray) else images
    pool, spatial = StatisticsAccumulator(), StatisticsAccumulator()
    rng = np.random.default_rng(seed)
    kept, kept_position = [], []
    seen = 0

    def sample_subset(batch):  # reservoir sampling (Algorithm R) as the batches stream past
        nonlocal seen
        batch = np.asarray(batch)
        for image in batch:
            if len(kept) < keep_images:
                kept.append(image.copy())
                kept_position.append(seen)
            else:
                j = int(rng.integers(0, seen + 1))
                if j < keep_images:
                    kept[j], kept_position[j] = image.copy(), seen
            seen += 1
        return batch

    for features in extractor.iter_features(sample_subset(b) for b in batches):
        pool.add(features["pool"])
        spatial.add(features["spatial"])
    subset = np.stack([kept[i] for i in np.argsort(kept_position)]) if kept else None
    return {"images": subset, "stats": pool.statistics(), "spatial_stats": spatial.statistics()}


def _bounded_map(fn, items: Iterable, pool: concurrent.futures.Executor, window: int) -> Iterator:
    """pool.map(fn, items) in order, with at most `window` items in flight (pool.map itself
    would submit the whole iterable at once)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def iter_source_images(
    spec: str,
    image_size: int,
    *,
    num: Optional[int] = None,
    split: str = "train",
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 16,
) -> Iterator[np.ndarray]:
    """uint8 [b, S, S, 3] batches of a dataset (`dit_jax.data.sources.open_source(spec)`:
    folder:<root>, imagenet:<manual_dir>, tfds:<name>[@data_dir], embedded), each image
    ADM-center-cropped to S = image_size and made RGB. With `num`, a uniformly random subset
    of that many images (seeded) in source order; the source must know its size. Images are
    decoded by a pool of `workers` threads; unreadable ones are skipped with a warning.
    The source is opened (and checked) before this returns."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}.")
    source = sources.open_source(spec, split)
    total = source.num_examples()
    chosen = None
    if num is not None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}.")
        if total is None:
            raise ValueError(
                f"{spec} does not know its size, so a random subset of {num} images cannot be "
                "chosen; leave out num to use every image."
            )
        if num < total:
            chosen = set(np.random.default_rng(seed).choice(total, num, replace=False).tolist())

    def examples():
        position = 0
        for unit in source.units():
            for example in source.examples(unit):
                if chosen is None or position in chosen:
                    yield example
                position += 1

    def load(example):
        try:
            return sources.center_crop_arr(example.load().convert("RGB"), image_size)
        except Exception as e:  # corrupt files: skip, as the latent encoder does
            warnings.warn(f"skipping {example.id}: {type(e).__name__}: {e}")
            return None

    def batches():
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            batch = []
            for image in _bounded_map(load, examples(), pool, 4 * workers):
                if image is not None:
                    batch.append(image)
                if len(batch) == batch_size:
                    yield np.stack(batch)
                    batch = []
            if batch:
                yield np.stack(batch)

    return batches()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [N, H, W, C]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


# ----------------------------------------------------------------------------------------
# ADM's evaluator on files (the dit_jax.evaluate command line)
# ----------------------------------------------------------------------------------------

METRIC_NAMES = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}


def evaluate_files(
    ref_path: str, sample_path: str, extractor, fid_method: str = "sqrtm", log=print
) -> dict:
    """ADM's metrics of the sample batch file against the reference batch file (see the module
    docstring); returns {'inception_score'?, 'fid', 'sfid', 'precision'?, 'recall'?}."""
    ref = read_reference_batch(ref_path)
    sample = read_reference_batch(sample_path)
    if not sample.num_images:
        raise ValueError(f"{sample_path}: a sample batch needs images (arr_0).")
    ref_features = None
    if ref.num_images:
        ref_features = _features(extractor, ref, "reference", log)
    sample_features = _features(extractor, sample, "samples", log)
    return evaluate_features(
        sample_features,
        ref_features,
        ref_stats=ref.stats,
        ref_spatial_stats=ref.spatial_stats,
        sample_stats=sample.stats,
        sample_spatial_stats=sample.spatial_stats,
        fid_method=fid_method,
    )


def _features(extractor, batch: ReferenceBatch, what: str, log) -> dict:
    start = time.perf_counter()
    features = extractor.features_of_batches(batch.iter_images(extractor.batch_size))
    seconds = time.perf_counter() - start
    log(
        f"{what}: {batch.num_images} images {batch.image_shape[1:]} from {batch.path} "
        f"({seconds:.1f}s, {batch.num_images / seconds:.1f} images/s)"
    )
    return features


def make_reference(
    output: str,
    source: str,
    extractor_factory,
    *,
    image_size: int,
    num: Optional[int],
    num_images: int,
    split: str,
    seed: int,
    batch_size: int,
) -> None:
    if num_images < 0:
        raise ValueError(f"--num_images must be >= 0, got {num_images}.")
    batches = iter_source_images(
        source, image_size, num=num, split=split, seed=seed, batch_size=batch_size
    )
    extractor = extractor_factory()
    count = 0

    def counted():
        nonlocal count
        for batch in batches:
            count += len(batch)
            yield batch

    start = time.perf_counter()
    reference = reference_from_images(extractor, counted(), keep_images=num_images, seed=seed)
    write_reference_batch(output, **reference)
    kept = 0 if reference["images"] is None else len(reference["images"])
    print(
        f"wrote {output}: statistics (mu, sigma, mu_s, sigma_s) of {count} images of {source} at "
        f"{image_size}x{image_size}, {kept} of them as arr_0 ({time.perf_counter() - start:.1f}s)"
    )
