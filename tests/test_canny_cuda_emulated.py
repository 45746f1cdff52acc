"""The CUDA device code (csrc/cuda/canny_kernels.cuh) compiled for the CPU against cv2.

tests/cuda_emulation.h stands in for the CUDA built-ins (threads, barriers, warp shuffles,
atomics), so the fused kernel's halos, shared-memory layout, block loop and bitmask
hysteresis, and the union-find kernels, are checked on machines without a GPU. The host side
(canny_cuda.cu) and real GPU scheduling are covered by tests/test_canny_cuda.py on a GPU.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from canny_reference import blurred, canny_batch, hysteresis_reference, paper_pq, smooth_random

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    lib = tmp_path_factory.mktemp("emu") / "canny_emulated.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", f"-I{REPO / 'csrc' / 'include'}",
           f"-I{REPO / 'csrc' / 'cuda'}", str(REPO / "tests" / "canny_cuda_emulated.cpp"), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def _p(a):
    return ctypes.c_void_p(a.ctypes.data)


def _canny(emu, img, low, high, ksize=5, l2=False, gradient="sobel", tile=0, grid=None):
    a = np.ascontiguousarray(img.numpy())
    n, h, w = a.shape
    out = np.full(a.shape, 77, np.uint8)  # poison: every pixel must be written
    if grid is None:
        grid = n if tile == 0 else n * -(-h // tile) * -(-w // tile)
    emu.emu_canny(_p(a), _p(out), ctypes.c_int64(n), h, w, ctypes.c_double(low), ctypes.c_double(high), ksize,
                  int(l2), int(gradient == "paper"), tile, ctypes.c_uint(grid))
    return torch.from_numpy(out)


def _assert_equal(out, expected, what):
    diff = int((out != expected).sum())
    assert diff == 0, f"{what}: {diff} of {expected.numel()} pixels differ from cv2"


@pytest.mark.parametrize("shape", [(2, 48, 48), (2, 7, 13), (1, 1, 1), (1, 1, 20), (1, 20, 1), (1, 64, 64),
                                   (1, 3, 2)])
def test_whole_image_path(rng, emu, shape):
    img = smooth_random(rng, shape)
    _assert_equal(_canny(emu, img, 20, 60), canny_batch(img, 20, 60), f"canny {shape}")


@pytest.mark.parametrize("ksize", [0, 3, 7])
@pytest.mark.parametrize("gradient, l2", [("sobel", True), ("paper", False), ("paper", True)])
def test_whole_image_options(rng, emu, ksize, gradient, l2):
    img = smooth_random(rng, (1, 48, 48))
    _assert_equal(_canny(emu, img, 25, 70, ksize, l2, gradient), canny_batch(img, 25, 70, ksize, l2, gradient),
                  f"canny {ksize} {gradient} {l2}")


def test_whole_image_block_loop(rng, emu):
    # Fewer blocks than images: each block runs several images in turn.
    img = smooth_random(rng, (5, 16, 16))
    _assert_equal(_canny(emu, img, 20, 60, grid=2), canny_batch(img, 20, 60), "canny, 2 blocks")


@pytest.mark.parametrize("shape, tile", [((1, 40, 70), 16), ((2, 19, 23), 8), ((1, 5, 30), 4), ((1, 70, 3), 32)])
@pytest.mark.parametrize("ksize, gradient", [(5, "sobel"), (7, "paper"), (0, "sobel")])
def test_tiled_path(rng, emu, shape, tile, ksize, gradient):
    img = smooth_random(rng, shape)
    _assert_equal(_canny(emu, img, 20, 60, ksize, False, gradient, tile=tile),
                  canny_batch(img, 20, 60, ksize, False, gradient), f"tiled canny {shape} {tile}")


def test_stages(rng, emu):
    img = smooth_random(rng, (2, 11, 37))
    a = np.ascontiguousarray(img.numpy())
    n, h, w = a.shape
    for k in (3, 5, 7):
        out = np.full(a.shape, 77, np.uint8)
        emu.emu_gaussian_blur(_p(a), _p(out), ctypes.c_int64(n), h, w, k)
        assert np.array_equal(out, np.stack([blurred(x, k) for x in a])), k
    dx = np.full(a.shape, 77, np.int16)
    dy = np.full(a.shape, 77, np.int16)
    emu.emu_sobel(_p(a), _p(dx), _p(dy), ctypes.c_int64(n), h, w)
    assert np.array_equal(dx, np.stack([cv2.Sobel(x, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
                                        for x in a]))
    assert np.array_equal(dy, np.stack([cv2.Sobel(x, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
                                        for x in a]))
    p = np.full(a.shape, 7.5, np.float32)
    q = np.full(a.shape, 7.5, np.float32)
    emu.emu_paper_gradient(_p(a), _p(p), _p(q), ctypes.c_int64(n), h, w)
    assert np.array_equal(p, np.stack([paper_pq(x)[0] for x in a]))
    assert np.array_equal(q, np.stack([paper_pq(x)[1] for x in a]))
    for low, high, l2 in [(30, 90, False), (30.7, 80.2, True), (90, 30, False)]:
        labels = np.full(a.shape, 77, np.uint8)
        emu.emu_nms(_p(dx), _p(dy), _p(labels), ctypes.c_int64(n), h, w, ctypes.c_double(low),
                    ctypes.c_double(high), int(l2))
        edges = np.full(a.shape, 77, np.uint8)
        emu.emu_hysteresis(_p(labels), _p(edges), ctypes.c_int64(n), h, w)
        expected = np.stack([cv2.Canny(x, y, low, high, L2gradient=l2) for x, y in zip(dx, dy)])
        assert np.array_equal(edges, expected), (low, high, l2)


def test_hysteresis_random_labels(rng, emu):
    labels = torch.multinomial(torch.tensor([0.4, 0.55, 0.05]), 2 * 40 * 50, replacement=True,
                               generator=rng).to(torch.uint8).reshape(2, 40, 50)
    a = np.ascontiguousarray(labels.numpy())
    out = np.full(a.shape, 77, np.uint8)
    emu.emu_hysteresis(_p(a), _p(out), ctypes.c_int64(2), 40, 50)
    _assert_equal(torch.from_numpy(out), hysteresis_reference(labels), "hysteresis")


@pytest.mark.parametrize("l2", [False, True])
def test_nms_full_range_int16(rng, emu, l2):
    # Hand-made gradients reach -32768, where cv2's |v| depends on the column.
    n, h, w = 2, 9, 37
    dx = torch.randint(-32768, 32768, (n, h, w), dtype=torch.int16, generator=rng)
    dy = torch.randint(-32768, 32768, (n, h, w), dtype=torch.int16, generator=rng)
    for t in (dx, dy):
        t.view(-1)[torch.randint(0, t.numel(), (t.numel() // 10,), generator=rng)] = -32768
    gx, gy = dx.numpy().copy(), dy.numpy().copy()
    labels = np.full(gx.shape, 77, np.uint8)
    emu.emu_nms(_p(gx), _p(gy), _p(labels), ctypes.c_int64(n), h, w, ctypes.c_double(20000.0),
                ctypes.c_double(40000.0), int(l2))
    edges = np.full(gx.shape, 77, np.uint8)
    emu.emu_hysteresis(_p(labels), _p(edges), ctypes.c_int64(n), h, w)
    expected = np.stack([cv2.Canny(x, y, 20000.0, 40000.0, L2gradient=l2) for x, y in zip(gx, gy)])
    assert np.array_equal(edges, expected)


@pytest.mark.parametrize("low, high", [(20, float("inf")), (float("inf"), float("inf")), (20, 1e6)])
def test_huge_thresholds(rng, emu, low, high):
    img = smooth_random(rng, (2, 20, 24))
    _assert_equal(_canny(emu, img, low, high), canny_batch(img, low, high), f"canny {low} {high}")
    _assert_equal(_canny(emu, img, low, high, tile=8), canny_batch(img, low, high), f"tiled canny {low} {high}")
