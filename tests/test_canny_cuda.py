"""The Canny family's kernels against cv2 (0 differing pixels), the same cases for the C++ CPU
kernels (run everywhere) and the CUDA kernels (run where a GPU is; benchmarks/gpu_check.sh runs
them), but for what only CUDA has: graph capture, the grid limits of huge batches.
"""

import math
import os

import cv2
import numpy as np
import pytest
import torch

import fercuda
from fercuda import _build_info
from canny_reference import blurred, canny_batch, fer_images, hysteresis_reference, paper_pq, smooth_random
from conftest import cpu_and_cuda

CANNY_OPS = ["gaussian_blur", "sobel", "paper_gradient", "nms", "hysteresis", "canny"]
ops = torch.ops.fercuda


def test_cuda_kernels_registered():
    if not _build_info.WITH_CUDA:
        pytest.skip("this build of fercuda._C holds no CUDA kernels")
    for name in CANNY_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fercuda::{name}", "CUDA"), name


def _gen(rng):
    return torch.Generator().manual_seed(rng.initial_seed())


def _np_batch(img):
    h, w = img.shape[-2:]
    return img.cpu().numpy().reshape(-1, h, w)


def _ref_blur(img, ksize):
    a = _np_batch(img)
    return torch.from_numpy(np.stack([blurred(x, ksize) for x in a]).reshape(img.shape))


def _ref_sobel(img):
    a = _np_batch(img)
    dx = [cv2.Sobel(x, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) for x in a]
    dy = [cv2.Sobel(x, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE) for x in a]
    return (torch.from_numpy(np.stack(dx).reshape(img.shape)), torch.from_numpy(np.stack(dy).reshape(img.shape)))


def _assert_equal(out, expected, what):
    assert out.shape == expected.shape and out.dtype == expected.dtype, what
    diff = int((out.cpu() != expected).sum())
    assert diff == 0, f"{what}: {diff} of {expected.numel()} elements differ from cv2"


SIZES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (7, 13), (16, 16), (48, 48), (63, 64), (64, 64), (65, 64),
         (64, 65), (100, 37), (257, 129), (1080, 1920)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("ksize", [3, 5, 7])
def test_gaussian_blur(device, rng, shape, ksize):
    img = smooth_random(_gen(rng), (2, *shape))
    _assert_equal(ops.gaussian_blur(img.to(device), ksize), _ref_blur(img, ksize), "gaussian_blur")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", SIZES)
def test_sobel_and_paper_gradient(device, rng, shape):
    img = torch.randint(0, 256, (2, *shape), dtype=torch.uint8, generator=_gen(rng))
    dx, dy = ops.sobel(img.to(device))
    rdx, rdy = _ref_sobel(img)
    _assert_equal(dx, rdx, "sobel dx")
    _assert_equal(dy, rdy, "sobel dy")
    p, q = ops.paper_gradient(img.to(device))
    pq = [paper_pq(x) for x in _np_batch(img)]
    _assert_equal(p, torch.from_numpy(np.stack([a for a, _ in pq]).reshape(img.shape)), "paper P")
    _assert_equal(q, torch.from_numpy(np.stack([b for _, b in pq]).reshape(img.shape)), "paper Q")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (48, 48), (64, 65), (300, 200), (1080, 1920)])
@pytest.mark.parametrize("low, high, l2", [(40, 120, False), (30.7, 80.2, True), (90, 30, False), (0, 0, False)])
def test_nms_hysteresis_equal_cv2_canny_from_gradients(device, rng, shape, low, high, l2):
    img = smooth_random(_gen(rng), (2, *shape))
    rdx, rdy = _ref_sobel(torch.from_numpy(np.stack([blurred(x, 5) for x in _np_batch(img)])))
    labels = ops.nms(rdx.to(device), rdy.to(device), low, high, l2)
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2}
    edges = ops.hysteresis(labels)
    expected = torch.from_numpy(np.stack([cv2.Canny(x, y, low, high, L2gradient=l2)
                                          for x, y in zip(rdx.numpy(), rdy.numpy())]))
    _assert_equal(edges, expected, "hysteresis(nms(dx, dy))")
    # Strong pixels are edges; every edge was a candidate.
    lab = labels.cpu()
    assert not bool(((lab == 2) & (expected == 0)).any()) and not bool(((expected > 0) & (lab == 0)).any())


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(1, 1), (5, 9), (37, 70), (1080, 1920)])
@pytest.mark.parametrize("l2", [False, True])
def test_nms_full_range_int16(device, rng, shape, l2):
    # Hand-made gradients reach -32768, where cv2's |v| depends on the column.
    g = _gen(rng)
    dx = torch.randint(-32768, 32768, (2, *shape), dtype=torch.int16, generator=g)
    dy = torch.randint(-32768, 32768, (2, *shape), dtype=torch.int16, generator=g)
    for t in (dx, dy):
        t.view(-1)[torch.randint(0, t.numel(), (max(1, t.numel() // 10),), generator=g)] = -32768
    edges = ops.hysteresis(ops.nms(dx.to(device), dy.to(device), 20000.0, 40000.0, l2))
    expected = torch.from_numpy(np.stack([cv2.Canny(x, y, 20000.0, 40000.0, L2gradient=l2)
                                          for x, y in zip(dx.numpy(), dy.numpy())]))
    _assert_equal(edges, expected, "hysteresis(nms(full-range dx, dy))")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(1, 1), (9, 70), (64, 64), (513, 257), (2048, 2048)])
def test_hysteresis_random_labels(device, rng, shape):
    # Random label maps have long winding weak chains, the hard case of union-find.
    g = _gen(rng)
    labels = torch.multinomial(torch.tensor([0.45, 0.5, 0.05]), math.prod(shape) * 2, replacement=True,
                               generator=g).to(torch.uint8).reshape(2, *shape)
    _assert_equal(ops.hysteresis(labels.to(device)), hysteresis_reference(labels), "hysteresis")


CANNY_SIZES = [(1, 1), (1, 20), (20, 1), (2, 3), (7, 13), (16, 16), (33, 47), (48, 48), (64, 64), (64, 65),
               (65, 64), (100, 100), (31, 200), (257, 255), (480, 640), (1080, 1920), (4096, 4096)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", CANNY_SIZES)
def test_canny_sizes(device, rng, shape):
    n = 3 if shape[0] * shape[1] <= 1 << 16 else 1
    img = smooth_random(_gen(rng), (n, *shape))
    _assert_equal(ops.canny(img.to(device), 30.0, 90.0, 5, False, "sobel"), canny_batch(img, 30, 90), "canny")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(48, 48), (13, 64), (300, 301)])
@pytest.mark.parametrize("ksize", [0, 3, 5, 7])
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("gradient", ["sobel", "paper"])
def test_canny_options(device, rng, shape, ksize, l2, gradient):
    img = smooth_random(_gen(rng), (2, *shape))
    out = ops.canny(img.to(device), 25.0, 70.0, ksize, l2, gradient)
    _assert_equal(out, canny_batch(img, 25, 70, ksize, l2, gradient), f"canny {ksize} {l2} {gradient}")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(48, 48), (640, 480)])
@pytest.mark.parametrize("low, high, l2", [(60, 20, False), (30, 30, False), (0, 0, False), (20, math.inf, True),
                                           (20, 1e6, False), (20, math.inf, False), (math.inf, math.inf, False),
                                           (30.7, 80.2, True)])
def test_canny_thresholds(device, rng, shape, low, high, l2):
    img = smooth_random(_gen(rng), (2, *shape))
    _assert_equal(ops.canny(img.to(device), low, high, 5, l2, "sobel"), canny_batch(img, low, high, 5, l2),
                  "canny")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_canny_fer2013(device, fer2013_dir):
    img = fer_images(fer2013_dir, 512).unsqueeze(1)
    _assert_equal(ops.canny(img.to(device), 50.0, 150.0, 5, False, "sobel"), canny_batch(img, 50, 150),
                  "canny FER")


@pytest.mark.needs_cuda
def test_canny_fer_sized_batch(rng):
    # All of FER2013 at once: 35,887 images of 48x48 in one call.
    img = smooth_random(_gen(rng), (35887, 48, 48))
    _assert_equal(ops.canny(img.cuda(), 50.0, 150.0, 5, False, "sobel"), canny_batch(img, 50, 150), "canny batch")


@pytest.mark.needs_cuda
def test_canny_batch_beyond_int32_indexing(rng):
    # 2^31 + pixels in one batch: offsets must be 64-bit. Distinct images at the ends.
    n = (1 << 31) // (48 * 48) + 64
    head = smooth_random(_gen(rng), (8, 48, 48))
    img = torch.empty((n, 48, 48), dtype=torch.uint8, device="cuda")
    img[:] = head[0].cuda()
    img[:8] = head.cuda()
    img[-8:] = head.flip(0).cuda()
    out = ops.canny(img, 50.0, 150.0, 5, False, "sobel")
    expected = canny_batch(head, 50, 150)
    _assert_equal(out[:8], expected, "first images")
    _assert_equal(out[-8:], expected.flip(0), "last images")
    del img, out
    # The stage kernels too.
    dx, dy = ops.sobel(torch.zeros((n, 48, 48), dtype=torch.uint8, device="cuda"))
    assert int(dx[-1].abs().sum()) == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_noncontiguous(device, rng):
    img = smooth_random(_gen(rng), (3, 1, 40, 50))
    cl = img.to(device).to(memory_format=torch.channels_last)
    _assert_equal(ops.canny(cl, 30.0, 90.0, 5, False, "sobel"), canny_batch(img, 30, 90), "channels_last")
    big = smooth_random(_gen(rng), (130, 70))
    _assert_equal(ops.canny(big.to(device).t(), 30.0, 90.0, 5, False, "sobel"), canny_batch(big.t(), 30, 90),
                  "transposed")
    _assert_equal(ops.gaussian_blur(big.to(device).t(), 5), _ref_blur(big.t().contiguous(), 5), "blur transposed")
    dx, dy = _ref_sobel(big)
    lab = ops.nms(dx.to(device).t(), dy.to(device).t(), 30.0, 90.0, False)
    assert lab.shape == (70, 130)
    # A view into a larger buffer at an odd offset (not 16-byte aligned).
    buf = torch.empty(2 * 48 * 48 + 1, dtype=torch.uint8)
    buf[1:] = smooth_random(_gen(rng), (2, 48, 48)).flatten()
    view = buf.to(device)[1:].reshape(2, 48, 48)
    assert view.storage_offset() == 1
    _assert_equal(ops.canny(view, 30.0, 90.0, 5, False, "sobel"), canny_batch(view, 30, 90), "offset view")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty(device):
    for shape in [(0, 5, 5), (2, 0, 4), (0, 0)]:
        img = torch.zeros(shape, dtype=torch.uint8, device=device)
        for out in [ops.canny(img, 50.0, 150.0, 5, False, "sobel"), ops.gaussian_blur(img, 5), ops.hysteresis(img),
                    *ops.sobel(img), *ops.paper_gradient(img)]:
            assert out.shape == img.shape and out.device == img.device
        z = torch.zeros(shape, dtype=torch.int16, device=device)
        assert ops.nms(z, z, 1.0, 2.0, False).shape == img.shape


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_exception(device):
    img = torch.zeros(8, 8, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match="argument 'img' must be a Byte tensor, got Float"):
        ops.canny(img.float(), 50.0, 150.0, 5, False, "sobel")
    with pytest.raises(RuntimeError, match="argument 'ksize' must be 0 \\(no blur\\), 3, 5 or 7, got 4"):
        ops.canny(img, 50.0, 150.0, 4, False, "sobel")
    with pytest.raises(RuntimeError, match="argument 'ksize' must be 3, 5 or 7, got 0"):
        ops.gaussian_blur(img, 0)
    with pytest.raises(RuntimeError, match="argument 'low' must be a number >= 0"):
        ops.canny(img, math.nan, 150.0, 5, False, "sobel")
    with pytest.raises(RuntimeError, match="argument 'high' must be a number >= 0"):
        ops.nms(img.short(), img.short(), 1.0, -2.0, False)
    with pytest.raises(RuntimeError, match="argument 'gradient' must be"):
        ops.canny(img, 50.0, 150.0, 5, False, "scharr")
    with pytest.raises(RuntimeError, match="must have one channel"):
        ops.canny(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=device), 50.0, 150.0, 5, False, "sobel")
    with pytest.raises(RuntimeError, match="must have the same shape"):
        ops.nms(img.short(), img.short()[:4], 1.0, 2.0, False)


@pytest.mark.needs_cuda
def test_exception_devices():
    img = torch.zeros(8, 8, dtype=torch.int16, device="cuda")
    with pytest.raises(RuntimeError, match="must be on the same device"):
        ops.nms(img, img.cpu(), 1.0, 2.0, False)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck_schema(device, rng):
    img = smooth_random(_gen(rng), (2, 20, 20)).to(device)
    for op, args in [(ops.canny.default, (img, 30.0, 90.0, 5, False, "sobel")),
                     (ops.gaussian_blur.default, (img, 5)),
                     (ops.sobel.default, (img,)),
                     (ops.hysteresis.default, (img % 3,))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("shape", [(64, 48, 48), (2, 300, 400)])
def test_cuda_graph_capture(rng, shape):
    # No host synchronization or allocation outside torch's allocator inside the ops.
    static_in = smooth_random(_gen(rng), shape).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture
            ops.canny(static_in, 30.0, 90.0, 5, False, "sobel")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        edges = ops.canny(static_in, 30.0, 90.0, 5, False, "sobel")
        blur = ops.gaussian_blur(static_in, 5)
        dx, dy = ops.sobel(blur)
        staged = ops.hysteresis(ops.nms(dx, dy, 30.0, 90.0, False))
    fresh = smooth_random(_gen(rng), shape)
    static_in.copy_(fresh.cuda())
    graph.replay()
    torch.cuda.synchronize()
    expected = canny_batch(fresh, 30, 90)
    _assert_equal(edges, expected, "graph canny")
    _assert_equal(staged, expected, "graph stages")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matches_triton_backend(device, rng):
    from fercuda.triton import canny as triton_canny

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 only")
    # Under the interpreter each program costs milliseconds: fewer images there.
    img = smooth_random(_gen(rng), (16 if device == "cuda" else 2, 48, 48)).to(device)
    a = ops.canny(img, 30.0, 90.0, 5, False, "sobel")
    b = triton_canny.canny(img, 30, 90)
    assert torch.equal(a, b)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_small_cases_for_sanitizers(device, rng):
    # Few and small, for compute-sanitizer memcheck / racecheck (gpu_check.sh): both canny
    # paths (one block per image, tiles + union-find) and every stage kernel.
    g = _gen(rng)
    for shape in [(3, 48, 48), (2, 7, 13), (1, 1, 1), (2, 64, 64), (1, 70, 90)]:
        img = smooth_random(g, shape)
        for ksize, gradient in [(5, "sobel"), (0, "paper"), (7, "sobel")]:
            _assert_equal(ops.canny(img.to(device), 30.0, 90.0, ksize, False, gradient),
                          canny_batch(img, 30, 90, ksize, False, gradient), f"canny {shape}")
        _assert_equal(ops.gaussian_blur(img.to(device), 5), _ref_blur(img, 5), "gaussian_blur")
        dx, dy = _ref_sobel(img)
        got_dx, got_dy = ops.sobel(img.to(device))
        _assert_equal(got_dx, dx, "sobel dx")
        _assert_equal(got_dy, dy, "sobel dy")
        ops.paper_gradient(img.to(device))
        edges = ops.hysteresis(ops.nms(dx.to(device), dy.to(device), 30.0, 90.0, True))
        expected = torch.from_numpy(np.stack([cv2.Canny(x, y, 30.0, 90.0, L2gradient=True)
                                              for x, y in zip(dx.numpy(), dy.numpy())]).reshape(shape))
        _assert_equal(edges, expected, "hysteresis(nms)")
