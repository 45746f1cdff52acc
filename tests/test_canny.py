"""Canny family on the CPU, against OpenCV bit for bit.

References: cv2 (GaussianBlur, Sobel, Canny) and, for the paper's gradient, plain PyTorch in
float64 written here. Inputs are fresh random noise (the `rng` fixture prints its seed) and real
FER2013 photographs, alone, tiled and upscaled.
"""

import math
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fercuda
from fercuda import ops

SIZES = [(1, 1), (1, 9), (9, 1), (2, 9), (9, 2), (3, 3), (5, 7), (7, 5), (17, 33), (47, 49), (48, 48), (64, 31)]
KSIZES = [0, 3, 5, 7]


# ---- helpers ---------------------------------------------------------------------------


def noise(rng, *shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=rng)


def poison_heap(nbytes):
    """Leave freed memory full of 0xA5 so an output element the kernel forgets is likely visible."""
    torch.full((max(nbytes, 1),), 0xA5, dtype=torch.uint8)


def cv_blur(img, ksize):
    return img if ksize == 0 else cv2.GaussianBlur(img, (ksize, ksize), 0)


def cv_canny(img, low, high, ksize=5, l2=False):
    return cv2.Canny(cv_blur(img, ksize), low, high, L2gradient=l2)


def cv_sobel(img):
    dx = cv2.Sobel(img, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dy = cv2.Sobel(img, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    return dx, dy


def paper_reference(img):
    """Eq. (2) of the paper in float64 PyTorch: 2x2 differences, replicate beyond the last row/column."""
    f = F.pad(img.double()[None, None], (0, 1, 0, 1), mode="replicate")[0, 0]
    f00, f01, f10, f11 = f[:-1, :-1], f[:-1, 1:], f[1:, :-1], f[1:, 1:]
    p = ((f01 - f00) + (f11 - f10)) / 2
    q = ((f00 - f10) + (f01 - f11)) / 2
    return p, q


def differing(ours, ref):
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else ours
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ours.dtype, ref.shape, ref.dtype)
    return int((ours != ref).sum())


def assert_canny_equal(batch, low, high, ksize=5, l2=False):
    poison_heap(batch.numel())
    out = ops.canny(batch, low, high, ksize=ksize, l2_gradient=l2)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert set(torch.unique(out).tolist()) <= {0, 255}
    flat = batch.reshape(-1, *batch.shape[-2:]).numpy()
    got = out.reshape(-1, *batch.shape[-2:]).numpy()
    bad = [i for i in range(flat.shape[0]) if differing(got[i], cv_canny(flat[i], low, high, ksize, l2))]
    assert not bad, f"{len(bad)} of {flat.shape[0]} images differ from cv2, first {bad[:5]}"


def load_fer(root, split, count=None):
    files = sorted((root / split).glob("*/*.jpg"))[:count]
    return np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files])


def fer_picture(images, height, width, rng):
    """A photograph-like picture: a mosaic of FER faces upscaled to (height, width) with cubic interpolation."""
    rows, cols = 4, 6
    pick = torch.randint(0, len(images), (rows * cols,), generator=rng).tolist()
    mosaic = np.concatenate([np.concatenate([images[pick[r * cols + c]] for c in range(cols)], 1) for r in range(rows)], 0)
    return cv2.resize(mosaic, (width, height), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def fer_test_images(fer2013_dir):
    return load_fer(fer2013_dir, "test")


# ---- smoke and cardinality -------------------------------------------------------------


def test_smoke(rng):
    img = noise(rng, 48, 48)
    out = ops.canny(img)
    assert out.dtype == torch.uint8 and out.shape == (48, 48) and out.is_contiguous()
    assert differing(out, cv_canny(img.numpy(), 50, 150)) == 0


@pytest.mark.parametrize("shape", [(13, 17), (3, 13, 17), (3, 1, 13, 17)])
def test_cardinality(rng, shape):
    img = noise(rng, *shape)
    assert ops.gaussian_blur(img).shape == shape
    assert [(t.shape, t.dtype) for t in ops.sobel(img)] == [(shape, torch.int16)] * 2
    assert [(t.shape, t.dtype) for t in ops.paper_gradient(img)] == [(shape, torch.float32)] * 2
    dx, dy = ops.sobel(img)
    edge_map = ops.nms(dx, dy, 50, 150)
    assert edge_map.shape == shape and edge_map.dtype == torch.uint8
    assert set(torch.unique(edge_map).tolist()) <= {0, 1, 2}
    assert ops.hysteresis(edge_map).shape == shape
    assert ops.canny(img).shape == shape


# ---- each stage against cv2 --------------------------------------------------------------


@pytest.mark.parametrize("ksize", [3, 5, 7])
@pytest.mark.parametrize("size", SIZES + [(1080, 1920)])
def test_gaussian_blur_matches_cv2(rng, size, ksize):
    img = noise(rng, *size)
    poison_heap(img.numel())
    assert differing(ops.gaussian_blur(img, ksize), cv2.GaussianBlur(img.numpy(), (ksize, ksize), 0)) == 0


@pytest.mark.parametrize("size", SIZES + [(1080, 1920)])
def test_sobel_matches_cv2(rng, size):
    img = noise(rng, *size)
    poison_heap(2 * img.numel())
    dx, dy = ops.sobel(img)
    ref_dx, ref_dy = cv_sobel(img.numpy())
    assert differing(dx, ref_dx) == 0
    assert differing(dy, ref_dy) == 0


@pytest.mark.parametrize("size", SIZES + [(1080, 1920)])
def test_paper_gradient_matches_reference(rng, size):
    img = noise(rng, *size)
    poison_heap(4 * img.numel())
    p, q = ops.paper_gradient(img)
    ref_p, ref_q = paper_reference(img)
    assert torch.equal(p.double(), ref_p) and torch.equal(q.double(), ref_q)


# ---- canny against cv2 ---------------------------------------------------------------------


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("ksize", KSIZES)
@pytest.mark.parametrize("size", SIZES)
def test_canny_noise_matches_cv2(rng, size, ksize, l2):
    # Noise thresholds scaled so that each size holds weak, strong and suppressed pixels.
    low, high = (40, 120) if ksize else (150, 400)
    assert_canny_equal(noise(rng, 4, *size), low, high, ksize, l2)


@pytest.mark.parametrize("ksize", KSIZES)
def test_canny_1080p_noise_matches_cv2(rng, ksize):
    assert_canny_equal(noise(rng, 1080, 1920), 40 if ksize else 150, 120 if ksize else 400, ksize)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("thresholds", [(50, 150), (20, 60), (100, 300)])
def test_canny_fer2013_matches_cv2(fer2013_dir, thresholds, l2):
    images = torch.from_numpy(load_fer(fer2013_dir, "train", 600))
    assert_canny_equal(images, *thresholds, 5, l2)


def test_canny_all_fer2013_test_in_one_call(fer_test_images):
    images = torch.from_numpy(fer_test_images)[:, None]  # (N, 1, 48, 48), as a model sees them
    assert images.shape[0] == 7178
    poison_heap(images.numel())
    out = ops.canny(images)[:, 0].numpy()
    bad = [i for i, img in enumerate(fer_test_images) if differing(out[i], cv_canny(img, 50, 150))]
    assert not bad, f"{len(bad)} of {len(fer_test_images)} FER2013 test images differ from cv2, first {bad[:5]}"


@pytest.mark.parametrize("size", [(96, 144), (480, 640), (1080, 1920)])
@pytest.mark.parametrize("l2", [False, True])
def test_canny_photographs_match_cv2(fer_test_images, rng, size, l2):
    picture = torch.from_numpy(fer_picture(fer_test_images, *size, rng))
    for ksize in (0, 5):
        assert_canny_equal(picture, 50, 150, ksize, l2)


def test_canny_4096_photograph_matches_cv2(fer_test_images, rng):
    picture = torch.from_numpy(fer_picture(fer_test_images, 4096, 4096, rng))
    assert_canny_equal(picture, 30, 90)


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
def test_canny_thresholds_match_cv2(fer_test_images, rng, low, high, l2):
    picture = torch.from_numpy(fer_picture(fer_test_images, 120, 160, rng))
    assert_canny_equal(picture, low, high, 5, l2)
    assert_canny_equal(noise(rng, 3, 40, 56), low, high, 0, l2)


def test_l2_threshold_is_squared_before_flooring(rng):
    # A magnitude of 31 (squared 961) and of 30.7^2 = 942.49: floor(30.7)^2 = 900 would keep 930.
    dx = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 30, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.int16)
    dy = torch.zeros_like(dx)
    dx[1, 2] = 30  # 900 <= 942: not an edge
    assert ops.hysteresis(ops.nms(dx, dy, 30.7, 30.7, l2_gradient=True)).sum() == 0
    assert differing(ops.hysteresis(ops.nms(dx, dy, 30.7, 30.7, l2_gradient=True)),
                     cv2.Canny(dx.numpy(), dy.numpy(), 30.7, 30.7, L2gradient=True)) == 0
    dx[1, 2] = 31  # 961 > 942
    assert ops.hysteresis(ops.nms(dx, dy, 30.7, 30.7, l2_gradient=True))[1, 2] == 255


def test_infinite_high_threshold_finds_edges_as_cv2(fer_test_images, rng):
    # cv2 floors an L1 threshold >= 2^31 to INT_MIN (x86 cvtsd2si): high=inf marks every
    # candidate above low strong, rather than none.
    picture = fer_picture(fer_test_images, 120, 160, rng)
    ref = cv_canny(picture, 20, math.inf)
    assert ref.any() and differing(ops.canny(torch.from_numpy(picture), 20, math.inf), ref) == 0
    assert differing(ops.canny(picture, 20, math.inf), ref) == 0
    dx, dy = ops.sobel(torch.from_numpy(cv2.GaussianBlur(picture, (5, 5), 0)))
    edge_map = ops.nms(dx, dy, 20, math.inf)
    assert (edge_map == 2).any() and not (edge_map == 1).any()
    assert differing(ops.hysteresis(edge_map), ref) == 0


# ---- nms + hysteresis on arbitrary gradients ---------------------------------------------


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("size", [(1, 1), (1, 23), (23, 1), (2, 9), (7, 8), (9, 17), (64, 100), (300, 517)])
def test_nms_hysteresis_full_range_int16_matches_cv2(rng, size, l2):
    dx = torch.randint(-32768, 32768, size, dtype=torch.int16, generator=rng)
    dy = torch.randint(-32768, 32768, size, dtype=torch.int16, generator=rng)
    # The extremes, where cv2's 16- and 32-bit arithmetic wraps, at random places.
    for t in (dx, dy):
        t.view(-1)[torch.randint(0, t.numel(), (max(1, t.numel() // 10),), generator=rng)] = -32768
        t.view(-1)[torch.randint(0, t.numel(), (max(1, t.numel() // 20),), generator=rng)] = 32767
    for low, high in [(0, 0), (100, 3000), (20000, 40000), (5000.5, 60000.9), (1e9, math.inf)]:
        poison_heap(dx.numel())
        edge_map = ops.nms(dx, dy, low, high, l2_gradient=l2)
        assert set(torch.unique(edge_map).tolist()) <= {0, 1, 2}
        ref = cv2.Canny(dx.numpy(), dy.numpy(), low, high, L2gradient=l2)
        assert differing(ops.hysteresis(edge_map), ref) == 0, (low, high)


@pytest.mark.parametrize("l2", [False, True])
def test_nms_hysteresis_sobel_gradients_match_cv2(fer_test_images, rng, l2):
    picture = fer_picture(fer_test_images, 600, 800, rng)
    dx, dy = cv_sobel(cv2.GaussianBlur(picture, (5, 5), 0))
    for low, high in [(50, 150), (10, 400), (150, 50)]:
        out = ops.hysteresis(ops.nms(torch.from_numpy(dx), torch.from_numpy(dy), low, high, l2_gradient=l2))
        assert differing(out, cv2.Canny(dx, dy, low, high, L2gradient=l2)) == 0


def test_hysteresis_treats_unknown_labels_as_not_edges(rng):
    edge_map = torch.randint(0, 3, (40, 50), dtype=torch.uint8, generator=rng)
    junk = edge_map.clone()
    junk[junk == 0] = torch.randint(3, 256, junk.shape, dtype=torch.uint8, generator=rng)[junk == 0]
    assert torch.equal(ops.hysteresis(junk), ops.hysteresis(edge_map))


# ---- the paper's gradient in canny -------------------------------------------------------


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("ksize", [0, 5])
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (5, 7), (48, 48), (47, 49)])
def test_canny_paper_gradient_matches_cv2(rng, size, ksize, l2):
    img = noise(rng, 3, *size)
    low, high = 20, 60
    out = ops.canny(img, low, high, ksize=ksize, l2_gradient=l2, gradient="paper").numpy()
    for i in range(img.shape[0]):
        p, q = paper_reference(torch.from_numpy(cv_blur(img[i].numpy(), ksize)))
        dx, dy = (2 * p).to(torch.int16).numpy(), (-2 * q).to(torch.int16).numpy()
        assert differing(out[i], cv2.Canny(dx, dy, 2 * low, 2 * high, L2gradient=l2)) == 0


def test_canny_paper_gradient_on_photographs(fer_test_images):
    images = fer_test_images[:200]
    out = ops.canny(torch.from_numpy(images), 50, 150, gradient="paper").numpy()
    for i, img in enumerate(images):
        p, q = paper_reference(torch.from_numpy(cv_blur(img, 5)))
        ref = cv2.Canny((2 * p).to(torch.int16).numpy(), (-2 * q).to(torch.int16).numpy(), 100, 300)
        assert differing(out[i], ref) == 0


# ---- layouts ---------------------------------------------------------------------------------


def layouts(rng):
    base = noise(rng, 3, 1, 40, 56)
    return {
        "transposed": base[:, 0].transpose(1, 2),
        "strided": noise(rng, 3, 80, 112)[:, ::2, ::2],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "batch_slice": noise(rng, 6, 1, 40, 56)[::2],
        "expanded": noise(rng, 1, 40, 56).expand(3, 40, 56),
    }


@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last", "batch_slice", "expanded"])
def test_noncontiguous(rng, layout):
    img = layouts(rng)[layout]
    dense = img.contiguous()
    out = ops.canny(img, 30, 90)
    assert out.is_contiguous() and out.shape == img.shape
    assert torch.equal(out, ops.canny(dense, 30, 90))
    assert_canny_equal(img.contiguous(), 30, 90)
    assert torch.equal(ops.gaussian_blur(img, 5), ops.gaussian_blur(dense, 5))
    for a, b in zip(ops.sobel(img), ops.sobel(dense)):
        assert torch.equal(a, b)
    for a, b in zip(ops.paper_gradient(img), ops.paper_gradient(dense)):
        assert torch.equal(a, b)
    dx, dy = ops.sobel(dense)
    edge_map = ops.nms(dx.transpose(-1, -2).contiguous().transpose(-1, -2), dy, 30, 90)
    assert torch.equal(edge_map, ops.nms(dx, dy, 30, 90))
    assert torch.equal(ops.hysteresis(edge_map.transpose(-1, -2)), ops.hysteresis(edge_map.transpose(-1, -2).contiguous()))


# ---- numpy arrays, as cv2 users hold them --------------------------------------------------


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


def per_image(fn, a):
    """fn applied by cv2 to each (H, W) image of a, stacked back to a's shape."""
    images = np.ascontiguousarray(a).reshape(-1, *a.shape[-2:])
    return np.stack([fn(img) for img in images]).reshape(a.shape)


def assert_numpy_equal(out, ref):
    assert isinstance(out, np.ndarray), type(out)
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_gaussian_blur_matches_cv2(rng, layout):
    a = numpy_images(rng, layout)
    for ksize in (3, 5, 7):
        assert_numpy_equal(ops.gaussian_blur(a, ksize), per_image(lambda i: cv2.GaussianBlur(i, (ksize, ksize), 0), a))


@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_sobel_matches_cv2(rng, layout):
    a = numpy_images(rng, layout)
    dx, dy = ops.sobel(a)
    assert_numpy_equal(dx, per_image(lambda i: cv_sobel(i)[0], a))
    assert_numpy_equal(dy, per_image(lambda i: cv_sobel(i)[1], a))


@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_paper_gradient_matches_reference(rng, layout):
    a = numpy_images(rng, layout)
    p, q = ops.paper_gradient(a)
    ref_p = per_image(lambda i: paper_reference(torch.from_numpy(i))[0].float().numpy(), a)
    ref_q = per_image(lambda i: paper_reference(torch.from_numpy(i))[1].float().numpy(), a)
    assert_numpy_equal(p, ref_p)
    assert_numpy_equal(q, ref_q)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_nms_hysteresis_match_cv2(rng, layout, l2):
    # int16 gradients as cv2.Sobel returns them, laid out like the image.
    a = numpy_images(rng, layout)
    dx = per_image(lambda i: cv_sobel(cv2.GaussianBlur(i, (5, 5), 0))[0], a)
    dy = per_image(lambda i: cv_sobel(cv2.GaussianBlur(i, (5, 5), 0))[1], a)
    if layout.endswith("column_slice"):
        dx, dy = np.repeat(dx, 2, axis=-1)[..., ::2], np.repeat(dy, 2, axis=-1)[..., ::2]
    edge_map = ops.nms(dx, dy, 20, 60, l2_gradient=l2)
    assert isinstance(edge_map, np.ndarray) and edge_map.dtype == np.uint8 and edge_map.shape == a.shape
    assert set(np.unique(edge_map).tolist()) <= {0, 1, 2}
    ref = np.stack([cv2.Canny(np.ascontiguousarray(x), np.ascontiguousarray(y), 20, 60, L2gradient=l2)
                    for x, y in zip(dx.reshape(-1, *a.shape[-2:]), dy.reshape(-1, *a.shape[-2:]))]).reshape(a.shape)
    assert_numpy_equal(ops.hysteresis(edge_map), ref)
    assert_numpy_equal(ops.hysteresis(edge_map[..., ::-1]), ops.hysteresis(edge_map[..., ::-1].copy()))


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("ksize", [0, 5])
@pytest.mark.parametrize("layout", NUMPY_LAYOUTS)
def test_numpy_canny_matches_cv2(rng, layout, ksize, l2):
    a = numpy_images(rng, layout)
    assert_numpy_equal(ops.canny(a, 30, 90, ksize=ksize, l2_gradient=l2),
                       per_image(lambda i: cv_canny(i, 30, 90, ksize, l2), a))


def test_numpy_foreign_byte_order(rng):
    # Big-endian int16 gradients (as read from a file written elsewhere) hold the same numbers.
    dx, dy = cv_sobel(noise(rng, 30, 40).numpy())
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
    assert_numpy_equal(ops.canny(a, 30, 90, backend=backend), per_image(lambda i: cv_canny(i, 30, 90), a))


@pytest.mark.parametrize("shape", [(0, 48, 48), (0, 1, 48, 48), (2, 0, 48), (2, 48, 0), (0, 0), (5, 0)])
def test_empty_inputs(shape):
    img = torch.zeros(shape, dtype=torch.uint8)
    for out in (ops.gaussian_blur(img), *ops.sobel(img), *ops.paper_gradient(img), ops.canny(img)):
        assert out.shape == shape and out.numel() == 0
    dx = torch.zeros(shape, dtype=torch.int16)
    assert ops.nms(dx, dx, 10, 20).shape == shape
    assert ops.hysteresis(img).shape == shape


# ---- compiler and dispatcher -------------------------------------------------------------


def sample_inputs(rng):
    img = noise(rng, 2, 1, 21, 34)
    dx, dy = ops.sobel(img)
    edge_map = ops.nms(dx, dy, 30, 90)
    return {
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


@pytest.mark.parametrize("name", ["gaussian_blur", "sobel", "paper_gradient", "nms", "hysteresis", "canny"])
def test_opcheck(rng, name):
    op = getattr(torch.ops.fercuda, name).default
    for args in sample_inputs(rng)[name]:
        torch.library.opcheck(op, args)


def test_dynamo(rng):
    def edges_and_blur(x):
        return ops.canny(x, 30, 90, ksize=5), ops.gaussian_blur(x, 3).float().mean()

    compiled = torch.compile(edges_and_blur, fullgraph=True)
    img = noise(rng, 4, 1, 48, 48)
    got, mean = compiled(img)
    want, want_mean = edges_and_blur(img)
    assert torch.equal(got, want) and torch.equal(mean, want_mean)
    got = compiled(noise(rng, 2, 1, 30, 20))[0]
    assert got.shape == (2, 1, 30, 20)


# ---- bad input -------------------------------------------------------------------------------

DEVICES = ["cpu", "meta"]  # meta runs the fake kernels of fercuda/_meta.py: same checks, same messages


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
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (8,)])
def test_exception_dimensions(device, shape):
    img = torch.zeros(shape, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match=f"fercuda.canny: argument 'img' must have shape .* got a {len(shape)}-D"):
        ops.canny(img)
    with pytest.raises(RuntimeError, match=f"fercuda.gaussian_blur: argument 'img' .* got a {len(shape)}-D"):
        ops.gaussian_blur(img)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.nan, -1.0, -math.inf])
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


@pytest.mark.parametrize("device", DEVICES)
def test_exception_nms_dtype_mismatch(device):
    dx = torch.zeros(8, 8, dtype=torch.int16, device=device)
    with pytest.raises(RuntimeError, match="fercuda.nms: argument 'dy' must be a Short tensor, got Int"):
        ops.nms(dx, dx.int(), 10, 20)
    with pytest.raises(RuntimeError, match="fercuda.nms: argument 'dx' must be a Short tensor, got Byte"):
        ops.nms(dx.to(torch.uint8), dx, 10, 20)


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


@pytest.mark.parametrize("backend", [None, "cpu", "triton"])
@pytest.mark.parametrize("bad, given", [("50", "str"), (True, "bool"), (np.True_, "numpy.bool_?"), (None, "NoneType"),
                                        (50 + 0j, "complex"), (torch.tensor([50.0, 60.0]), "Tensor"),
                                        (torch.tensor(True), "Tensor")])
def test_exception_threshold_type(bad, given, backend):
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
                                       (30.5, np.float64(90.0))])
def test_threshold_number_types(rng, low, high):
    # Real numbers of every kind count as the floats they hold.
    img = noise(rng, 40, 50)
    assert differing(ops.canny(img, low, high), cv_canny(img.numpy(), 30.5, 90)) == 0
    dx, dy = ops.sobel(img)
    assert torch.equal(ops.nms(dx, dy, low, high), ops.nms(dx, dy, 30.5, 90.0))


@pytest.mark.skipif(fercuda.cuda_kernels_built(), reason="this build holds CUDA kernels")
def test_exception_cuda_tensor_without_cuda_kernels():
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


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_row_bands_match_cv2(fer_test_images, rng, threads):
    # Large images run as row bands, one or more per thread, with hysteresis joined across
    # band seams; more threads than cores still splits the work.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_canny_equal(torch.from_numpy(fer_picture(fer_test_images, 2048, 2048, rng)), 20, 60)  # banded hysteresis
        picture = torch.from_numpy(fer_picture(fer_test_images, 720, 1280, rng))
        assert_canny_equal(picture, 20, 60)
        assert_canny_equal(picture[:, :5].contiguous(), 20, 60)  # tall and thin
        assert_canny_equal(noise(rng, 2, 400, 700), 40, 120, 3, True)  # few images: banded too
        dx = torch.randint(-32768, 32768, (2000, 2001), dtype=torch.int16, generator=rng)
        dy = torch.randint(-32768, 32768, (2000, 2001), dtype=torch.int16, generator=rng)
        out = ops.hysteresis(ops.nms(dx, dy, 1000, 30000))
        assert differing(out, cv2.Canny(dx.numpy(), dy.numpy(), 1000, 30000)) == 0
    finally:
        torch.set_num_threads(before)
