"""Does the demo draw the digit it was asked for? A small CNN trained on the same real data
(the embedded MNIST 5k: 4,500 images to train, 500 held out) classifies class-conditional
samples; the score is the accuracy on samples of each requested class. Its penultimate
features give the digit Fréchet distance (FD-digits). The command line is dit_jax.score_digits.

The classifier is trained once (about a minute on 2 CPU cores) and cached next to the
embedded dataset; its held-out accuracy is printed so the score can be read against it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from PIL import Image

from dit_jax import files, sampling
from dit_jax.data import sources
from dit_jax.evaluation import metrics


class DigitClassifier(nn.Module):
    """[N, 28, 28, 1] in [-1, 1] -> [N, 10] logits."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for features in (16, 32):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(128)(x)))
        return nn.Dense(10)(x)


def real_digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The embedded MNIST at `size` px (ADM crop, as the encoder does): [5000, size, size, 1] in [-1, 1]."""
    images, labels = sources.load_embedded_mnist()
    if size != images.shape[1]:
        images = np.stack([sources.center_crop_arr(Image.fromarray(i), size) for i in images])
    return images[..., None].astype(np.float32) / 127.5 - 1.0, labels


def _split(seed: int = 0, size: int = 28):
    x, labels = real_digits(size)
    order = np.random.default_rng(seed).permutation(len(labels))
    return (x[order[500:]], labels[order[500:]]), (x[order[:500]], labels[order[:500]])


def train_classifier(
    size: int = 28, steps: int = 800, batch: int = 64, seed: int = 0
) -> tuple[dict, float]:
    """(params, held-out accuracy) of a classifier of `size`-px digits trained on 4,500 of the
    5,000 images (random shifts of up to size/14 pixels as augmentation)."""
    (x, y), (xv, yv) = _split(seed, size)
    model = DigitClassifier()
    params = model.init(jax.random.PRNGKey(seed), x[:1])["params"]
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb, key):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.integers(0, len(y), batch)
        xb = x[idx]
        reach = max(1, size // 14)
        shift = rng.integers(-reach, reach + 1, 2)
        xb = np.roll(xb, tuple(shift), axis=(1, 2))
        params, opt = step(params, opt, xb, y[idx], jax.random.PRNGKey(i))
    accuracy = float(np.mean(predict(params, xv, size) == yv))
    return params, accuracy


@jax.jit
def _logits(params, x):
    return DigitClassifier().apply({"params": params}, x)


def _apply_centered(fn, params, images: np.ndarray, size: int) -> np.ndarray:
    """fn(params, batch) over the center size x size of [N, S, S, 1] images, 500 at a time."""
    images = np.asarray(images, np.float32)
    top = (images.shape[1] - size) // 2
    images = images[:, top : top + size, top : top + size]
    return np.concatenate(
        [np.asarray(fn(params, images[i : i + 500])) for i in range(0, len(images), 500)]
    )


def predict(params, images: np.ndarray, size: int = 28) -> np.ndarray:
    """Class predictions for [N, S, S, 1] images in [-1, 1]; the center size x size is used."""
    return _apply_centered(lambda p, x: jnp.argmax(_logits(p, x), -1), params, images, size)


@jax.jit
def _penultimate(params, x):
    _, state = DigitClassifier().apply({"params": params}, x, capture_intermediates=True)
    return nn.relu(state["intermediates"]["Dense_0"]["__call__"][0])


def features(params, images: np.ndarray, size: int = 28) -> np.ndarray:
    """The classifier's penultimate features (128-d, after ReLU) of [N, S, S, 1] images in
    [-1, 1] (center size x size): the feature space of the digit Fréchet distance."""
    return _apply_centered(_penultimate, params, images, size)


def cached_classifier(
    size: int = 28, cache_dir: Optional[str] = None, log=print
) -> tuple[dict, float]:
    cache_dir = cache_dir or files.cache_dir()
    path = os.path.join(cache_dir, f"digit_classifier_{size}px.msgpack")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            blob = serialization.msgpack_restore(f.read())
        return blob["params"], float(blob["accuracy"])
    log(
        f"training the digit classifier on the embedded MNIST at {size}px (4,500 train / 500 held out)"
    )
    params, accuracy = train_classifier(size)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "wb") as f:
        f.write(
            serialization.msgpack_serialize(
                {"params": jax.device_get(params), "accuracy": accuracy}
            )
        )
    return params, accuracy


def score_samples(
    classifier_params, images: np.ndarray, labels: np.ndarray, size: int = 28
) -> dict:
    """Accuracy overall and per requested class."""
    pred = predict(classifier_params, images, size)
    per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    return {"accuracy": float(np.mean(pred == labels)), "per_class": per_class}


class DigitScorer:
    """FD-digits and accuracy of class-conditional samples: the Frechet distance of the
    classifier's penultimate features to those of its 500 held-out real digits, and the
    classifier's accuracy on the requested labels. `floor` is the distance of as many real
    training digits (what a perfect sampler would score)."""

    def __init__(self, size: int, log=print):
        self.size = size
        self.classifier, self.classifier_accuracy = cached_classifier(size, log=log)
        (x_train, _), (x_held, _) = _split(0, size)  # the classifier's own train / held-out split
        self.reference = metrics.compute_statistics(features(self.classifier, x_held, size))
        subset = x_train[np.random.default_rng(1).permutation(len(x_train))[: len(x_held)]]
        self.floor = self.fd(subset)

    def fd(self, images: np.ndarray) -> float:
        """FD-digits of images [N, S, S, 1] in [-1, 1]."""
        stats = metrics.compute_statistics(features(self.classifier, images, self.size))
        return float(stats.frechet_distance(self.reference))

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        accuracy = float(np.mean(predict(self.classifier, images, self.size) == labels))
        return {"fd_digits": self.fd(images), "digit_accuracy": accuracy}


def evaluate_workdir(
    workdir: str,
    cfg_scales: Sequence[float],
    per_class: int,
    *,
    sampler: Optional[str] = None,
    steps: int = 50,
    seed: int = 0,
    log=print,
) -> dict:
    """Samples the latest EMA checkpoint of a demo run at each cfg scale (every channel
    guided; `sampler` by default ddim, or heun for an interpolant run) and scores it."""
    g = sampling.generator_from_workdir(workdir)
    sampler = sampler or ("ddim" if g.interpolant is None else "heun")
    classifier, held_out = cached_classifier(g.image_size, log=log)
    labels = np.repeat(np.arange(g.model.num_classes, dtype=np.int32), per_class)
    results = {"step": g.step, "classifier_held_out_accuracy": held_out, "scales": {}}
    for scale in cfg_scales:
        images = g.sample_images(
            labels,
            jax.random.PRNGKey(seed),
            sampler=sampler,
            steps=steps,
            cfg_scale=scale,
            guidance_channels=None,
        )
        results["scales"][float(scale)] = score_samples(classifier, images, labels, g.image_size)
    return results
