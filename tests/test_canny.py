"""The Canny family (gaussian_blur, sobel, paper_gradient, nms, hysteresis, canny) against OpenCV,
bit for bit, on every backend:

  cpu       the C++ CPU kernels (fercuda.ops on CPU tensors)
  cuda      the CUDA kernels (CUDA tensors; needs_cuda: skipped without a GPU)
  triton    the Triton Canny (fercuda.ops.canny(backend="triton")): on CUDA tensors where a GPU
            is, else on CPU tensors under TRITON_INTERPRET=1 (~12 ms a program: small inputs only)
  emulated  the CUDA device code (csrc/cuda/canny_kernels.cuh) compiled for the CPU with
            tests/cuda_emulation.h standing in for the CUDA built-ins, called through ctypes
            (tests/canny_cuda_emulated.cpp): the kernels' halos, shared memory, block loop and
            union-find checked without a GPU; the host side (canny_cuda.cu) needs the cuda cases

Shared tests take the backend as a parameter and run one body for each; the backends a test runs
on are those whose kernels its logic applies to (the stage ops have no Triton kernels; layouts,
empty batches and numpy arrays belong to the host side, not the emulated device code), and
triton and emulated get the small inputs. What only one backend has is at the end, one section
each. Node ids: "cuda" or "triton" in every GPU case, "cpu" in none of them; "emulated" cases
run on the CPU and name neither (benchmarks/gpu_check.py selects with -k).

References (tests/canny_reference.py): cv2, and numpy in float64 for the paper's gradient.
Inputs: fresh random noise and smoothed noise (the `rng` fixture prints its seed), and real
FER2013 photographs, alone, tiled and upscaled.
"""

import ctypes
import math
import os

import cv2
import numpy as np
import pytest
import torch

import fercuda
from fercuda import _build_info, ops
from canny_reference import (blur_batch, blurred, canny_batch, canny_from_gradients, canny_one, fer_picture,
                             hysteresis_reference, load_fer, noise, paper_batch, paper_pq, per_image, smooth_random,
                             sobel_batch, sobel_one)
from cuda_emulation import build_emulation

CANNY_OPS = ["gaussian_blur", "sobel", "paper_gradient", "nms", "hysteresis", "canny"]
KSIZES = [0, 3, 5, 7]

# ==== backends ==================================================================================

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_TRITON_RUNS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
_MARKS = {
    "cpu": [],
    "cuda": [pytest.mark.needs_cuda],
    "triton": [pytest.mark.skipif(not _TRITON_RUNS, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")],
    "emulated": [],
}
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": TRITON_DEVICE, "emulated": "cpu"}
ALL = ("cpu", "cuda", "triton", "emulated")
STAGES = ("cpu", "cuda", "emulated")  # the backends with kernels for every stage op
HOST = ("cpu", "cuda", "triton")  # the backends behind fercuda.ops.canny(backend=...)
CPP = ("cpu", "cuda")
EMULATED_PIXELS = 70_000  # the emulation runs images up to this size (each in well under a second)


def backends(*names):
    """pytest.param per backend name, with its marks and its name as the id."""
    return [pytest.param(n, marks=_MARKS[n], id=n) for n in names]


def _id(v):
    if isinstance(v, tuple) and all(isinstance(x, int) for x in v):
        return "x".join(map(str, v))
    return str(v)


def cases(values, *, triton=None, emulated=None, multi=False, backends=CPP, gpu_only=False):
    """pytest.params (backend, *case): `values` for the C++ backends, the `triton` and `emulated`
    lists (None: not run there) for the slow ones. A case is one argument, or with multi=True a
    tuple of them. gpu_only: cuda, and triton on CUDA tensors only."""
    out = []
    for name, vals in (*((b, values) for b in backends), ("triton", triton), ("emulated", emulated)):
        if vals is None or (gpu_only and name in ("cpu", "emulated")):
            continue
        marks = [pytest.mark.needs_cuda] if gpu_only else _MARKS[name]
        for v in vals:
            args = v if multi else (v,)
            out.append(pytest.param(name, *args, marks=marks, id="-".join([name, *map(_id, args)])))
    return out


def small(shapes, pixels=EMULATED_PIXELS):
    """The shapes (or cases whose first element is the shape) of at most `pixels` per image."""
    shape = lambda v: v[0] if isinstance(v[0], tuple) else v  # noqa: E731
    return [v for v in shapes if math.prod(shape(v)[-2:]) <= pixels]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation(tmp_path_factory, "canny_cuda_emulated.cpp")


def _p(a):
    return ctypes.c_void_p(a.ctypes.data)


def _flat(t, dtype):
    """A tensor of any accepted shape as a contiguous (N, H, W) numpy array."""
    a = np.ascontiguousarray(t.cpu().numpy())
    assert a.dtype == dtype, a.dtype
    return a.reshape(-1, *a.shape[-2:])


def emu_canny(emu, img, low, high, ksize=5, l2=False, gradient="sobel", tile=0, grid=None):
    """canny_cuda's two paths as planned by plan_fused; tile > 0 forces the tiled path with tile x
    tile blocks, grid is the number of emulated blocks. The output starts poisoned (77)."""
    a = _flat(img, np.uint8)
    n, h, w = a.shape
    out = np.full(a.shape, 77, np.uint8)
    if grid is None:
        grid = n if tile == 0 else n * -(-h // tile) * -(-w // tile)
    emu.emu_canny(_p(a), _p(out), ctypes.c_int64(n), h, w, ctypes.c_double(low), ctypes.c_double(high), ksize,
                  int(l2), int(gradient == "paper"), tile, ctypes.c_uint(grid))
    return torch.from_numpy(out).reshape(img.shape)


class Kernels:
    """One backend's Canny family on tensors of its device (inputs are moved there); the outputs
    stay on that device. The emulated kernels write into poisoned outputs."""

    def __init__(self, name, emu=None):
        self.name, self.device, self._emu = name, DEVICE[name], emu
        self.slow = name in ("triton", "emulated")

    def to(self, t):
        return t.to(self.device)

    def canny(self, img, low=50, high=150, ksize=5, l2=False, gradient="sobel"):
        if self.name == "emulated":
            return emu_canny(self._emu, img, low, high, ksize, l2, gradient)
        return ops.canny(self.to(img), low, high, ksize=ksize, l2_gradient=l2, gradient=gradient, backend=self.name)

    def gaussian_blur(self, img, ksize=5):
        if self.name != "emulated":
            return ops.gaussian_blur(self.to(img), ksize)
        a = _flat(img, np.uint8)
        out = np.full(a.shape, 77, np.uint8)
        self._emu.emu_gaussian_blur(_p(a), _p(out), ctypes.c_int64(a.shape[0]), a.shape[1], a.shape[2], ksize)
        return torch.from_numpy(out).reshape(img.shape)

    def sobel(self, img):
        if self.name != "emulated":
            return ops.sobel(self.to(img))
        a = _flat(img, np.uint8)
        dx, dy = np.full(a.shape, 77, np.int16), np.full(a.shape, 77, np.int16)
        self._emu.emu_sobel(_p(a), _p(dx), _p(dy), ctypes.c_int64(a.shape[0]), a.shape[1], a.shape[2])
        return torch.from_numpy(dx).reshape(img.shape), torch.from_numpy(dy).reshape(img.shape)

    def paper_gradient(self, img):
        if self.name != "emulated":
            return ops.paper_gradient(self.to(img))
        a = _flat(img, np.uint8)
        p, q = np.full(a.shape, 7.5, np.float32), np.full(a.shape, 7.5, np.float32)
        self._emu.emu_paper_gradient(_p(a), _p(p), _p(q), ctypes.c_int64(a.shape[0]), a.shape[1], a.shape[2])
        return torch.from_numpy(p).reshape(img.shape), torch.from_numpy(q).reshape(img.shape)

    def nms(self, dx, dy, low, high, l2=False):
        if self.name != "emulated":
            return ops.nms(self.to(dx), self.to(dy), low, high, l2_gradient=l2)
        gx, gy = _flat(dx, np.int16), _flat(dy, np.int16)
        labels = np.full(gx.shape, 77, np.uint8)
        self._emu.emu_nms(_p(gx), _p(gy), _p(labels), ctypes.c_int64(gx.shape[0]), gx.shape[1], gx.shape[2],
                          ctypes.c_double(low), ctypes.c_double(high), int(l2))
        return torch.from_numpy(labels).reshape(dx.shape)

    def hysteresis(self, edge_map):
        if self.name != "emulated":
            return ops.hysteresis(self.to(edge_map))
        a = _flat(edge_map, np.uint8)
        out = np.full(a.shape, 77, np.uint8)
        self._emu.emu_hysteresis(_p(a), _p(out), ctypes.c_int64(a.shape[0]), a.shape[1], a.shape[2])
        return torch.from_numpy(out).reshape(edge_map.shape)


@pytest.fixture
def kernels(request, backend):
    return Kernels(backend, request.getfixturevalue("emu") if backend == "emulated" else None)


# ==== helpers ===================================================================================


def poison_heap(device, nbytes):
    """Leave freed memory full of 0xA5 so an output element the kernel forgets is likely visible
    (on CUDA, in the caching allocator's blocks)."""
    torch.full((max(nbytes, 1),), 0xA5, dtype=torch.uint8, device=device)


def image(kind, rng, shape):
    return noise(rng, *shape) if kind == "noise" else smooth_random(rng, shape)


def assert_equal(out, expected, what=""):
    """Same shape, dtype and every element; expected is a CPU tensor or a numpy array."""
    expected = torch.from_numpy(np.ascontiguousarray(expected)) if isinstance(expected, np.ndarray) else expected
    out = torch.from_numpy(np.ascontiguousarray(out)) if isinstance(out, np.ndarray) else out.cpu()
    assert out.shape == expected.shape and out.dtype == expected.dtype, (what, out.shape, out.dtype,
                                                                        expected.shape, expected.dtype)
    diff = int((out != expected).sum())
    assert diff == 0, f"{what}: {diff} of {expected.numel()} elements differ from the reference"


def assert_canny_equal(kernels, batch, low, high, ksize=5, l2=False, gradient="sobel"):
    """kernels.canny of a batch (poisoned memory first) equals cv2 image by image; returns cv2's."""
    poison_heap(kernels.device, batch.numel())
    out = kernels.canny(batch, low, high, ksize, l2, gradient)
    assert out.dtype == torch.uint8 and out.shape == batch.shape and out.device.type == kernels.device
    out = out.cpu()
    assert not bool(((out != 0) & (out != 255)).any()), "values other than 0 and 255"
    expected = canny_batch(batch, low, high, ksize, l2, gradient)
    h, w = batch.shape[-2:]
    bad = (out.reshape(-1, h * w) != expected.reshape(-1, h * w)).any(1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} of {want.shape[0]} images differ from cv2, first {bad[:5]}"
    return expected


@pytest.fixture(scope="module")
def fer_test_images(fer2013_dir):
    return load_fer(fer2013_dir, "test")


@pytest.fixture(scope="module")
def fer_train_images(fer2013_dir):
    return load_fer(fer2013_dir, "train", 600)


# ==== every backend: smoke and cardinality =======================================================


@pytest.mark.parametrize("backend", backends(*ALL))
def test_smoke(kernels, rng):
    img = noise(rng, 48, 48)
    out = kernels.canny(img)
    assert out.dtype == torch.uint8 and out.shape == (48, 48) and out.is_contiguous()
    assert_equal(out, canny_one(img.numpy(), 50, 150))


@pytest.mark.parametrize("backend", backends(*ALL))
def test_smoke_batch(kernels, rng):
    expected = assert_canny_equal(kernels, smooth_random(rng, (3, 16, 16)), 20, 60)
    assert 0 < int((expected > 0).sum()) < expected.numel()  # the case holds edges and non-edges


@pytest.mark.parametrize("backend", backends(*STAGES))
@pytest.mark.parametrize("shape", [(13, 17), (3, 13, 17), (3, 1, 13, 17)], ids=_id)
def test_cardinality(kernels, rng, shape):
    img = noise(rng, *shape)
    assert kernels.gaussian_blur(img).shape == shape
    assert [(t.shape, t.dtype) for t in kernels.sobel(img)] == [(shape, torch.int16)] * 2
    assert [(t.shape, t.dtype) for t in kernels.paper_gradient(img)] == [(shape, torch.float32)] * 2
    dx, dy = kernels.sobel(img)
    edge_map = kernels.nms(dx, dy, 50, 150)
    assert edge_map.shape == shape and edge_map.dtype == torch.uint8
    assert set(torch.unique(edge_map).tolist()) <= {0, 1, 2}
    assert kernels.hysteresis(edge_map).shape == shape
    assert kernels.canny(img).shape == shape


# ==== every backend with stage kernels: each stage against cv2 ===================================

# Single noise images of odd sizes, batches of two of the CUDA kernels' block edges, and the 1080p.
STAGE_SIZES = [(1, 1), (1, 9), (9, 1), (2, 9), (9, 2), (3, 3), (5, 7), (7, 5), (17, 33), (47, 49), (48, 48),
               (64, 31), (1080, 1920)]
BATCH_SIZES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (7, 13), (16, 16), (48, 48), (63, 64), (64, 64), (65, 64),
               (64, 65), (100, 37), (257, 129), (1080, 1920)]
BLUR_CASES = ([("noise", s) for s in STAGE_SIZES] + [("smooth", (2, *s)) for s in BATCH_SIZES]
              + [("smooth", (2, 11, 37))])
GRADIENT_CASES = ([("noise", s) for s in STAGE_SIZES] + [("noise", (2, *s)) for s in BATCH_SIZES]
                  + [("smooth", (2, 11, 37))])


# The emulation's grid-stride stage kernels: a pixel, a row, a column, a block edge, and a batch.
EMULATED_STAGE_CASES = [("noise", (1, 1)), ("noise", (9, 2)), ("noise", (2, 1, 7)), ("noise", (2, 65, 64)),
                        ("smooth", (2, 11, 37))]


@pytest.mark.parametrize("ksize", [3, 5, 7])
@pytest.mark.parametrize("backend, kind, shape", cases(BLUR_CASES, emulated=EMULATED_STAGE_CASES, multi=True))
def test_gaussian_blur_matches_cv2(kernels, rng, kind, shape, ksize):
    img = image(kind, rng, shape)
    poison_heap(kernels.device, img.numel())
    assert_equal(kernels.gaussian_blur(img, ksize), blur_batch(img, ksize), "gaussian_blur")


@pytest.mark.parametrize("backend, kind, shape",
                         cases(GRADIENT_CASES, emulated=EMULATED_STAGE_CASES, multi=True))
def test_sobel_matches_cv2(kernels, rng, kind, shape):
    img = image(kind, rng, shape)
    poison_heap(kernels.device, 2 * img.numel())
    dx, dy = kernels.sobel(img)
    ref_dx, ref_dy = sobel_batch(img)
    assert_equal(dx, ref_dx, "sobel dx")
    assert_equal(dy, ref_dy, "sobel dy")


@pytest.mark.parametrize("backend, kind, shape",
                         cases(GRADIENT_CASES, emulated=EMULATED_STAGE_CASES, multi=True))
def test_paper_gradient_matches_reference(kernels, rng, kind, shape):
    img = image(kind, rng, shape)
    poison_heap(kernels.device, 4 * img.numel())
    p, q = kernels.paper_gradient(img)
    assert p.dtype == torch.float32 and q.dtype == torch.float32
    ref_p, ref_q = paper_batch(img, np.float64)
    assert_equal(p.double(), ref_p, "paper P")
    assert_equal(q.double(), ref_q, "paper Q")


# Single images through a sweep of thresholds; batches of two (large ones too) at one pair.
NMS_THRESHOLDS = {"sweep": [(0, 0), (100, 3000), (20000, 40000), (5000.5, 60000.9), (1e9, math.inf)],
                  "20000-40000": [(20000, 40000)]}
NMS_CASES = ([(s, "sweep") for s in [(1, 1), (1, 23), (23, 1), (2, 9), (7, 8), (9, 17), (64, 100), (300, 517)]]
             + [((2, *s), "20000-40000") for s in [(1, 1), (5, 9), (37, 70), (1080, 1920), (9, 37)]])


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("backend, shape, thresholds", cases(NMS_CASES, multi=True, emulated=[((1, 1), "sweep"), ((7, 8), "sweep"), ((2, 9, 37), "20000-40000")]))
def test_nms_hysteresis_full_range_int16_matches_cv2(kernels, rng, shape, thresholds, l2):
    # Hand-made gradients: the extremes, where cv2's 16- and 32-bit arithmetic wraps (and its |v|
    # of -32768 depends on the column), at random places.
    dx = torch.randint(-32768, 32768, shape, dtype=torch.int16, generator=rng)
    dy = torch.randint(-32768, 32768, shape, dtype=torch.int16, generator=rng)
    for t in (dx, dy):
        t.view(-1)[torch.randint(0, t.numel(), (max(1, t.numel() // 10),), generator=rng)] = -32768
        t.view(-1)[torch.randint(0, t.numel(), (max(1, t.numel() // 20),), generator=rng)] = 32767
    for low, high in NMS_THRESHOLDS[thresholds]:
        poison_heap(kernels.device, dx.numel())
        edge_map = kernels.nms(dx, dy, low, high, l2)
        assert set(torch.unique(edge_map).tolist()) <= {0, 1, 2}
        assert_equal(kernels.hysteresis(edge_map), canny_from_gradients(dx, dy, low, high, l2), (low, high))


SOBEL_NMS_TRIPLES = [(40, 120, False), (30.7, 80.2, True), (90, 30, False), (0, 0, False)]


@pytest.mark.parametrize("backend, shape, low, high, l2", cases(
    [((2, *s), *t) for s in [(1, 1), (5, 3), (48, 48), (64, 65), (300, 200), (1080, 1920)] for t in SOBEL_NMS_TRIPLES],
    emulated=[((2, 11, 37), 30, 90, False), ((2, 11, 37), 30.7, 80.2, True), ((2, 11, 37), 90, 30, False)]
    + [((2, *s), *t) for s in [(5, 3), (64, 65)] for t in SOBEL_NMS_TRIPLES], multi=True))
def test_nms_hysteresis_equal_cv2_canny_from_gradients(kernels, rng, shape, low, high, l2):
    img = smooth_random(rng, shape)
    dx, dy = sobel_batch(blur_batch(img, 5))
    labels = kernels.nms(dx, dy, low, high, l2)
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2}
    expected = canny_from_gradients(dx, dy, low, high, l2)
    assert_equal(kernels.hysteresis(labels), expected, "hysteresis(nms(dx, dy))")
    # Strong pixels are edges; every edge was a candidate.
    lab = labels.cpu()
    assert not bool(((lab == 2) & (expected == 0)).any()) and not bool(((expected > 0) & (lab == 0)).any())


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("backend", backends(*CPP))
def test_nms_hysteresis_sobel_gradients_match_cv2(kernels, fer_test_images, rng, l2):
    picture = fer_picture(fer_test_images, 600, 800, rng)
    dx, dy = sobel_one(cv2.GaussianBlur(picture, (5, 5), 0))
    for low, high in [(50, 150), (10, 400), (150, 50)]:
        out = kernels.hysteresis(kernels.nms(torch.from_numpy(dx), torch.from_numpy(dy), low, high, l2))
        assert_equal(out, cv2.Canny(dx, dy, low, high, L2gradient=l2))


LABEL_SHAPES = [(2, *s) for s in [(1, 1), (9, 70), (64, 64), (513, 257), (2048, 2048), (40, 50)]]


@pytest.mark.parametrize("backend, shape", cases(LABEL_SHAPES, emulated=small(LABEL_SHAPES)))
def test_hysteresis_random_labels(kernels, rng, shape):
    # Random label maps have long winding weak chains, the hard case of union-find.
    labels = torch.multinomial(torch.tensor([0.45, 0.5, 0.05]), math.prod(shape), replacement=True,
                               generator=rng).to(torch.uint8).reshape(shape)
    assert_equal(kernels.hysteresis(labels), hysteresis_reference(labels), "hysteresis")


@pytest.mark.parametrize("backend", backends(*STAGES))
def test_hysteresis_treats_unknown_labels_as_not_edges(kernels, rng):
    edge_map = torch.randint(0, 3, (40, 50), dtype=torch.uint8, generator=rng)
    junk = edge_map.clone()
    junk[junk == 0] = torch.randint(3, 256, junk.shape, dtype=torch.uint8, generator=rng)[junk == 0]
    assert torch.equal(kernels.hysteresis(junk).cpu(), kernels.hysteresis(edge_map).cpu())


@pytest.mark.parametrize("backend", backends(*STAGES))
def test_l2_threshold_is_squared_before_flooring(kernels):
    # A magnitude of 31 (squared 961) and of 30.7^2 = 942.49: floor(30.7)^2 = 900 would keep 930.
    dx = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 30, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.int16)
    dy = torch.zeros_like(dx)
    dx[1, 2] = 30  # 900 <= 942: not an edge
    assert kernels.hysteresis(kernels.nms(dx, dy, 30.7, 30.7, True)).sum() == 0
    assert_equal(kernels.hysteresis(kernels.nms(dx, dy, 30.7, 30.7, True)),
                 cv2.Canny(dx.numpy(), dy.numpy(), 30.7, 30.7, L2gradient=True))
    dx[1, 2] = 31  # 961 > 942
    assert kernels.hysteresis(kernels.nms(dx, dy, 30.7, 30.7, True))[1, 2] == 255


@pytest.mark.parametrize("backend", backends(*STAGES))
def test_infinite_high_threshold_finds_edges_as_cv2(kernels, fer_test_images, rng):
    # cv2 floors an L1 threshold >= 2^31 to INT_MIN (x86 cvtsd2si): high=inf marks every
    # candidate above low strong, rather than none.
    picture = fer_picture(fer_test_images, 120, 160, rng)
    ref = canny_one(picture, 20, math.inf)
    assert ref.any()
    assert_equal(kernels.canny(torch.from_numpy(picture), 20, math.inf), ref)
    dx, dy = kernels.sobel(torch.from_numpy(cv2.GaussianBlur(picture, (5, 5), 0)))
    edge_map = kernels.nms(dx, dy, 20, math.inf)
    assert (edge_map == 2).any() and not (edge_map == 1).any()
    assert_equal(kernels.hysteresis(edge_map), ref)


# ==== every backend: canny against cv2 ===========================================================

CANNY_SIZES = [(1, 1), (1, 20), (20, 1), (2, 3), (7, 13), (16, 16), (33, 47), (48, 48), (64, 64), (64, 65),
               (65, 64), (100, 100), (31, 200), (257, 255), (480, 640), (1080, 1920), (4096, 4096)]
# Three images each, one of the large ones.
CANNY_SIZE_CASES = [((3 if h * w <= 1 << 16 else 1, h, w), 30, 90) for h, w in CANNY_SIZES]


@pytest.mark.parametrize("backend, shape, low, high", cases(
    CANNY_SIZE_CASES, multi=True,
    triton=[((7, 13), 10, 40), ((1, 1), 10, 40), ((1, 20), 10, 40), ((20, 1), 10, 40), ((2, 1, 5, 3), 10, 40)],
    emulated=[((2, 48, 48), 20, 60), ((2, 7, 13), 20, 60), ((1, 1, 1), 20, 60), ((1, 1, 20), 20, 60),
              ((1, 20, 1), 20, 60), ((1, 64, 64), 20, 60), ((1, 3, 2), 20, 60)]
    + [((1, h, w), 30, 90) for h, w in [(64, 65), (65, 64), (100, 100)]]))  # the whole-image path's edge
def test_canny_sizes(kernels, rng, shape, low, high):
    assert_canny_equal(kernels, smooth_random(rng, shape), low, high)


OPTIONS = [(ksize, l2, gradient) for gradient in ("sobel", "paper") for l2 in (False, True) for ksize in KSIZES]


@pytest.mark.parametrize("backend, shape, low, high, ksize, l2, gradient", cases(
    [(shape, 25, 70, *o) for shape in [(2, 48, 48), (2, 13, 64), (2, 300, 301)] for o in OPTIONS], multi=True,
    triton=[((12, 17), 15, 45, *o) for o in OPTIONS if o[2] == "sobel"]
    + [((2, 11, 14), 8, 25, 5, l2, "paper") for l2 in (False, True)],
    emulated=[((1, 48, 48), 25, 70, ksize, l2, gradient) for ksize in (0, 3, 7)
              for gradient, l2 in [("sobel", True), ("paper", False), ("paper", True)]]))
def test_canny_options(kernels, rng, shape, low, high, ksize, l2, gradient):
    assert_canny_equal(kernels, smooth_random(rng, shape), low, high, ksize, l2, gradient)


@pytest.mark.parametrize(
    "low, high, l2",
    [
        (60, 20, False),  # swapped, as cv2 does
        (30, 30, False),
        (0, 0, False),
        (20, math.inf, True),  # L2 clamps to 32767 first: no strong pixel, no edge
        (20, 1e6, False),  # beyond every magnitude: no edge
        (20, math.inf, False),  # cv2 floors values >= 2^31 to INT_MIN: every candidate strong
        (math.inf, math.inf, False),
        (30.7, 80.2, True),  # L2 squares before flooring
        (30.7, 80.2, False),
    ],
)
@pytest.mark.parametrize("backend, shape", cases([(2, 48, 48), (2, 640, 480)], triton=[(10, 12)],
                                                 emulated=[(2, 20, 24)]))
def test_canny_thresholds(kernels, rng, shape, low, high, l2):
    assert_canny_equal(kernels, smooth_random(rng, shape), low, high, 5, l2)


@pytest.mark.parametrize("backend", backends(*ALL))
def test_canny_fer2013(kernels, fer_test_images):
    img = torch.from_numpy(fer_test_images[:2 if kernels.slow else 512]).unsqueeze(1)  # (N, 1, 48, 48)
    assert_canny_equal(kernels, img, 50, 150)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("ksize", KSIZES)
@pytest.mark.parametrize("backend, size", cases([(1, 1), (1, 9), (9, 1), (2, 9), (9, 2), (3, 3), (5, 7), (7, 5),
                                                 (17, 33), (47, 49), (48, 48), (64, 31)]))
def test_canny_noise_matches_cv2(kernels, rng, size, ksize, l2):
    # Noise thresholds scaled so that each size holds weak, strong and suppressed pixels.
    low, high = (40, 120) if ksize else (150, 400)
    assert_canny_equal(kernels, noise(rng, 4, *size), low, high, ksize, l2)


@pytest.mark.parametrize("ksize", KSIZES)
@pytest.mark.parametrize("backend", backends(*CPP))
def test_canny_1080p_noise_matches_cv2(kernels, rng, ksize):
    assert_canny_equal(kernels, noise(rng, 1080, 1920), 40 if ksize else 150, 120 if ksize else 400, ksize)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("thresholds", [(50, 150), (20, 60), (100, 300)], ids=_id)
@pytest.mark.parametrize("backend", backends(*CPP))
def test_canny_fer2013_train_matches_cv2(kernels, fer_train_images, thresholds, l2):
    images = torch.from_numpy(fer_train_images)
    assert_canny_equal(kernels, images, *thresholds, 5, l2)


@pytest.mark.parametrize("backend", backends(*CPP))
def test_canny_all_fer2013_test_in_one_call(kernels, fer_test_images):
    images = torch.from_numpy(fer_test_images)[:, None]  # (N, 1, 48, 48), as a model sees them
    assert images.shape[0] == 7178
    assert_canny_equal(kernels, images, 50, 150)


@pytest.mark.parametrize("size", [(96, 144), (480, 640), (1080, 1920)], ids=_id)
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("backend", backends(*CPP))
def test_canny_photographs_match_cv2(kernels, fer_test_images, rng, size, l2):
    picture = torch.from_numpy(fer_picture(fer_test_images, *size, rng))
    for ksize in (0, 5):
        assert_canny_equal(kernels, picture, 50, 150, ksize, l2)


@pytest.mark.parametrize("backend", backends(*CPP))
def test_canny_4096_photograph_matches_cv2(kernels, fer_test_images, rng):
    assert_canny_equal(kernels, torch.from_numpy(fer_picture(fer_test_images, 4096, 4096, rng)), 30, 90)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize(
    "low, high",
    [
        (150, 50),  # swapped
        (30.7, 90.2),  # floored (L1), squared then floored (L2: 30.7 -> 942, not 900)
        (30.99, 31.01),
        (0, 0),
        (0, 100),
        (1e6, 2e6),  # above every magnitude
        (20, math.inf),
        (math.inf, math.inf),
    ],
)
@pytest.mark.parametrize("backend", backends(*CPP))
def test_canny_thresholds_on_photographs_and_noise(kernels, fer_test_images, rng, low, high, l2):
    picture = torch.from_numpy(fer_picture(fer_test_images, 120, 160, rng))
    assert_canny_equal(kernels, picture, low, high, 5, l2)
    assert_canny_equal(kernels, noise(rng, 3, 40, 56), low, high, 0, l2)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("ksize", [0, 5])
@pytest.mark.parametrize("backend, size", cases([(1, 1), (1, 9), (9, 1), (5, 7), (48, 48), (47, 49)],
                                                emulated=[(47, 49)]))
def test_canny_paper_gradient_matches_cv2(kernels, rng, size, ksize, l2):
    # cv2.Canny of (2P, -2Q) with doubled thresholds, P and Q of the blurred image.
    assert_canny_equal(kernels, noise(rng, 3, *size), 20, 60, ksize, l2, "paper")


@pytest.mark.parametrize("backend", backends(*CPP))
def test_canny_paper_gradient_on_photographs(kernels, fer_test_images):
    assert_canny_equal(kernels, torch.from_numpy(fer_test_images[:200]), 50, 150, 5, False, "paper")


@pytest.mark.parametrize("backend", backends(*HOST))
def test_backend_argument_matches_cv2(backend, rng):
    # backend= picks the kernels; None those of the tensor's device.
    img = noise(rng, 3, 17, 23)
    expected = canny_batch(img, 50, 150)
    assert_equal(ops.canny(img.to(DEVICE[backend]), backend=backend), expected, backend)
    if backend != "triton":
        assert_equal(ops.canny(img.to(DEVICE[backend])), expected, "backend=None")


# ==== every host-side backend: layouts and empty batches =========================================


def layouts(rng, device):
    """Views made on the device."""
    base = noise(rng, 3, 1, 40, 56).to(device)
    return {
        "transposed": base[:, 0].transpose(1, 2),
        "strided": noise(rng, 3, 80, 112).to(device)[:, ::2, ::2],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "batch_slice": noise(rng, 6, 1, 40, 56).to(device)[::2],
        "expanded": noise(rng, 1, 40, 56).to(device).expand(3, 40, 56),
    }


@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last", "batch_slice", "expanded"])
@pytest.mark.parametrize("backend", backends(*CPP))
def test_noncontiguous(kernels, rng, layout):
    img = layouts(rng, kernels.device)[layout]
    dense = img.contiguous()
    out = kernels.canny(img, 30, 90)
    assert out.is_contiguous() and out.shape == img.shape
    assert torch.equal(out, kernels.canny(dense, 30, 90))
    assert_canny_equal(kernels, img.contiguous(), 30, 90)
    assert torch.equal(kernels.gaussian_blur(img, 5), kernels.gaussian_blur(dense, 5))
    for a, b in zip(kernels.sobel(img), kernels.sobel(dense)):
        assert torch.equal(a, b)
    for a, b in zip(kernels.paper_gradient(img), kernels.paper_gradient(dense)):
        assert torch.equal(a, b)
    dx, dy = kernels.sobel(dense)
    edge_map = kernels.nms(dx.transpose(-1, -2).contiguous().transpose(-1, -2), dy, 30, 90)
    assert torch.equal(edge_map, kernels.nms(dx, dy, 30, 90))
    assert torch.equal(kernels.hysteresis(edge_map.transpose(-1, -2)),
                       kernels.hysteresis(edge_map.transpose(-1, -2).contiguous()))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "offset_view"])
@pytest.mark.parametrize("backend", backends(*HOST))
def test_canny_noncontiguous_views(kernels, rng, layout):
    # Views made on the device: channels_last, a transpose, and a view into a larger buffer at an
    # odd offset (not 16-byte aligned).
    if layout == "channels_last":
        img = smooth_random(rng, (2, 1, 9, 10) if kernels.slow else (3, 1, 40, 50))
        view = kernels.to(img).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        img = smooth_random(rng, (13, 9) if kernels.slow else (130, 70))
        view = kernels.to(img).t()
    else:
        shape = (2, 9, 11) if kernels.slow else (2, 48, 48)
        buf = torch.empty(math.prod(shape) + 1, dtype=torch.uint8)
        buf[1:] = smooth_random(rng, shape).flatten()
        view = kernels.to(buf)[1:].reshape(shape)
        assert view.storage_offset() == 1
    out = kernels.canny(view, 30, 90)
    assert out.is_contiguous() and out.device.type == kernels.device
    assert_equal(out, canny_batch(view, 30, 90), layout)


@pytest.mark.parametrize("backend", backends(*CPP))
def test_stages_noncontiguous_views(kernels, rng):
    big = smooth_random(rng, (130, 70))
    assert_equal(kernels.gaussian_blur(kernels.to(big).t(), 5), blur_batch(big.t(), 5), "blur transposed")
    dx, dy = sobel_batch(big)
    lab = kernels.nms(kernels.to(dx).t(), kernels.to(dy).t(), 30.0, 90.0)
    assert lab.shape == (70, 130)
    assert_equal(kernels.hysteresis(lab), canny_from_gradients(dx.t(), dy.t(), 30, 90), "nms transposed")


EMPTY_SHAPES = [(0, 48, 48), (0, 1, 48, 48), (2, 0, 48), (2, 48, 0), (0, 0), (5, 0), (0, 5, 5), (2, 0, 4),
                (0, 4, 4), (3, 0, 5)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_id)
@pytest.mark.parametrize("backend", backends(*HOST))
def test_empty_canny(kernels, shape):
    img = torch.zeros(shape, dtype=torch.uint8, device=kernels.device)
    out = kernels.canny(img)
    assert out.shape == shape and out.numel() == 0 and out.dtype == torch.uint8 and out.device == img.device


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_id)
@pytest.mark.parametrize("backend", backends(*CPP))
def test_empty_stages(kernels, shape):
    img = torch.zeros(shape, dtype=torch.uint8, device=kernels.device)
    for out in (kernels.gaussian_blur(img), *kernels.sobel(img), *kernels.paper_gradient(img),
                kernels.hysteresis(img)):
        assert out.shape == shape and out.numel() == 0 and out.device == img.device
    dx = torch.zeros(shape, dtype=torch.int16, device=kernels.device)
    out = kernels.nms(dx, dx, 10, 20)
    assert out.shape == shape and out.device == img.device


# ==== compiler and dispatcher ====================================================================


def sample_inputs(backend, rng):
    """(op, argument tuples) per op name for opcheck: the C++ ops on the backend's device, the
    Triton op (canny only) on a small image."""
    if backend == "triton":
        img = smooth_random(rng, (1, 6, 7)).to(TRITON_DEVICE)
        return {"canny": (torch.ops.fercuda.canny_triton.default, [(img, 10.0, 40.0, 3, False, "sobel")])}
    img = noise(rng, 2, 1, 21, 34).to(DEVICE[backend])
    dx, dy = ops.sobel(img)
    edge_map = ops.nms(dx, dy, 30, 90)
    samples = {
        "gaussian_blur": [(img, 5), (img[0, 0], 3), (img[:, 0], 7)],
        "sobel": [(img,), (img[0, 0],)],
        "paper_gradient": [(img,), (img[:, 0],)],
        "nms": [(dx, dy, 30.0, 90.0, False), (dx[0, 0], dy[0, 0], 30.7, 90.2, True)],
        "hysteresis": [(edge_map,), (edge_map[:, 0],)],
        "canny": [
            (img, 50.0, 150.0, 5, False, "sobel"),
            (img[:, 0], 20.0, 60.0, 0, True, "sobel"),
            (img[0, 0], 20.0, 60.0, 3, False, "paper"),
        ],
    }
    return {name: (getattr(torch.ops.fercuda, name).default, args) for name, args in samples.items()}


@pytest.mark.parametrize("backend, name", cases(CANNY_OPS, triton=["canny"]))
def test_opcheck(backend, rng, name):
    op, samples = sample_inputs(backend, rng)[name]
    for args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", backends(*CPP))
def test_opcheck_schema(backend, rng):
    img = smooth_random(rng, (2, 20, 20)).to(DEVICE[backend])
    f = torch.ops.fercuda
    for op, args in [(f.canny.default, (img, 30.0, 90.0, 5, False, "sobel")),
                     (f.gaussian_blur.default, (img, 5)),
                     (f.sobel.default, (img,)),
                     (f.hysteresis.default, (img % 3,))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("backend", backends(*CPP))
def test_dynamo(kernels, rng):
    def edges_and_blur(x):
        return kernels.canny(x, 30, 90, ksize=5), kernels.gaussian_blur(x, 3).float().mean()

    compiled = torch.compile(edges_and_blur, fullgraph=True)
    img = kernels.to(noise(rng, 4, 1, 48, 48))
    got, mean = compiled(img)
    want, want_mean = edges_and_blur(img)
    assert torch.equal(got, want) and torch.equal(mean, want_mean)
    got = compiled(kernels.to(noise(rng, 2, 1, 30, 20)))[0]
    assert got.shape == (2, 1, 30, 20)


@pytest.mark.parametrize("backend", backends("cuda", "triton"))  # cpu: test_dynamo
def test_dynamo_canny_matches_cv2(kernels, rng):
    img = smooth_random(rng, (2, 8, 8))
    compiled = torch.compile(lambda x: kernels.canny(x, 10, 40, ksize=3), fullgraph=True)
    assert_equal(compiled(kernels.to(img)), canny_batch(img, 10, 40, ksize=3))


@pytest.mark.parametrize("backend", [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda")])
def test_kernels_registered(backend):
    # A registration, not a run: the cuda case needs a build with CUDA kernels, not a GPU.
    if backend == "cuda" and not _build_info.WITH_CUDA:
        pytest.skip("this build of fercuda._C holds no CUDA kernels")
    for name in CANNY_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fercuda::{name}", backend.upper()), name


# ==== bad input ==================================================================================

# meta runs the fake kernels of fercuda/_meta.py: same checks, same messages.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("meta", id="meta"),
           pytest.param("cuda", marks=pytest.mark.needs_cuda, id="cuda")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
def test_exception_image_dtype(device, dtype):
    img = torch.zeros(8, 8, dtype=dtype, device=device)
    expected = "Float" if dtype == torch.float32 else "Short"
    for fn in (ops.gaussian_blur, ops.sobel, ops.paper_gradient, ops.canny, ops.hysteresis):
        with pytest.raises(RuntimeError, match=f"must be a Byte tensor, got {expected}"):
            fn(img)


@pytest.mark.parametrize("device", DEVICES)
def test_exception_multichannel(device):
    img = torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match=r"fercuda.canny: argument 'img' must have one channel .* \(2, 3, 8, 8\)"):
        ops.canny(img)
    with pytest.raises(RuntimeError, match="must have one channel"):
        ops.sobel(img)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (8,)], ids=_id)
def test_exception_dimensions(device, shape):
    img = torch.zeros(shape, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match=f"fercuda.canny: argument 'img' must have shape .* got a {len(shape)}-D"):
        ops.canny(img)
    with pytest.raises(RuntimeError, match=f"fercuda.gaussian_blur: argument 'img' .* got a {len(shape)}-D"):
        ops.gaussian_blur(img)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.nan, -1.0, -2.0, -math.inf])
def test_exception_threshold(device, bad):
    img = torch.zeros(8, 8, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match="fercuda.canny: argument 'low' must be a number >= 0"):
        ops.canny(img, bad, 100)
    with pytest.raises(RuntimeError, match="fercuda.canny: argument 'high' must be a number >= 0"):
        ops.canny(img, 10, bad)
    dx = torch.zeros(8, 8, dtype=torch.int16, device=device)
    with pytest.raises(RuntimeError, match="fercuda.nms: argument 'high' must be a number >= 0"):
        ops.nms(dx, dx, 10, bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ksize", [-1, 1, 2, 4, 9])
def test_exception_ksize(device, ksize):
    img = torch.zeros(8, 8, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match=f"fercuda.canny: argument 'ksize' must be 0 \\(no blur\\), 3, 5 or 7, got {ksize}"):
        ops.canny(img, ksize=ksize)
    with pytest.raises(RuntimeError, match=f"fercuda.gaussian_blur: argument 'ksize' must be 3, 5 or 7, got {ksize}"):
        ops.gaussian_blur(img, ksize)


@pytest.mark.parametrize("device", DEVICES)
def test_exception_gaussian_blur_ksize_zero(device):
    with pytest.raises(RuntimeError, match="must be 3, 5 or 7, got 0"):
        ops.gaussian_blur(torch.zeros(8, 8, dtype=torch.uint8, device=device), 0)


@pytest.mark.parametrize("device", DEVICES)
def test_exception_gradient_kind(device):
    img = torch.zeros(8, 8, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match="argument 'gradient' must be \"sobel\" or \"paper\", got \"scharr\""):
        ops.canny(img, gradient="scharr")


@pytest.mark.parametrize("device", DEVICES)
def test_exception_nms_shape_mismatch(device):
    dx = torch.zeros(8, 8, dtype=torch.int16, device=device)
    dy = torch.zeros(8, 9, dtype=torch.int16, device=device)
    with pytest.raises(RuntimeError, match=r"fercuda.nms: arguments 'dx' and 'dy' must have the same shape, got \(8, 8\) and \(8, 9\)"):
        ops.nms(dx, dy, 10, 20)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        ops.nms(dx, dx[:4], 1.0, 2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_exception_nms_dtype_mismatch(device):
    dx = torch.zeros(8, 8, dtype=torch.int16, device=device)
    with pytest.raises(RuntimeError, match="fercuda.nms: argument 'dy' must be a Short tensor, got Int"):
        ops.nms(dx, dx.int(), 10, 20)
    with pytest.raises(RuntimeError, match="fercuda.nms: argument 'dx' must be a Short tensor, got Byte"):
        ops.nms(dx.to(torch.uint8), dx, 10, 20)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(img=torch.zeros(4, 4)), "argument 'img' must be a Byte tensor, got Float"),
        (dict(img=torch.zeros(1, 1, 1, 4, 4, dtype=torch.uint8)), "argument 'img' must have shape \\(H, W\\)"),
        (dict(img=torch.zeros(1, 3, 4, 4, dtype=torch.uint8)), "argument 'img' must have one channel"),
        (dict(ksize=4), "argument 'ksize' must be 0 \\(no blur\\), 3, 5 or 7, got 4"),
        (dict(low=math.nan), "argument 'low' must be a number >= 0, got nan"),
        (dict(high=-1.0), "argument 'high' must be a number >= 0, got -1"),
        (dict(gradient="scharr"), "argument 'gradient' must be \"sobel\" or \"paper\""),
    ],
    ids=["dtype", "5d", "channels", "ksize", "low", "high", "gradient"],
)
@pytest.mark.parametrize("backend", backends(*HOST))
def test_exception_canny_arguments(kernels, kwargs, message):
    args = dict(img=torch.zeros(4, 4, dtype=torch.uint8), low=50, high=150)
    args.update(kwargs)
    img = args.pop("img")
    with pytest.raises(RuntimeError, match="fercuda.canny: " + message):
        kernels.canny(img, args.pop("low"), args.pop("high"), **{"l2" if k == "l2_gradient" else k: v
                                                                 for k, v in args.items()})


IMAGE_OPS = ["gaussian_blur", "sobel", "paper_gradient", "hysteresis", "canny"]


@pytest.mark.parametrize("dtype, expected", [(np.float32, "Float"), (np.int16, "Short"), (np.bool_, "Bool")])
def test_exception_numpy_image_dtype(dtype, expected):
    # The tensor's message: the array is the tensor it views.
    img = np.zeros((8, 8), dtype=dtype)
    for name in IMAGE_OPS:
        with pytest.raises(RuntimeError, match=f"fercuda.{name}: argument '.*' must be a Byte tensor, got {expected}"):
            getattr(ops, name)(img)


def test_exception_numpy_nms_dtype():
    dx = np.zeros((8, 8), dtype=np.int16)
    with pytest.raises(RuntimeError, match="fercuda.nms: argument 'dx' must be a Short tensor, got Byte"):
        ops.nms(dx.astype(np.uint8), dx, 10, 20)
    with pytest.raises(RuntimeError, match="fercuda.nms: argument 'dy' must be a Short tensor, got Int"):
        ops.nms(dx, dx.astype(np.int32), 10, 20)


@pytest.mark.parametrize("dtype", ["<U1", "object", "longdouble"])
def test_exception_numpy_dtype_tensors_lack(dtype):
    img = np.zeros((8, 8), dtype=dtype)
    with pytest.raises(TypeError, match="fercuda.canny: argument 'img' must be a torch.Tensor or numpy.ndarray of "
                                        f"uint8, got a numpy.ndarray of {img.dtype}$"):
        ops.canny(img)


@pytest.mark.parametrize("bad, given", [([[0, 1], [2, 3]], "list"), ("img.png", "str"), (True, "bool"),
                                        (None, "NoneType"), (7, "int")])
def test_exception_image_not_a_tensor(bad, given):
    for name in IMAGE_OPS:
        arg = "edge_map" if name == "hysteresis" else "img"
        message = f"fercuda.{name}: argument '{arg}' must be a torch.Tensor or numpy.ndarray of uint8, got {given}$"
        with pytest.raises(TypeError, match=message):
            getattr(ops, name)(bad)
    dx = np.zeros((8, 8), dtype=np.int16)
    with pytest.raises(TypeError, match=f"fercuda.nms: argument 'dx' must be a torch.Tensor or numpy.ndarray of int16, got {given}$"):
        ops.nms(bad, dx, 10, 20)
    with pytest.raises(TypeError, match=f"fercuda.nms: argument 'dy' must be a torch.Tensor or numpy.ndarray of int16, got {given}$"):
        ops.nms(torch.from_numpy(dx), bad, 10, 20)


@pytest.mark.parametrize("backend", [None, "cpu", "triton"], ids=["default", "cpu", "triton"])
@pytest.mark.parametrize("bad, given", [("50", "str"), (True, "bool"), (np.True_, "numpy.bool_?"), (None, "NoneType"),
                                        (50 + 0j, "complex"), (torch.tensor([50.0, 60.0]), "Tensor"),
                                        (torch.tensor(True), "Tensor")])
def test_exception_threshold_type(bad, given, backend):
    # On CPU tensors: the type is checked before the backend.
    img = torch.zeros(8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match=f"fercuda.canny: argument 'low' must be a number >= 0, got {given}$"):
        ops.canny(img, bad, 150, backend=backend)
    with pytest.raises(TypeError, match=f"fercuda.canny: argument 'high' must be a number >= 0, got {given}$"):
        ops.canny(img.numpy(), 50, bad, backend=backend)
    dx = torch.zeros(8, 8, dtype=torch.int16)
    with pytest.raises(TypeError, match=f"fercuda.nms: argument 'low' must be a number >= 0, got {given}$"):
        ops.nms(dx, dx, bad, 150)
    with pytest.raises(TypeError, match=f"fercuda.nms: argument 'high' must be a number >= 0, got {given}$"):
        ops.nms(dx, dx, 50, bad)


@pytest.mark.parametrize("low, high", [(np.float32(30.5), np.int64(90)), (torch.tensor(30.5), torch.tensor(90)),
                                       (30.5, np.float64(90.0))], ids=["numpy", "tensor", "float_numpy"])
@pytest.mark.parametrize("backend", backends(*CPP))
def test_threshold_number_types(kernels, rng, low, high):
    # Real numbers of every kind count as the floats they hold.
    img = noise(rng, 40, 50)
    assert_equal(kernels.canny(img, low, high), canny_one(img.numpy(), 30.5, 90))
    dx, dy = kernels.sobel(img)
    assert torch.equal(kernels.nms(dx, dy, low, high), kernels.nms(dx, dy, 30.5, 90.0))


def test_exception_unknown_backend():
    img = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"fercuda.canny: argument 'backend' must be one of .* got 'opencl'"):
        ops.canny(img, backend="opencl")


def test_exception_backend_not_of_the_tensors_device():
    img = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"fercuda.canny: backend='cuda' needs a tensor on cuda, got a tensor on cpu"):
        ops.canny(img, backend="cuda")


def test_exception_kernel_language_backend_on_host_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor"):
        ops.canny(torch.zeros(4, 4, dtype=torch.uint8), backend="triton")


@pytest.mark.skipif(fercuda.cuda_kernels_built(), reason="this build holds CUDA kernels")
def test_exception_device_tensor_in_a_build_without_device_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # A fake CUDA tensor stands in for a real one on machines without a GPU.
    with FakeTensorMode():
        img = torch.empty(48, 48, dtype=torch.uint8, device="cuda")
        for fn in (ops.canny, ops.gaussian_blur, ops.sobel, ops.paper_gradient, ops.hysteresis):
            with pytest.raises(RuntimeError, match="got a CUDA tensor, but this build of fercuda holds no CUDA kernels"):
                fn(img)
        dx = torch.empty(48, 48, dtype=torch.int16, device="cuda")
        with pytest.raises(RuntimeError, match="fercuda.nms: got a CUDA tensor"):
            ops.nms(dx, dx, 10, 20)


# ==== numpy arrays, as cv2 users hold them (CPU) =================================================


def numpy_images(rng, layout):
    """uint8 numpy images: one, a batch, column slices (img[:, ::2]), and flipped rows (negative strides)."""
    return {
        "2d": noise(rng, 37, 53).numpy(),
        "batch": noise(rng, 3, 37, 53).numpy(),
        "column_slice": noise(rng, 37, 106).numpy()[:, ::2],
        "batch_column_slice": noise(rng, 3, 37, 106).numpy()[:, :, ::2],
        "flipped": noise(rng, 37, 53).numpy()[::-1],
    }[layout]


NUMPY_LAYOUTS = ["2d", "batch", "column_slice", "batch_column_slice", "flipped"]


def assert_numpy_equal(out, ref):
    assert isinstance(out, np.ndarray), type(out)
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_gaussian_blur_matches_cv2(rng, layout):
    a = numpy_images(rng, layout)
    for ksize in (3, 5, 7):
        assert_numpy_equal(ops.gaussian_blur(a, ksize), per_image(lambda i: blurred(i, ksize), a))


@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_sobel_matches_cv2(rng, layout):
    a = numpy_images(rng, layout)
    dx, dy = ops.sobel(a)
    assert_numpy_equal(dx, per_image(lambda i: sobel_one(i)[0], a))
    assert_numpy_equal(dy, per_image(lambda i: sobel_one(i)[1], a))


@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_paper_gradient_matches_reference(rng, layout):
    a = numpy_images(rng, layout)
    p, q = ops.paper_gradient(a)
    assert_numpy_equal(p, per_image(lambda i: paper_pq(i)[0], a))
    assert_numpy_equal(q, per_image(lambda i: paper_pq(i)[1], a))


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_nms_hysteresis_match_cv2(rng, layout, l2):
    # int16 gradients as cv2.Sobel returns them, laid out like the image.
    a = numpy_images(rng, layout)
    dx = per_image(lambda i: sobel_one(cv2.GaussianBlur(i, (5, 5), 0))[0], a)
    dy = per_image(lambda i: sobel_one(cv2.GaussianBlur(i, (5, 5), 0))[1], a)
    if layout.endswith("column_slice"):
        dx, dy = np.repeat(dx, 2, axis=-1)[..., ::2], np.repeat(dy, 2, axis=-1)[..., ::2]
    edge_map = ops.nms(dx, dy, 20, 60, l2_gradient=l2)
    assert isinstance(edge_map, np.ndarray) and edge_map.dtype == np.uint8 and edge_map.shape == a.shape
    assert set(np.unique(edge_map).tolist()) <= {0, 1, 2}
    assert_numpy_equal(ops.hysteresis(edge_map), canny_from_gradients(dx, dy, 20, 60, l2).numpy())
    assert_numpy_equal(ops.hysteresis(edge_map[..., ::-1]), ops.hysteresis(edge_map[..., ::-1].copy()))


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("ksize", [0, 5])
@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_canny_matches_cv2(rng, layout, ksize, l2):
    a = numpy_images(rng, layout)
    assert_numpy_equal(ops.canny(a, 30, 90, ksize=ksize, l2_gradient=l2),
                       per_image(lambda i: canny_one(i, 30, 90, ksize, l2), a))


def test_numpy_infinite_high_threshold_finds_edges_as_cv2(fer_test_images, rng):
    picture = fer_picture(fer_test_images, 120, 160, rng)
    ref = canny_one(picture, 20, math.inf)
    assert ref.any()
    assert_numpy_equal(ops.canny(picture, 20, math.inf), ref)


def test_numpy_foreign_byte_order(rng):
    # Big-endian int16 gradients (as read from a file written elsewhere) hold the same numbers.
    dx, dy = sobel_one(noise(rng, 30, 40).numpy())
    ref = cv2.Canny(dx, dy, 20, 60)
    assert_numpy_equal(ops.hysteresis(ops.nms(dx.astype(">i2"), dy.astype(">i2"), 20, 60)), ref)


def test_numpy_output_shares_the_result_memory(rng):
    # .numpy() of the op's output, not a copy of it: C-contiguous and backed by the tensor.
    out = ops.canny(noise(rng, 2, 1, 20, 30).numpy())
    assert out.shape == (2, 1, 20, 30) and out.flags.c_contiguous and isinstance(out.base, torch.Tensor)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_numpy_canny_backend(rng, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("numpy arrays live on the CPU, where the Triton kernels run only under TRITON_INTERPRET=1")
    a = numpy_images(rng, "batch_column_slice")[:, :9, :13]
    assert_numpy_equal(ops.canny(a, 30, 90, backend=backend), per_image(lambda i: canny_one(i, 30, 90), a))


# ==== the C++ CPU kernels only ===================================================================


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_row_bands_match_cv2(fer_test_images, rng, threads):
    # Large images run as row bands, one or more per thread, with hysteresis joined across
    # band seams; more threads than cores still splits the work.
    kernels = Kernels("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_canny_equal(kernels, torch.from_numpy(fer_picture(fer_test_images, 2048, 2048, rng)), 20, 60)
        picture = torch.from_numpy(fer_picture(fer_test_images, 720, 1280, rng))
        assert_canny_equal(kernels, picture, 20, 60)
        assert_canny_equal(kernels, picture[:, :5].contiguous(), 20, 60)  # tall and thin
        assert_canny_equal(kernels, noise(rng, 2, 400, 700), 40, 120, 3, True)  # few images: banded too
        dx = torch.randint(-32768, 32768, (2000, 2001), dtype=torch.int16, generator=rng)
        dy = torch.randint(-32768, 32768, (2000, 2001), dtype=torch.int16, generator=rng)
        out = ops.hysteresis(ops.nms(dx, dy, 1000, 30000))
        assert_equal(out, canny_from_gradients(dx, dy, 1000, 30000))
    finally:
        torch.set_num_threads(before)


# ==== the CUDA kernels only (and the sanitizers' subset) =========================================


@pytest.mark.parametrize("backend, shape, low, high", cases(
    [((35887, 48, 48), 50, 150)],  # all of FER2013 at once, in one call
    triton=[((35887, 48, 48), 30, 90), ((1080, 1920), 30, 90), ((2, 100, 300), 30, 90), ((1, 70, 64), 30, 90)],
    multi=True, gpu_only=True))
def test_canny_large_on_gpu(kernels, rng, shape, low, high):
    assert_canny_equal(kernels, smooth_random(rng, shape), low, high)


@pytest.mark.parametrize("backend", backends("cuda"))
def test_canny_batch_beyond_int32_indexing(kernels, rng):
    # 2^31 + pixels in one batch: offsets must be 64-bit. Distinct images at the ends.
    n = (1 << 31) // (48 * 48) + 64
    head = smooth_random(rng, (8, 48, 48))
    img = torch.empty((n, 48, 48), dtype=torch.uint8, device="cuda")
    img[:] = head[0].cuda()
    img[:8] = head.cuda()
    img[-8:] = head.flip(0).cuda()
    out = kernels.canny(img, 50.0, 150.0)
    expected = canny_batch(head, 50, 150)
    assert_equal(out[:8], expected, "first images")
    assert_equal(out[-8:], expected.flip(0), "last images")
    del img, out
    # The stage kernels too.
    dx, dy = kernels.sobel(torch.zeros((n, 48, 48), dtype=torch.uint8, device="cuda"))
    assert int(dx[-1].abs().sum()) == 0


@pytest.mark.parametrize("backend", backends("cuda"))
def test_exception_devices_differ(backend):
    img = torch.zeros(8, 8, dtype=torch.int16, device="cuda")
    with pytest.raises(RuntimeError, match="must be on the same device"):
        torch.ops.fercuda.nms(img, img.to("cpu"), 1.0, 2.0, False)


@pytest.mark.parametrize("shape", [(64, 48, 48), (2, 300, 400)], ids=_id)
@pytest.mark.parametrize("backend", backends("cuda"))
def test_cuda_graph_capture(kernels, rng, shape):
    # No host synchronization or allocation outside torch's allocator inside the ops.
    static_in = smooth_random(rng, shape).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture
            kernels.canny(static_in, 30.0, 90.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        edges = kernels.canny(static_in, 30.0, 90.0)
        blur = kernels.gaussian_blur(static_in, 5)
        dx, dy = kernels.sobel(blur)
        staged = kernels.hysteresis(kernels.nms(dx, dy, 30.0, 90.0))
    fresh = smooth_random(rng, shape)
    static_in.copy_(fresh.cuda())
    graph.replay()
    torch.cuda.synchronize()
    expected = canny_batch(fresh, 30, 90)
    assert_equal(edges, expected, "graph canny")
    assert_equal(staged, expected, "graph stages")


@pytest.mark.parametrize("backend", backends(*CPP))
def test_small_cases_for_sanitizers(kernels, rng):
    # Few and small, for compute-sanitizer memcheck / racecheck / initcheck (gpu_check.py): both
    # canny paths (one block per image, tiles + union-find) and every stage kernel.
    for shape in [(3, 48, 48), (2, 7, 13), (1, 1, 1), (2, 64, 64), (1, 70, 90)]:
        img = smooth_random(rng, shape)
        for ksize, gradient in [(5, "sobel"), (0, "paper"), (7, "sobel")]:
            assert_equal(kernels.canny(img, 30.0, 90.0, ksize, False, gradient),
                         canny_batch(img, 30, 90, ksize, False, gradient), f"canny {shape}")
        assert_equal(kernels.gaussian_blur(img, 5), blur_batch(img, 5), "gaussian_blur")
        dx, dy = sobel_batch(img)
        got_dx, got_dy = kernels.sobel(img)
        assert_equal(got_dx, dx, "sobel dx")
        assert_equal(got_dy, dy, "sobel dy")
        kernels.paper_gradient(img)
        edges = kernels.hysteresis(kernels.nms(dx, dy, 30.0, 90.0, True))
        assert_equal(edges, canny_from_gradients(dx, dy, 30.0, 90.0, True), "hysteresis(nms)")


# ==== the Triton kernels only: launch paths ======================================================


@pytest.mark.parametrize("ksize, gradient, l2", [(5, "sobel", False), (0, "paper", True), (7, "sobel", True)])
@pytest.mark.parametrize("backend", backends("triton"))
def test_triton_tiled_path_poisoned_output(backend, rng, ksize, gradient, l2):
    from fercuda.triton import canny as triton_canny

    # Images past the one-program size take the tiled kernels; force them on a small image.
    img = smooth_random(rng, (2, 18, 21))
    out = torch.full(img.shape, 77, dtype=torch.uint8, device=TRITON_DEVICE)
    paper = gradient == "paper"
    low, high = triton_canny.canny_thresholds(20.0 if paper else 10.0, 80.0 if paper else 40.0, l2)
    triton_canny._canny_batch(img.to(TRITON_DEVICE), out, low, high, ksize, l2, paper, tile=16)
    assert_equal(out, canny_batch(img, 10, 40, ksize=ksize, l2_gradient=l2, gradient=gradient))


@pytest.mark.parametrize("shape", [(2, 9, 9), (1, 20, 33)], ids=("block32", "block64"))
@pytest.mark.parametrize("backend", backends("triton"))
def test_triton_one_program_path_poisoned_output(backend, rng, shape):
    from fercuda.triton import canny as triton_canny

    img = smooth_random(rng, shape)
    out = torch.full(img.shape, 77, dtype=torch.uint8, device=TRITON_DEVICE)
    triton_canny._canny_batch(img.to(TRITON_DEVICE), out, 10, 40, 5, False, False)
    assert_equal(out, canny_batch(img, 10, 40))


@pytest.mark.parametrize("backend", backends("triton"))
def test_triton_one_program_blocks(backend):
    """Square blocks of two sides, 8 pixels per thread (at 16 the kernel spills); past 64 x 64 the tiled path."""
    from fercuda.triton import canny as triton_canny

    assert triton_canny.image_block(1, 1) == (32, 4)
    assert triton_canny.image_block(32, 7) == (32, 4)
    assert triton_canny.image_block(33, 1) == (64, 16)
    assert triton_canny.image_block(48, 48) == (64, 16)
    assert triton_canny.image_block(64, 64) == (64, 16)
    assert triton_canny.image_block(65, 2) is None and triton_canny.image_block(2, 65) is None


@pytest.mark.parametrize("backend", backends("triton"))
def test_triton_agrees_with_the_cpp_kernels(kernels, rng):
    # The C++ kernels of the same device (cuda with a GPU, cpu under the interpreter); under the
    # interpreter each program costs milliseconds: fewer images there.
    img = smooth_random(rng, (16 if kernels.device == "cuda" else 2, 48, 48)).to(kernels.device)
    assert torch.equal(ops.canny(img, 30, 90), kernels.canny(img, 30, 90))


# ==== the emulated CUDA device code only: launch paths ============================================


@pytest.mark.parametrize("backend", backends("emulated"))
def test_emulated_whole_image_block_loop(emu, backend, rng):
    # Fewer blocks than images: each block runs several images in turn.
    img = smooth_random(rng, (5, 16, 16))
    assert_equal(emu_canny(emu, img, 20, 60, grid=2), canny_batch(img, 20, 60), "canny, 2 blocks")


@pytest.mark.parametrize("shape, tile", [((1, 40, 70), 16), ((2, 19, 23), 8), ((1, 5, 30), 4), ((1, 70, 3), 32)],
                         ids=["1x40x70-16", "2x19x23-8", "1x5x30-4", "1x70x3-32"])
@pytest.mark.parametrize("ksize, gradient", [(5, "sobel"), (7, "paper"), (0, "sobel")])
@pytest.mark.parametrize("backend", backends("emulated"))
def test_emulated_tiled_path(emu, backend, rng, shape, tile, ksize, gradient):
    img = smooth_random(rng, shape)
    assert_equal(emu_canny(emu, img, 20, 60, ksize, False, gradient, tile=tile),
                 canny_batch(img, 20, 60, ksize, False, gradient), f"tiled canny {shape} {tile}")


@pytest.mark.parametrize("low, high", [(20, math.inf), (math.inf, math.inf), (20, 1e6)])
@pytest.mark.parametrize("backend", backends("emulated"))
def test_emulated_tiled_path_huge_thresholds(emu, backend, rng, low, high):
    img = smooth_random(rng, (2, 20, 24))
    assert_equal(emu_canny(emu, img, low, high, tile=8), canny_batch(img, low, high), f"tiled canny {low} {high}")
