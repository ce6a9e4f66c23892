"""Throughput of the pretraining data pipeline: decoded, augmented 224x224 images per second.

Writes ~200 synthetic 500x375 JPEGs (smooth colour fields plus noise, so that they compress and
decode roughly like photographs) to a temporary folder and times ``pretrain_batches`` with its
default reading threads.

    python bench/bench_data.py [--images 200] [--batch-size 32] [--batches 40] [--workers 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np
from PIL import Image

from mae_jax import data


def write_synthetic_jpegs(folder: str, count: int, seed: int = 0) -> None:
    """``count`` 500x375 JPEGs in two class folders."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        freq = rng.uniform(0.005, 0.05, size=(3, 2))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        channels = [np.sin(xs * fx + ys * fy + p) for (fx, fy), p in zip(freq, phase, strict=True)]
        field = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 12, (375, 500, 3))
        pixels = np.clip(field, 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"class{i % 2}", f"img{i:04d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="timed batches (after 2 warm-up)")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_jpegs(tmp, args.images)
        folder = data.ImageFolder(tmp)
        with data.pretrain_batches(
            folder, batch_size=args.batch_size, img_size=224, seed=0, worker_count=args.workers
        ) as loader:
            for _ in range(2):  # threads start and fill their buffer
                next(loader)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.batches):
                _, batch = next(loader)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
        # Threads still decoding when the loader closes would log the deleted temporary files.
        logging.getLogger(data.__name__).setLevel(logging.ERROR)
        assert batch["image"].shape == (args.batch_size, 224, 224, 3)
    count = args.batches * args.batch_size
    print(
        f"pretrain pipeline: {count / elapsed:.0f} images/s ({len(folder)} JPEGs 500x375 -> "
        f"224x224, batch {args.batch_size}, workers {args.workers}, {os.cpu_count()} CPUs)"
    )
    # CPU time per image varies less than wall time on a shared machine; with workers it only
    # counts the main process.
    print(f"main-process CPU time: {1e3 * cpu / count:.2f} ms per image")


if __name__ == "__main__":
    main()
