"""Latent data: sources, ADM crop, resumable sharded encoding, TFDS compatibility, the input pipeline."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import reference_path
from dit_jax import autoencoder as autoencoder_lib
from dit_jax import vae
from dit_jax.data import builder, embedded, latents, pipeline, sources


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory):
    return embedded.ensure_embedded_dataset(
        str(tmp_path_factory.mktemp("data") / "mnist"), log=quiet
    )


def make_folder(root, sizes=((40, 30), (17, 25), (64, 64)), classes=("cat", "dog"), corrupt=True):
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        os.makedirs(root / cls, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{i}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / classes[0] / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / classes[0] / "notes.txt").write_text("ignored")
    return root


def read_all(data_dir, split="train"):
    import tensorflow_datasets as tfds

    src = tfds.builder_from_directory(str(data_dir)).as_data_source()[split]
    return {src[i]["id"].decode(): src[i] for i in range(len(src))}


def test_adm_center_crop():
    wide = Image.fromarray(np.tile(np.arange(600)[None, :] * 255 // 599, (400, 1)).astype(np.uint8))
    out = sources.center_crop_arr(wide, 64)
    assert out.shape == (64, 64)
    # short side 400 -> box-halved to 200, 100, then bicubic to 64: the crop is the central 64 columns
    assert abs(int(out[32, 32]) - 127) <= 3 and out[32, 0] < out[32, 63]
    square = Image.fromarray(np.full((28, 28), 7, np.uint8))
    np.testing.assert_array_equal(sources.center_crop_arr(square, 28), np.full((28, 28), 7))


def test_folder_encode_skips_corrupt_and_stores_flip(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ae = autoencoder_lib.IdentityAutoencoder(pad_to=16, channels=3)
    out = tmp_path / "lat"
    summary = latents.encode_dataset(
        sources.open_source(f"folder:{root}"), ae, str(out), image_size=16, log=quiet
    )
    assert summary["splits"]["train"] == {"num_examples": 6, "num_skipped": 1}
    assert summary["class_names"] == ["cat", "dog"] and summary["latent_shape"] == [16, 16, 3]
    skipped = (out / latents.SKIPPED_FILE).read_text()
    assert "cat/broken.jpg" in skipped and "UnidentifiedImageError" in skipped
    got = read_all(out)
    assert sorted(got) == sorted(
        f"{c}/img{i}.{'png' if i % 2 else 'jpg'}" for c in ("cat", "dog") for i in range(3)
    )
    ex = got["dog/img1.png"]
    assert (
        ex["label"] == 1 and ex["mean"].dtype == np.float16 and ex["mean"].shape == (2, 16, 16, 3)
    )
    expected = (
        sources.center_crop_arr(Image.open(root / "dog" / "img1.png").convert("RGB"), 16) / 127.5
        - 1
    )
    np.testing.assert_allclose(ex["mean"][0], expected, atol=2e-3)
    np.testing.assert_array_equal(ex["mean"][1], ex["mean"][0][:, ::-1])
    assert np.all(ex["logvar"] == -30)


def test_vae_encoding_stores_posterior_of_image_and_flip(tmp_path):
    """Through the real (tiny) diffusers VAE folder: stored moments are the VAE's, in float16."""
    root = make_folder(tmp_path / "imgs", sizes=((40, 30), (33, 33)), corrupt=False)
    ae = autoencoder_lib.load_autoencoder(
        f"{reference_path('VAE_REFERENCE', 'vae_tiny')}_diffusers"
    )
    with pytest.raises(ValueError, match="multiple"):
        ae.latent_shape(30)
    out = tmp_path / "lat"
    summary = latents.encode_dataset(
        sources.open_source(f"folder:{root}"), ae, str(out), image_size=32, log=quiet
    )
    assert summary["latent_shape"] == [8, 8, 4] and summary["scaling_factor"] == pytest.approx(
        0.18215
    )
    ex = read_all(out)["dog/img1.png"]
    crop = sources.center_crop_arr(Image.open(root / "dog" / "img1.png").convert("RGB"), 32)
    post = vae.encode_images(ae.model, ae.params, np.stack([crop, crop[:, ::-1]]))
    np.testing.assert_allclose(ex["mean"], post.mean.astype(np.float16), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(ex["logvar"], post.logvar.astype(np.float16), rtol=2e-3, atol=2e-3)
    assert not np.allclose(ex["mean"][0], ex["mean"][1])


@pytest.mark.parametrize("layout", ["missing", "empty", "no_images"])
def test_bad_folders_are_one_clear_error(tmp_path, layout):
    root = tmp_path / "x"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "a").mkdir()
        (root / "a" / "readme.txt").write_text("x")
    with pytest.raises(sources.SourceError, match=str(root)):
        sources.open_source(f"folder:{root}")


class FlakySource(sources.ImageSource):
    """Wraps a source; raises in the middle of unit `fail_unit` the first time."""

    def __init__(self, inner, fail_unit):
        self.inner, self.fail_unit, self.failed = inner, fail_unit, False
        self.name, self.class_names = inner.name, inner.class_names

    def units(self):
        return self.inner.units()

    def num_examples(self):
        return self.inner.num_examples()

    def examples(self, unit):
        for i, ex in enumerate(self.inner.examples(unit)):
            if unit == self.fail_unit and i == 5 and not self.failed:
                self.failed = True
                raise KeyboardInterrupt("simulated interruption")
            yield ex


def test_interrupted_encode_resumes_without_duplicates(tmp_path):
    inner = sources.EmbeddedMnistSource(unit_size=300)
    inner._index(1500, 300)  # the first 1,500 digits in units of 300
    flaky = FlakySource(inner, fail_unit=2)
    ae = autoencoder_lib.load_autoencoder("identity:32")
    out = tmp_path / "lat"
    with pytest.raises(KeyboardInterrupt):
        latents.encode_dataset(flaky, ae, str(out), image_size=28, log=quiet)
    done = sorted(p for p in os.listdir(out) if p.endswith(".json"))
    assert len(done) == 2  # units 0 and 1 finished, 2 was cut
    before = {p: os.path.getmtime(out / p) for p in done}
    summary = latents.encode_dataset(flaky, ae, str(out), image_size=28, log=quiet)
    assert {p: os.path.getmtime(out / p) for p in done} == before  # finished shards not redone
    assert summary["splits"]["train"]["num_examples"] == 1500
    ids = list(read_all(out))
    assert len(ids) == 1500 and sorted(ids) == [f"mnist5k/{i:04d}" for i in range(1500)]
    assert not any(p.endswith(".tmp") for p in os.listdir(out))


def test_multi_process_encoding_splits_shards(tmp_path):
    src = sources.EmbeddedMnistSource(unit_size=1000)
    ae = autoencoder_lib.load_autoencoder("identity:32")
    out = str(tmp_path / "lat")
    logs = []
    assert (
        latents.encode_dataset(
            src, ae, out, image_size=28, process_index=0, process_count=2, log=logs.append
        )
        is None
    )
    assert any("still to encode" in l for l in logs)
    assert (
        latents.encode_dataset(
            src, ae, out, image_size=28, process_index=1, process_count=2, log=quiet
        )
        is None
    )
    summary = latents.encode_dataset(
        src, ae, out, image_size=28, process_index=0, process_count=2, log=quiet
    )
    assert summary["splits"]["train"]["num_examples"] == 5000
    assert len(read_all(out)) == 5000


def test_tfds_builder_matches_cli(tmp_path, embedded_dir):
    b = builder.LatentDataset(
        source="embedded", autoencoder="identity:32", image_size=28, data_dir=str(tmp_path)
    )
    b.download_and_prepare(file_format="array_record")
    src = b.as_data_source()["train"]
    cli_examples = read_all(embedded_dir)
    assert len(src) == 5000
    for i in (0, 1234, 4999):
        ex = src[i]
        ref = cli_examples[ex["id"].decode()]
        assert ex["label"] == ref["label"]
        np.testing.assert_array_equal(ex["mean"], ref["mean"])


def test_imagenet_train_tar_layout(tmp_path):
    synsets = ["n01440764", "n01443537"]
    outer = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer, "w") as tar:
        for s in synsets:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(3):
                    img = io.BytesIO()
                    Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(img, format="JPEG")
                    info = tarfile.TarInfo(f"{s}_{i}.JPEG")
                    info.size = len(img.getvalue())
                    inner.addfile(info, io.BytesIO(img.getvalue()))
            info = tarfile.TarInfo(f"{s}.tar")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    src = sources.open_source(f"imagenet:{tmp_path}", "train")
    assert len(src.class_names) == 1000 and src.units() == [0, 1]
    examples = [e for u in src.units() for e in src.examples(u)]
    assert [e.label for e in examples] == [0, 0, 0, 1, 1, 1]
    assert examples[4].id == "n01443537_1.JPEG" and examples[4].load().size == (30, 20)
    with pytest.raises(sources.SourceError, match="ILSVRC2012_img_val.tar not found"):
        sources.open_source(f"imagenet:{tmp_path}", "validation")


def test_encode_cli_errors_are_one_line(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dit_jax.data.encode",
            f"--source=folder:{tmp_path / 'none'}",
            "--autoencoder=identity:16",
            "--image_size=16",
            f"--output={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: image folder")


# ----------------------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------------------


def batches(p, n):
    return [next(p) for _ in range(n)]


def test_pipeline_is_deterministic_and_resumes_exactly(embedded_dir):
    make = lambda seed: pipeline.InputPipeline(embedded_dir, global_batch_size=64, seed=seed)
    a, b, c = batches(make(0), 6), batches(make(0), 6), batches(make(1), 2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["latents"], y["latents"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert not np.array_equal(a[0]["labels"], c[0]["labels"])
    p = make(0)
    batches(p, 3)
    state = json.loads(json.dumps(p.get_state()))  # survives a JSON checkpoint
    resumed = make(0)
    resumed.set_state(state)
    for x, y in zip(a[3:], batches(resumed, 3)):
        np.testing.assert_array_equal(x["latents"], y["latents"])


def test_pipeline_epochs_cover_the_data(embedded_dir):
    records = pipeline.LatentRecords(embedded_dir)
    n = len(records)
    ds, _ = pipeline.make_dataset(embedded_dir, global_batch_size=100, seed=3)
    labels = np.concatenate([ds[i]["labels"] for i in range(n // 100)])
    assert np.bincount(labels).tolist() == [500] * 10  # one epoch = every example once
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_dataset(embedded_dir, global_batch_size=101, seed=0, process_count=2)


class _ProcessSharding:
    """What `process_rows` asks of a sharding, as process `p` of a mesh whose devices hold
    `per_device` rows each, `devices` per process, process-major or interleaved."""

    def __init__(self, p, processes, devices, interleaved=False):
        self.p, self.processes, self.devices, self.interleaved = p, processes, devices, interleaved

    def addressable_devices_indices_map(self, shape):
        total = self.processes * self.devices
        per = shape[0] // total
        slots = (
            [d * self.processes + self.p for d in range(self.devices)]
            if self.interleaved
            else [self.p * self.devices + d for d in range(self.devices)]
        )
        return {f"dev{s}": (slice(s * per, (s + 1) * per),) for s in slots}


@pytest.mark.parametrize("interleaved", [False, True])
def test_global_batches_do_not_depend_on_the_process_count(embedded_dir, interleaved):
    """Global batch k (examples, flips, posterior noise) is the same read by 1, 2 or 4
    processes; each process reads only its rows, the rows are disjoint and together are the
    batch. Epoch boundaries are crossed (5000 examples, batches of 96)."""
    B, ks = 96, [0, 1, 52, 53]  # batch 52 spans the first two epochs
    one, _ = pipeline.make_dataset(embedded_dir, global_batch_size=B, seed=7)
    whole = {k: one[k] for k in ks}
    for processes in (2, 4):
        shares = []
        for p in range(processes):
            rows = pipeline.process_rows(
                _ProcessSharding(p, processes, 8 // processes, interleaved), B
            )
            assert len(rows) == B // processes
            ds, _ = pipeline.make_dataset(embedded_dir, global_batch_size=B, seed=7, rows=rows)
            shares.append((rows, {k: ds[k] for k in ks}))
        all_rows = np.concatenate([rows for rows, _ in shares])
        assert sorted(all_rows.tolist()) == list(range(B))  # disjoint, and cover the batch
        for k in ks:
            for key in ("latents", "labels"):
                got = np.empty_like(whole[k][key])
                for rows, batches in shares:
                    got[rows] = batches[k][key]
                np.testing.assert_array_equal(got, whole[k][key])
    assert pipeline.even_rows(B, 1, 4).tolist() == list(range(24, 48))


def test_pipeline_flip_posterior_and_scale(tmp_path):
    """A dataset whose flip view is +1 everywhere and image view -1, logvar log(0.25), scale 0.5."""

    class FakeAE(autoencoder_lib.IdentityAutoencoder):
        def encode_moments(self, images):
            n = len(images) // 2
            mean = np.ones((2 * n, 4, 4, 2), np.float32)
            mean[:n] = -1
            return mean, np.full_like(mean, np.log(0.25))

        def latent_shape(self, image_size):
            return (4, 4, 2)

    ae = FakeAE(pad_to=16, channels=1, scaling_factor=0.5)
    out = str(tmp_path / "fake")
    latents.encode_dataset(
        sources.EmbeddedMnistSource(unit_size=2500), ae, out, image_size=28, log=quiet
    )
    batch = next(
        pipeline.InputPipeline(out, global_batch_size=2000, seed=0, sample_posterior=False)
    )
    views = batch["latents"][:, 0, 0, 0]
    assert set(np.unique(views)) == {-0.5, 0.5} and abs(np.mean(views > 0) - 0.5) < 0.05
    no_flip = next(pipeline.InputPipeline(out, global_batch_size=2000, seed=0, random_flip=False))
    z = no_flip["latents"] / 0.5 + 1  # posterior noise: std 0.5
    assert abs(np.std(z) - 0.5) < 0.01 and abs(np.mean(z)) < 0.01


def test_pipeline_gives_global_sharded_arrays(embedded_dir):
    import jax
    from dit_jax import sharding

    mesh = sharding.make_mesh(data=4, fsdp=2)
    p = pipeline.InputPipeline(
        embedded_dir, global_batch_size=32, seed=0, sharding=sharding.batch_sharding(mesh)
    )
    batch = next(p)
    assert isinstance(batch["latents"], jax.Array) and batch["latents"].shape == (32, 32, 32, 1)
    assert len(batch["latents"].addressable_shards) == 8
    assert batch["latents"].addressable_shards[0].data.shape == (4, 32, 32, 1)
    plain = next(pipeline.InputPipeline(embedded_dir, global_batch_size=32, seed=0))
    np.testing.assert_array_equal(np.asarray(batch["latents"]), plain["latents"])


def test_embedded_dataset_builds_once(embedded_dir):
    meta = latents.read_metadata(embedded_dir)
    assert meta["splits"]["train"]["num_examples"] == 5000 and meta["latent_shape"] == [32, 32, 1]
    logs = []
    embedded.ensure_embedded_dataset(embedded_dir, log=logs.append)
    assert logs == []
    with pytest.raises(ValueError, match="not a complete latent dataset"):
        latents.read_metadata(os.path.dirname(embedded_dir))


def test_tfds_image_dataset_source(tmp_path):
    import tensorflow_datasets as tfds

    feats = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(20, 24, 3)),
            "label": tfds.features.ClassLabel(names=["x", "y", "z"]),
        }
    )
    examples = [
        (str(i), {"image": np.full((20, 24, 3), 20 * i, np.uint8), "label": i % 3})
        for i in range(7)
    ]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_images",
        version="1.0.0",
        features=feats,
        split_datasets={"train": examples},
        data_dir=str(tmp_path),
        file_format="array_record",
    )
    src = sources.open_source(f"tfds:tiny_images@{tmp_path}")
    assert src.class_names == ["x", "y", "z"] and src.num_examples() == 7
    ae = autoencoder_lib.IdentityAutoencoder(pad_to=16, channels=3)
    summary = latents.encode_dataset(src, ae, str(tmp_path / "lat"), image_size=16, log=quiet)
    assert summary["splits"]["train"]["num_examples"] == 7
    got = read_all(tmp_path / "lat")
    for ex in got.values():  # each image is one flat grey level 20*i, with label i % 3
        level = int(round((float(ex["mean"][0].mean()) + 1) * 127.5))
        assert level % 20 == 0 and ex["label"] == (level // 20) % 3
    with pytest.raises(sources.SourceError, match="not usable"):
        sources.open_source(f"tfds:no_such_dataset@{tmp_path}")
