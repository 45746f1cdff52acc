"""Canny on the CPU: fercuda against what a user would otherwise call, in one process.

    python -m pytest benchmarks/bench_canny_cpu.py --benchmark-only

Both sides use the same number of threads: torch's (FERCUDA_BENCH_THREADS overrides it), given
to cv2 with cv2.setNumThreads. Each fercuda benchmark also times its peers and records the
speed-ups (peer time / fercuda time, medians) in benchmark.extra_info, and prints them.
"""

import os
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fercuda import ops

ROOT = Path(__file__).resolve().parents[1]
FER2013 = Path(os.environ.get("FERCUDA_FER2013", ROOT.parent / "shared" / "data" / "fer2013"))
THREADS = int(os.environ.get("FERCUDA_BENCH_THREADS", torch.get_num_threads()))
LOW, HIGH, KSIZE = 50, 150, 5
KORNIA_IMAGES = 128


@pytest.fixture(scope="module", autouse=True)
def same_threads():
    torch.set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)


def fer_images(count):
    """Up to `count` real FER2013 faces (48x48), or None when the data set is absent."""
    files = sorted((FER2013 / "train").glob("*/*.jpg"))[:count]
    if len(files) < count:
        return None
    return np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files])


def picture_1080p():
    """A photograph-like 1920x1080 picture: upscaled FER faces, or smooth random structures."""
    faces = fer_images(24 * 40)
    if faces is not None:
        mosaic = np.concatenate([np.concatenate(list(faces[r * 40:(r + 1) * 40]), 1) for r in range(24)], 0)
    else:
        rng = np.random.default_rng(0)
        mosaic = cv2.GaussianBlur(rng.integers(0, 256, (270, 480), dtype=np.uint8), (5, 5), 0)
    return np.ascontiguousarray(cv2.resize(mosaic, (1920, 1080), interpolation=cv2.INTER_CUBIC))


def median_seconds(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def record(benchmark, case, peers, repeat):
    """Times each peer, stores fercuda's speed-up over it, and prints the line."""
    ours = benchmark.stats.stats.median
    benchmark.extra_info["threads"] = THREADS
    benchmark.extra_info["fercuda_ms"] = ours * 1e3
    line = [f"{case} ({THREADS} threads): fercuda {ours * 1e3:.2f} ms"]
    for name, fn in peers.items():
        theirs = median_seconds(fn, repeat)
        benchmark.extra_info[f"{name}_ms"] = theirs * 1e3
        benchmark.extra_info[f"speedup_vs_{name}"] = theirs / ours
        line.append(f"{name} {theirs * 1e3:.2f} ms ({theirs / ours:.2f}x)")
    print("\n" + ", ".join(line))


@pytest.fixture(scope="module")
def batch_48():
    images = fer_images(4096)
    source = "FER2013"
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (4096, 48, 48), dtype=np.uint8)
        source = "random"
    return images, source


def cv2_loop(images):
    return [cv2.Canny(cv2.GaussianBlur(img, (KSIZE, KSIZE), 0), LOW, HIGH) for img in images]


def kornia_canny(batch):
    import kornia

    x = batch.float().div_(255)
    return kornia.filters.canny(x, LOW / 255, HIGH / 255, kernel_size=(KSIZE, KSIZE))[1]


@pytest.mark.benchmark(group="canny 4096 x 48x48")
def test_canny_batch_48x48(benchmark, batch_48):
    images, source = batch_48
    batch = torch.from_numpy(images)[:, None]
    benchmark.extra_info["images"] = source
    benchmark.pedantic(ops.canny, args=(batch, LOW, HIGH), kwargs={"ksize": KSIZE}, rounds=15, warmup_rounds=2)
    record(
        benchmark,
        f"canny 4096 x 48x48 {source}",
        {"cv2_loop": lambda: cv2_loop(images)},
        repeat=5,
    )
    # kornia takes about 50 ms an image here (its hysteresis iterates to convergence): time a
    # slice and scale it to the batch. Its iterations grow with the batch, so this flatters kornia.
    part = batch[:KORNIA_IMAGES]
    theirs = median_seconds(lambda: kornia_canny(part), 1) * len(batch) / len(part)
    ours = benchmark.stats.stats.median
    benchmark.extra_info["kornia_ms_scaled"] = theirs * 1e3
    benchmark.extra_info["speedup_vs_kornia"] = theirs / ours
    print(f"kornia {KORNIA_IMAGES} images scaled to {len(batch)}: {theirs * 1e3:.0f} ms ({theirs / ours:.1f}x)")


@pytest.mark.benchmark(group="canny 4096 x 48x48")
def test_cv2_loop_batch_48x48(benchmark, batch_48):
    benchmark.pedantic(cv2_loop, args=(batch_48[0],), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="canny 1920x1080")
def test_canny_1080p(benchmark):
    picture = picture_1080p()
    img = torch.from_numpy(picture)
    benchmark.pedantic(ops.canny, args=(img, LOW, HIGH), kwargs={"ksize": KSIZE}, rounds=40, warmup_rounds=3)
    record(
        benchmark,
        "canny 1920x1080",
        {"cv2": lambda: cv2.Canny(cv2.GaussianBlur(picture, (KSIZE, KSIZE), 0), LOW, HIGH)},
        repeat=40,
    )


@pytest.mark.benchmark(group="canny 1920x1080")
def test_cv2_1080p(benchmark):
    picture = picture_1080p()
    benchmark.pedantic(
        lambda: cv2.Canny(cv2.GaussianBlur(picture, (KSIZE, KSIZE), 0), LOW, HIGH), rounds=40, warmup_rounds=3
    )
