"""Canny on the CPU: fercuda against what a user would otherwise call, in one process.

    python -m pytest benchmarks/bench_canny_cpu.py --benchmark-only

Both sides use the same number of threads: torch's (FERCUDA_BENCH_THREADS overrides it), given
to cv2 with cv2.setNumThreads. Each fercuda benchmark also times its peers and records the
speed-ups (peer time / fercuda time, medians) in benchmark.extra_info, and prints them. Inputs,
peers and timer: fercuda.compare (the same as `make compare`'s); FER2013 from
fercuda.data.default_fer2013_root() (FERCUDA_FER2013).
"""

import os

import cv2
import numpy as np
import pytest
import torch

from fercuda import ops
from fercuda.compare import median_ms
from fercuda.compare.canny import HIGH, KSIZE, LOW, cv2_canny, fer_images, kornia_canny, picture_1080p

THREADS = int(os.environ.get("FERCUDA_BENCH_THREADS", torch.get_num_threads()))
KORNIA_IMAGES = 128


@pytest.fixture(scope="module", autouse=True)
def same_threads():
    torch.set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)


def fercuda_seconds(benchmark, fn):
    """fercuda's median as pytest-benchmark measured it (one timed call of fn under --benchmark-disable)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else median_ms(fn, 1) / 1e3


def record(benchmark, case, ours, peers, repeat):
    """Times each peer, stores fercuda's speed-up over it (ours: fercuda's seconds), and prints the line."""
    benchmark.extra_info["threads"] = THREADS
    benchmark.extra_info["fercuda_ms"] = ours * 1e3
    line = [f"{case} ({THREADS} threads): fercuda {ours * 1e3:.2f} ms"]
    for name, fn in peers.items():
        theirs = median_ms(fn, repeat) / 1e3
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


@pytest.fixture(scope="module")
def picture():
    return picture_1080p()[0]


@pytest.mark.benchmark(group="canny 4096 x 48x48")
def test_canny_batch_48x48(benchmark, batch_48):
    images, source = batch_48
    batch = torch.from_numpy(images)[:, None]
    benchmark.extra_info["images"] = source
    benchmark.pedantic(ops.canny, args=(batch, LOW, HIGH), kwargs={"ksize": KSIZE}, rounds=15, warmup_rounds=2)
    ours = fercuda_seconds(benchmark, lambda: ops.canny(batch, LOW, HIGH, ksize=KSIZE))
    record(
        benchmark,
        f"canny 4096 x 48x48 {source}",
        ours,
        {"cv2_loop": lambda: cv2_canny(images)},
        repeat=5,
    )
    # kornia takes about 50 ms an image here (its hysteresis iterates to convergence): time a
    # slice and scale it to the batch. Its iterations grow with the batch, so this flatters kornia.
    part = batch[:KORNIA_IMAGES]
    theirs = median_ms(kornia_canny(part), 1) / 1e3 * len(batch) / len(part)
    benchmark.extra_info["kornia_ms_scaled"] = theirs * 1e3
    benchmark.extra_info["speedup_vs_kornia"] = theirs / ours
    print(f"kornia {KORNIA_IMAGES} images scaled to {len(batch)}: {theirs * 1e3:.0f} ms ({theirs / ours:.1f}x)")


@pytest.mark.benchmark(group="canny 4096 x 48x48")
def test_cv2_loop_batch_48x48(benchmark, batch_48):
    benchmark.pedantic(cv2_canny, args=(batch_48[0],), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="canny 1920x1080")
def test_canny_1080p(benchmark, picture):
    img = torch.from_numpy(picture)
    benchmark.pedantic(ops.canny, args=(img, LOW, HIGH), kwargs={"ksize": KSIZE}, rounds=40, warmup_rounds=3)
    record(
        benchmark,
        "canny 1920x1080",
        fercuda_seconds(benchmark, lambda: ops.canny(img, LOW, HIGH, ksize=KSIZE)),
        {"cv2": lambda: cv2_canny(picture)},
        repeat=40,
    )


@pytest.mark.benchmark(group="canny 1920x1080")
def test_cv2_1080p(benchmark, picture):
    benchmark.pedantic(cv2_canny, args=(picture,), rounds=40, warmup_rounds=3)
