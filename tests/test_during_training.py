"""FID during training: the metric is logged, its reference comes from the training set and is
cached, it separates real images from noise, and bad eval configs fail before compiling."""

import functools
import json
import os

import numpy as np
import pytest

from dit_jax import train, workdir as workdir_lib
from dit_jax.evaluation import digits, during_training
from test_train import tiny_config


@pytest.fixture(autouse=True)
def quick_classifier(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "dit_jax_cache"))
    monkeypatch.setattr(
        digits, "train_classifier", functools.partial(digits.train_classifier, steps=250)
    )


def eval_config(**overrides):
    return tiny_config(
        **{
            "eval.every_steps": 2,
            "eval.num_samples": 16,
            "eval.features": "digits",
            "eval.steps": 3,
            "eval.per_device_batch": 1,
            **overrides,
        }
    )


def test_fd_is_logged_during_training_against_the_cached_training_set(tmp_path):
    workdir = tmp_path / "w"
    train.train_and_evaluate(eval_config(), str(workdir))
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    evals = [line for line in lines if "fd_digits" in line]
    assert [line["step"] for line in evals] == [2, 4]
    assert all(np.isfinite(line["fd_digits"]) and line["fd_digits"] > 0 for line in evals)
    assert (workdir / "fid_reference_digits_16.npz").is_file()


def test_fd_separates_real_digits_from_noise(tmp_path):
    config = eval_config(**{"eval.num_samples": 200})
    data_dir = workdir_lib.dataset_dir(config)
    from dit_jax.data import latents

    meta = latents.read_metadata(data_dir)
    fd = during_training.FidDuringTraining(
        config,
        workdir_lib.model_for_dataset(config, meta),
        meta,
        data_dir,
        str(tmp_path),
        log=lambda *_: None,
    )
    reference = fd.reference()
    assert reference.mu.shape == (128,) and reference.sigma.shape == (128, 128)
    real, _ = digits.real_digits(16)
    pick = np.random.default_rng(0).choice(
        len(real), 200, replace=False
    )  # the data is sorted by class
    real = np.clip(127.5 * real[pick] + 128, 0, 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, real.shape).astype(np.uint8)
    from dit_jax.evaluation import metrics

    fd_real = metrics.compute_statistics(fd.features(real)).frechet_distance(reference)
    fd_noise = metrics.compute_statistics(fd.features(noise)).frechet_distance(reference)
    assert fd_real * 5 < fd_noise, (fd_real, fd_noise)
    cached = during_training.FidDuringTraining(
        config, fd.model, meta, data_dir, str(tmp_path)
    ).reference()
    np.testing.assert_array_equal(cached.sigma, reference.sigma)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"eval.features": "clip"}, "config.eval.features must be one of"),
        ({"eval.num_samples": 1}, "at least 2"),
        (
            {
                "eval.reference": "/nonexistent/VIRTUAL_imagenet256_labeled.npz",
                "eval.features": "inception",
            },
            "does not exist",
        ),
    ],
)
def test_bad_eval_configs_fail_before_compiling(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(eval_config(**override), str(tmp_path / "w"))
    assert not os.path.isdir(tmp_path / "w" / "checkpoints")
