"""The demo's sample scorer: a digit classifier trained on the same real data."""

import numpy as np

from dit_jax.data import embedded, latents
from dit_jax.evaluation import digits


def test_classifier_scores_real_digits_and_rejects_wrong_labels():
    params, held_out = digits.train_classifier(size=16, steps=250)
    assert held_out > 0.85, held_out
    x, y = digits.real_digits(16)
    rng = np.random.default_rng(1)
    idx = rng.choice(len(y), 400, replace=False)
    padded = np.pad(
        x[idx], ((0, 0), (4, 4), (4, 4), (0, 0)), constant_values=-1
    )  # center crop is used
    right = digits.score_samples(params, padded, y[idx], size=16)
    wrong = digits.score_samples(params, padded, (y[idx] + 1) % 10, size=16)
    assert right["accuracy"] > 0.85 and wrong["accuracy"] < 0.1
    assert set(right["per_class"]) == set(range(10))


def test_embedded_dataset_at_other_sizes(tmp_path):
    path = embedded.ensure_embedded_dataset(
        str(tmp_path / "m16"), image_size=16, log=lambda *a: None
    )
    meta = latents.read_metadata(path)
    assert (
        meta["image_size"] == 16
        and meta["latent_shape"] == [16, 16, 1]
        and meta["autoencoder"] == "identity:16"
    )
