"""Input pipeline throughput: the latent reader alone and the full training pipeline.

  python benchmarks/input_pipeline.py [--examples 20000] [--latent 32,32,4] [--batch 256]

Writes a synthetic latent dataset with the real writer (random posteriors, float16, image +
flip) to a temporary directory, then reports examples/s (median of repeats, warm-up
excluded) for: random-access record reads + parsing (`LatentRecords`), and the whole
pipeline (shuffle, batch, flip choice, posterior sampling, scaling) with 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dit_jax.data import latents, pipeline, sources  # noqa: E402


class RandomPosteriorAE:
    """Stands in for a VAE: random moments of the requested latent shape."""

    spec, scaling_factor, downsample, channels = "random", 0.18215, 8, 1

    def __init__(self, shape):
        self.shape = shape
        self.rng = np.random.default_rng(0)

    def latent_shape(self, image_size):
        return self.shape

    def encode_moments(self, images):
        n = len(images)
        return (
            self.rng.standard_normal((n,) + self.shape).astype(np.float32) * 5,
            self.rng.uniform(-12, -6, (n,) + self.shape).astype(np.float32),
        )


class TinyImages(sources.ImageSource):
    name, class_names = "synthetic", [str(i) for i in range(1000)]

    def __init__(self, n, unit=4096):
        self.n, self.unit = n, unit

    def num_examples(self):
        return self.n

    def units(self):
        return list(range((self.n + self.unit - 1) // self.unit))

    def examples(self, u):
        from PIL import Image

        img = Image.fromarray(np.zeros((8, 8), np.uint8))
        for i in range(u * self.unit, min((u + 1) * self.unit, self.n)):
            yield sources.Example(f"s{i}", i % 1000, lambda: img)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        count = fn()
        times.append(count / (time.perf_counter() - t))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--latent", default="32,32,4")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.latent.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "synthetic")
        t = time.perf_counter()
        latents.encode_dataset(
            TinyImages(args.examples),
            RandomPosteriorAE(shape),
            out,
            image_size=8,
            batch_size=512,
            log=lambda *a: None,
        )
        write = args.examples / (time.perf_counter() - t)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / args.examples
        records = pipeline.LatentRecords(out)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(records))

        def read(n=5000):
            start = rng.integers(0, len(order) - n)
            for i in range(start, start + n, 256):
                records.__getitems__(order[i : min(i + 256, start + n)])
            return n

        reader = timed(read, args.repeats)
        results = {}
        for threads in (1, 2):
            p = pipeline.InputPipeline(
                out, global_batch_size=args.batch, seed=0, num_threads=threads, prefetch=8
            )

            def run(steps=20):
                for _ in range(steps):
                    next(p)
                return steps * args.batch

            results[threads] = timed(run, args.repeats)
        print(
            f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
        )
        print(
            f"dataset: {args.examples} examples of 2x{shape} float16 mean+logvar, {size / 1024:.1f} KiB/example on disk, "
            f"written at {write:.0f} examples/s"
        )
        print(f"reader alone (random access + parse): {reader:,.0f} examples/s")
        for threads, rate in results.items():
            print(f"full pipeline, batch {args.batch}, {threads} thread(s): {rate:,.0f} examples/s")


if __name__ == "__main__":
    main()
