"""The Triton Canny (fercuda.triton.canny) against cv2: 0 differing pixels.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (~12 ms per program
and stage), so the inputs here stay small; with a GPU the same tests run on CUDA tensors,
plus a few large cases.
"""

import math
import os

import pytest
import torch

import fercuda  # noqa: F401
from fercuda.triton import canny as triton_canny
from canny_reference import canny_batch, fer_images, smooth_random

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)


def check(img, low=50, high=150, **kw):
    out = triton_canny.canny(img.to(DEVICE), low, high, **kw)
    expected = canny_batch(img, low, high, **kw)
    assert out.dtype == torch.uint8 and out.shape == img.shape and out.device.type == DEVICE
    diff = int((out.cpu() != expected).sum())
    assert diff == 0, f"{diff} pixels differ from cv2 ({int((expected > 0).sum())} edge pixels in cv2)"
    return expected


def test_smoke_batch(rng):
    expected = check(smooth_random(rng, (3, 16, 16)), 20, 60)
    assert 0 < int((expected > 0).sum()) < expected.numel()  # the case holds edges and non-edges


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (1, 20), (20, 1), (2, 1, 5, 3)])
def test_odd_shapes(rng, shape):
    check(smooth_random(rng, shape), 10, 40)


@pytest.mark.parametrize("ksize", [0, 3, 5, 7])
@pytest.mark.parametrize("l2_gradient", [False, True])
def test_ksize_and_norm(rng, ksize, l2_gradient):
    check(smooth_random(rng, (12, 17)), 15, 45, ksize=ksize, l2_gradient=l2_gradient)


@pytest.mark.parametrize("l2_gradient", [False, True])
def test_paper_gradient(rng, l2_gradient):
    check(smooth_random(rng, (2, 11, 14)), 8, 25, gradient="paper", l2_gradient=l2_gradient)


def test_fer2013(fer2013_dir):
    check(fer_images(fer2013_dir, 2).unsqueeze(1))  # (N, 1, 48, 48), the defaults 50 / 150


@pytest.mark.parametrize(
    "low, high, l2_gradient",
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
def test_thresholds(rng, low, high, l2_gradient):
    check(smooth_random(rng, (10, 12)), low, high, l2_gradient=l2_gradient)


def test_noncontiguous(rng):
    img = smooth_random(rng, (2, 1, 9, 10))
    check(img.to(memory_format=torch.channels_last))
    check(smooth_random(rng, (13, 9)).t(), 10, 40)


@pytest.mark.parametrize("ksize, gradient, l2_gradient", [(5, "sobel", False), (0, "paper", True), (7, "sobel", True)])
def test_tiled_path_poisoned_output(rng, ksize, gradient, l2_gradient):
    # Images past the one-program size take the tiled kernels; force them on a small image.
    img = smooth_random(rng, (2, 18, 21))
    out = torch.full(img.shape, 77, dtype=torch.uint8, device=DEVICE)
    paper = gradient == "paper"
    low, high = triton_canny.canny_thresholds(20.0 if paper else 10.0, 80.0 if paper else 40.0, l2_gradient)
    triton_canny._canny_batch(img.to(DEVICE), out, low, high, ksize, l2_gradient, paper, tile=16)
    expected = canny_batch(img, 10, 40, ksize=ksize, l2_gradient=l2_gradient, gradient=gradient)
    assert int((out.cpu() != expected).sum()) == 0


@pytest.mark.parametrize("shape", [(2, 9, 9), (1, 20, 33)], ids=("block32", "block64"))
def test_one_program_path_poisoned_output(rng, shape):
    img = smooth_random(rng, shape)
    out = torch.full(img.shape, 77, dtype=torch.uint8, device=DEVICE)
    triton_canny._canny_batch(img.to(DEVICE), out, 10, 40, 5, False, False)
    assert int((out.cpu() != canny_batch(img, 10, 40)).sum()) == 0


def test_one_program_blocks():
    """Square blocks of two sides, 8 pixels per thread (at 16 the kernel spills); past 64 x 64 the tiled path."""
    assert triton_canny.image_block(1, 1) == (32, 4)
    assert triton_canny.image_block(32, 7) == (32, 4)
    assert triton_canny.image_block(33, 1) == (64, 16)
    assert triton_canny.image_block(48, 48) == (64, 16)
    assert triton_canny.image_block(64, 64) == (64, 16)
    assert triton_canny.image_block(65, 2) is None and triton_canny.image_block(2, 65) is None


def test_empty():
    for shape in [(0, 4, 4), (3, 0, 5), (0, 0)]:
        img = torch.zeros(shape, dtype=torch.uint8, device=DEVICE)
        out = triton_canny.canny(img)
        assert out.shape == img.shape and out.dtype == torch.uint8


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
)
def test_exception(kwargs, message):
    args = dict(img=torch.zeros(4, 4, dtype=torch.uint8), low=50, high=150)
    args.update(kwargs)
    img = args.pop("img").to(DEVICE)
    with pytest.raises(RuntimeError, match="fercuda.canny: " + message):
        triton_canny.canny(img, args.pop("low"), args.pop("high"), **args)


def test_opcheck(rng):
    img = smooth_random(rng, (1, 6, 7)).to(DEVICE)
    torch.library.opcheck(torch.ops.fercuda.canny_triton.default, (img, 10.0, 40.0, 3, False, "sobel"))


def test_dynamo(rng):
    img = smooth_random(rng, (2, 8, 8))
    compiled = torch.compile(lambda x: triton_canny.canny(x, 10, 40, ksize=3), fullgraph=True)
    out = compiled(img.to(DEVICE))
    assert int((out.cpu() != canny_batch(img, 10, 40, ksize=3)).sum()) == 0


@pytest.mark.needs_cuda
@pytest.mark.parametrize("shape", [(35887, 48, 48), (1080, 1920), (2, 100, 300), (1, 70, 64)])
def test_large_cuda(rng, shape):
    img = smooth_random(torch.Generator().manual_seed(rng.initial_seed()), shape)
    check(img, 30, 90)
