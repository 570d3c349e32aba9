"""Metric math (FID methods, statistics, Inception Score, precision/recall in blocks) and the
ADM reference-batch files. Pure numpy inputs; no Inception network."""

import warnings
import zipfile

import numpy as np
import pytest

from dit_jax.evaluation import metrics


def _adm_inception_score(logits, split_size=5000):
    """The ADM evaluator's formula on float32 softmax outputs, written out as reference."""
    z = logits.astype(np.float32)
    preds = np.exp(z - z.max(axis=1, keepdims=True))
    preds = preds / preds.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_is_adm_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(120, 1008)).astype(np.float32) * 3
    for split in (5000, 50, 7):
        assert metrics.inception_score(logits, split) == pytest.approx(
            _adm_inception_score(logits, split), rel=1e-5
        )
    # one class per sample, spread evenly over 10 classes: IS = 10; identical predictions: IS = 1
    confident = np.full((100, 1008), -1e4, np.float32)
    confident[np.arange(100), np.arange(100) % 10] = 0
    assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-9)
    assert metrics.inception_score(np.zeros((5, 1008))) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="logits"):
        metrics.inception_score(np.zeros(1008))


def test_fid_methods_agree_and_errors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 64))
    y = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
    a, b = metrics.compute_statistics(x), metrics.compute_statistics(y)
    sqrtm, eigh = a.frechet_distance(b), a.frechet_distance(b, method="eigh")
    assert sqrtm == pytest.approx(eigh, rel=1e-9)
    assert a.frechet_distance(a) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariances (fewer samples than dimensions) still give a finite distance
    few = metrics.compute_statistics(rng.normal(size=(5, 64)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(few.frechet_distance(b)) and few.frechet_distance(
            b, method="eigh"
        ) == pytest.approx(few.frechet_distance(b), rel=1e-6)
    with pytest.raises(ValueError, match="statistics do not match"):
        metrics.frechet_distance(a.mu, a.sigma, a.mu[:3], a.sigma[:3, :3])
    with pytest.raises(ValueError, match="FID method"):
        a.frechet_distance(b, method="svd")
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        metrics.compute_statistics(np.zeros((1, 4)))


def test_streamed_statistics_equal_numpy():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(300, 32)) * 5 + 1000).astype(
        np.float32
    )  # a large offset: no cancellation
    acc = metrics.StatisticsAccumulator()
    for i in range(0, 300, 64):
        acc.add(x[i : i + 64])
    exact = metrics.compute_statistics(x)
    got = acc.statistics()
    assert got.mu.dtype == np.float32 and got.sigma.dtype == np.float64
    np.testing.assert_allclose(got.mu, exact.mu, rtol=1e-6)
    np.testing.assert_allclose(got.sigma, exact.sigma, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.StatisticsAccumulator().statistics()


def _brute_force_pr(ref, sample, k=3):
    d = lambda u, v: ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d(ref, ref), axis=1)[:, k]
    r_sample = np.sort(d(sample, sample), axis=1)[:, k]
    cross = d(ref, sample)
    return (
        (cross <= r_ref[:, None]).any(0).mean(),
        (cross <= r_sample[None, :]).any(1).mean(),
        r_ref,
    )


def test_precision_recall_blocks_match_brute_force():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(50, 8)).astype(np.float32)
    sample = (rng.normal(size=(37, 8)) * 1.3 + 0.4).astype(np.float32)
    precision, recall, radii = _brute_force_pr(ref, sample)
    for block in (4096, 16, 7, 1):  # uneven blocks: padding rows and columns must never count
        assert metrics.precision_recall(ref, sample, block_size=block) == (precision, recall)
        np.testing.assert_allclose(metrics.manifold_radii(ref, block_size=block), radii, rtol=1e-5)
    with pytest.raises(ValueError, match="same D"):
        metrics.precision_recall(ref, sample[:, :4])
    with pytest.raises(ValueError, match="N > 3"):
        metrics.manifold_radii(ref[:3])


def test_evaluate_features_uses_precomputed_statistics():
    rng = np.random.default_rng(4)
    feats = lambda n, shift: {
        "pool": rng.normal(size=(n, 6)).astype(np.float32) + shift,
        "spatial": rng.normal(size=(n, 5)).astype(np.float32),
    }
    sample, ref = feats(20, 0.5), feats(30, 0.0)
    out = metrics.evaluate_features(sample, ref)
    assert set(out) == {"fid", "sfid", "precision", "recall"}
    precomputed = metrics.compute_statistics(ref["pool"][:10])
    out2 = metrics.evaluate_features(
        sample,
        ref,
        ref_stats=precomputed,
        ref_spatial_stats=metrics.compute_statistics(ref["spatial"]),
    )
    assert out2["fid"] == pytest.approx(
        metrics.compute_statistics(sample["pool"]).frechet_distance(precomputed)
    )
    assert out2["sfid"] == pytest.approx(out["sfid"]) and out2["precision"] == out["precision"]
    stats_only = metrics.evaluate_features(
        sample,
        None,
        ref_stats=precomputed,
        ref_spatial_stats=metrics.compute_statistics(ref["spatial"]),
    )
    assert "precision" not in stats_only
    with pytest.raises(ValueError, match="either images"):
        metrics.evaluate_features(sample, None)


def test_reference_batch_round_trip_and_streaming(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(11, 8, 6, 3), dtype=np.uint8)
    stats = metrics.FeatureStatistics(np.zeros(4, np.float32), np.eye(4))
    spatial = metrics.FeatureStatistics(np.ones(3, np.float32), np.eye(3) * 2)
    path = tmp_path / "ref.npz"
    metrics.write_reference_batch(path, images, stats, spatial)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    batch = metrics.read_reference_batch(path)
    assert batch.num_images == 11 and batch.image_shape == (11, 8, 6, 3)
    assert [len(b) for b in batch.iter_images(4)] == [4, 4, 3]
    np.testing.assert_array_equal(batch.images(), images)
    np.testing.assert_array_equal(batch.spatial_stats.sigma, spatial.sigma)
    # ADM sample batches are often written compressed
    compressed = tmp_path / "samples.npz"
    np.savez_compressed(compressed, arr_0=images)
    back = metrics.read_reference_batch(compressed)
    assert back.stats is None and back.num_images == 11
    np.testing.assert_array_equal(np.concatenate(list(back.iter_images(5))), images)
    stats_only = tmp_path / "stats.npz"
    metrics.write_reference_batch(stats_only, stats=stats, spatial_stats=spatial)
    assert metrics.read_reference_batch(stats_only).num_images == 0


def test_reference_batch_errors(tmp_path):
    def expect(path, message):
        with pytest.raises(ValueError, match=message) as info:
            metrics.read_reference_batch(path)
        assert str(path) in str(info.value)

    expect(tmp_path / "missing.npz", "no such file")
    (tmp_path / "text.npz").write_text("not a zip")
    expect(tmp_path / "text.npz", "not an .npz file")
    np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
    expect(tmp_path / "empty.npz", r"neither images \(arr_0\) nor statistics")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    expect(tmp_path / "float.npz", r"arr_0 must be uint8 images \[N, H, W, 3\]")
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 4, 4), np.uint8))
    expect(tmp_path / "gray.npz", "arr_0 must be uint8 images")
    np.savez(
        tmp_path / "half.npz",
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
        mu=np.zeros(3),
        sigma=np.eye(3),
    )
    expect(tmp_path / "half.npz", "need all of mu, sigma, mu_s, sigma_s")
    # arr_0 cut short inside the zip
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "short.npz", "w") as dst:
        dst.writestr("arr_0.npy", src.read("arr_0.npy")[:-20])
    with pytest.raises(ValueError, match="arr_0 is truncated"):
        list(metrics.read_reference_batch(tmp_path / "short.npz").iter_images(2))
    with pytest.raises(ValueError, match="uint8"):
        metrics.write_reference_batch(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="nothing to write"):
        metrics.write_reference_batch(tmp_path / "x.npz")


def test_source_images_subset_and_errors(tmp_path):
    from PIL import Image

    for i in range(7):
        folder = tmp_path / "data" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 16), i * 30, np.uint8)).save(
            folder / f"{i}.png"
        )  # grayscale, not square
    batches = list(metrics.iter_source_images(f"folder:{tmp_path / 'data'}", 8, batch_size=3))
    assert [b.shape for b in batches] == [(3, 8, 8, 3), (3, 8, 8, 3), (1, 8, 8, 3)] and batches[
        0
    ].dtype == np.uint8
    subset = np.concatenate(
        list(metrics.iter_source_images(f"folder:{tmp_path / 'data'}", 8, num=4, seed=1))
    )
    again = np.concatenate(
        list(metrics.iter_source_images(f"folder:{tmp_path / 'data'}", 8, num=4, seed=1))
    )
    assert subset.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(subset, again)
    with pytest.raises(ValueError, match="does not exist"):
        metrics.iter_source_images(f"folder:{tmp_path / 'nope'}", 8)
    with pytest.raises(ValueError, match="num must be >= 1"):
        metrics.iter_source_images(f"folder:{tmp_path / 'data'}", 8, num=0)
