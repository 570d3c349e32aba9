"""FID of the EMA model during training: every `config.eval.every_steps`, sample
`config.eval.num_samples` images (uniform random labels, CFG), extract features, and compare
their statistics with the reference's.

Features (`config.eval.features`):
  inception  the ADM Inception-V3 pool features: FID proper (`fid` in the metrics). Grayscale
             images are repeated to RGB.
  digits     the penultimate (128-d) features of the digit classifier of
             dit_jax.evaluation.digits: a Fréchet distance for the embedded MNIST data that costs
             a fraction of Inception on a CPU (`fd_digits` in the metrics).

Reference statistics: `config.eval.reference` (an ADM reference batch with `mu`/`sigma`, e.g.
VIRTUAL_imagenet256_labeled.npz, Inception only), else the training set itself: the posterior
means of `num_samples` evenly spaced training examples, decoded by the dataset's autoencoder,
computed once and cached in the workdir.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import numpy as np

from dit_jax import autoencoder as autoencoder_lib
from dit_jax import files, sampling
from dit_jax.data import pipeline
from dit_jax.evaluation import digits, inception, metrics

FEATURES = ("inception", "digits")
METRIC_NAMES = {"inception": "fid", "digits": "fd_digits"}


def feature_function(
    kind: str, image_size: int, *, inception_weights: str = "", batch_size: int = 200
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [N, S, S, C] -> features [N, D] float32 for the named feature network."""
    if kind == "inception":
        extractor = inception.load_inception(inception_weights or None, batch_size=batch_size)

        def inception_features(images):
            images = np.asarray(images)
            if images.shape[-1] == 1:
                images = np.repeat(images, 3, axis=-1)
            return extractor(images)["pool"]

        return inception_features
    if kind == "digits":
        params, _ = digits.cached_classifier(image_size)
        return lambda images: digits.features(
            params, np.asarray(images, np.float32) / 127.5 - 1.0, image_size
        )
    raise ValueError(f"config.eval.features must be one of {FEATURES}, got {kind!r}.")


class FidDuringTraining:
    """Callable (ema_params, step) -> {metric name: value}. Built once per run; the feature
    network, the reference statistics and the sampling program are set up on first use."""

    def __init__(self, config, model, meta: dict, data_dir: str, workdir: str, log=print):
        e = config.eval
        if e.features not in FEATURES:
            raise ValueError(f"config.eval.features must be one of {FEATURES}, got {e.features!r}.")
        if e.num_samples < 2:
            raise ValueError(f"config.eval.num_samples must be at least 2, got {e.num_samples}.")
        if e.reference and e.features != "inception":
            raise ValueError(
                "config.eval.reference holds Inception statistics; use it with features='inception'."
            )
        if e.reference and not os.path.isfile(e.reference):
            raise ValueError(f"config.eval.reference {e.reference} does not exist.")
        self.config, self.model, self.meta = config, model, meta
        self.data_dir, self.workdir, self.log = data_dir, workdir, log
        self.name = METRIC_NAMES[e.features]
        self._features = None
        self._reference: Optional[metrics.FeatureStatistics] = None
        self._autoencoder = None

    # -- pieces built on first use ---------------------------------------------------------
    def _decode(self, raw_latents: np.ndarray) -> np.ndarray:
        """Raw (unscaled) latents -> uint8 images, as the sample CLI converts them."""
        if self._autoencoder is None:
            self._autoencoder = autoencoder_lib.load_autoencoder(self.meta["autoencoder"])
        images = self._autoencoder.decode(raw_latents, image_size=self.meta["image_size"])
        return sampling.images_to_uint8(images)

    def features(self, images: np.ndarray) -> np.ndarray:
        if self._features is None:
            e = self.config.eval
            self._features = feature_function(
                e.features, self.meta["image_size"], inception_weights=e.inception_weights
            )
        return self._features(images)

    def reference(self) -> metrics.FeatureStatistics:
        if self._reference is not None:
            return self._reference
        e = self.config.eval
        if e.reference:
            batch = metrics.read_reference_batch(e.reference)
            if batch.stats is None:
                raise ValueError(
                    f"{e.reference} has no precomputed statistics (mu, sigma); write them with "
                    "python -m dit_jax.evaluate --make_reference."
                )
            self._reference = batch.stats
            return self._reference
        cache = os.path.join(self.workdir, f"fid_reference_{e.features}_{e.num_samples}.npz")
        if os.path.isfile(cache):
            with np.load(cache) as f:
                self._reference = metrics.FeatureStatistics(f["mu"], f["sigma"])
            return self._reference
        records = pipeline.LatentRecords(self.data_dir, self.config.data.split)
        n = min(e.num_samples, len(records))
        indices = np.linspace(0, len(records) - 1, n).round().astype(np.int64)
        self.log(f"{self.name}: reference statistics of {n} training images -> {cache}")
        feats = []
        for start in range(0, n, 500):
            batch = records.read_batch(indices[start : start + 500])
            feats.append(self.features(self._decode(batch["mean"][:, 0].astype(np.float32))))
        self._reference = metrics.compute_statistics(np.concatenate(feats))
        files.write_atomically(
            cache, files.npz_bytes(mu=self._reference.mu, sigma=self._reference.sigma)
        )
        return self._reference

    # -- the evaluation ----------------------------------------------------------------------
    def sample_images(self, ema_params, num: int, seed: int) -> np.ndarray:
        """uint8 images [num, S, S, C] of the EMA model, labels uniform, split over local devices."""
        e = self.config.eval
        params, split = sampling.local_data_parallel(jax.device_get(ema_params))
        chunk = e.per_device_batch * len(jax.local_devices())
        out = []
        for c in range(-(-num // chunk)):
            latents, _ = sampling.sample_chunk(
                self.model,
                params,
                c,
                seed,
                chunk,
                split,
                sampler=e.sampler,
                steps=e.steps,
                cfg_scale=e.cfg_scale,
                guidance_channels=sampling.guidance_channels(e.guidance),
                clip_denoised=self.meta["autoencoder"].startswith("identity"),
                **sampling.schedule_from_config(self.config),
                guidance_interval=tuple(e.get("guidance_interval", ())) or None,
            )
            out.append(self._decode(np.asarray(latents) / self.meta["scaling_factor"]))
        return np.concatenate(out)[:num]

    def __call__(self, ema_params, step: int) -> dict:
        e = self.config.eval
        reference = self.reference()
        images = self.sample_images(ema_params, e.num_samples, self.config.seed + 2)
        value = metrics.compute_statistics(self.features(images)).frechet_distance(reference)
        return {self.name: value}
