"""References and sample inputs of the Canny tests (tests/test_canny.py), one definition each.

Nothing here calls fercuda: every expected value comes from cv2 (or, for the paper's gradient,
from numpy in float64 on the formula of the op's documentation). Images are uint8 numpy arrays
(H, W) for the *_one functions, and uint8 tensors of any accepted shape ((H, W), (N, H, W),
(N, 1, H, W); on any device) for the *_batch functions, which return CPU tensors of that shape.
"""

import cv2
import numpy as np
import torch


# ---- sample inputs ---------------------------------------------------------------------------


def noise(gen, *shape):
    """Uniform uint8 noise: full-range pixels, every gradient magnitude (most of them strong)."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def smooth_random(gen, shape, ksize=5):
    """Random images with the soft edges of photographs: noise blurred, so magnitudes span the
    thresholds and weak chains form (pure noise makes almost every pixel strong)."""
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).numpy()
    h, w = shape[-2:]
    flat = raw.reshape(-1, h, w)
    if h >= 2 and w >= 2:
        flat = np.stack([cv2.GaussianBlur(x, (ksize, ksize), 0) for x in flat]) if flat.shape[0] else flat
        flat = np.clip((flat.astype(np.int32) - 128) * 3 + 128, 0, 255).astype(np.uint8)
    return torch.from_numpy(flat.reshape(shape).copy())


def load_fer(root, split="test", count=None):
    """The first `count` images of a FER2013 split (sorted paths), as an (N, 48, 48) uint8 array."""
    paths = sorted((root / split).glob("*/*.jpg"))[:count]
    return np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths])


def fer_picture(images, height, width, gen):
    """A photograph-like picture: a mosaic of FER faces upscaled to (height, width) with cubic interpolation."""
    rows, cols = 4, 6
    pick = torch.randint(0, len(images), (rows * cols,), generator=gen).tolist()
    mosaic = np.concatenate([np.concatenate([images[pick[r * cols + c]] for c in range(cols)], 1) for r in range(rows)], 0)
    return cv2.resize(mosaic, (width, height), interpolation=cv2.INTER_CUBIC)


# ---- one image -------------------------------------------------------------------------------


def blurred(img, ksize):
    """cv2.GaussianBlur(img, (k, k), 0) for one (H, W) uint8 array; ksize 0: the image."""
    return cv2.GaussianBlur(img, (ksize, ksize), 0) if ksize else img


def sobel_one(img):
    """The int16 gradients (dx, dy) cv2.Canny computes: 3x3 Sobel, replicate border."""
    dx = cv2.Sobel(img, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dy = cv2.Sobel(img, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    return dx, dy


def paper_pq(img, dtype=np.float32):
    """P, Q of the 2x2 window with top-left (r, c), replicate border past the last row/col, computed
    in float64 and returned as dtype (every value is a multiple of 0.5: float32 holds it exactly)."""
    f = np.pad(img.astype(np.float64), ((0, 1), (0, 1)), mode="edge")
    f00, f01, f10, f11 = f[:-1, :-1], f[:-1, 1:], f[1:, :-1], f[1:, 1:]
    p = ((f01 - f00) + (f11 - f10)) / 2
    q = ((f00 - f10) + (f01 - f11)) / 2
    return p.astype(dtype), q.astype(dtype)


def canny_one(img, low, high, ksize=5, l2_gradient=False, gradient="sobel"):
    b = blurred(img, ksize)
    if gradient == "sobel":
        return cv2.Canny(b, low, high, L2gradient=l2_gradient)
    p, q = paper_pq(b)
    return cv2.Canny(np.rint(2 * p).astype(np.int16), np.rint(-2 * q).astype(np.int16), 2 * low, 2 * high,
                     L2gradient=l2_gradient)


# ---- batches ---------------------------------------------------------------------------------


def per_image(fn, a):
    """fn applied to each (H, W) image of the numpy array a, stacked back to a's shape."""
    images = np.ascontiguousarray(a).reshape(-1, *a.shape[-2:])
    return np.stack([fn(img) for img in images]).reshape(a.shape) if images.shape[0] else np.zeros(a.shape, a.dtype)


def _images(t):
    return t.detach().cpu().numpy()


def blur_batch(img, ksize):
    return torch.from_numpy(per_image(lambda x: blurred(x, ksize), _images(img)))


def _pair_batch(fn, img):
    """fn(image) -> (a, b) of each (H, W) image, as two tensors of img's shape."""
    a = _images(img)
    pairs = [fn(x) for x in np.ascontiguousarray(a).reshape(-1, *a.shape[-2:])]
    return tuple(torch.from_numpy(np.stack([p[i] for p in pairs]).reshape(a.shape)) for i in (0, 1))


def sobel_batch(img):
    return _pair_batch(sobel_one, img)


def paper_batch(img, dtype=np.float32):
    return _pair_batch(lambda x: paper_pq(x, dtype), img)


def canny_batch(img, low, high, ksize=5, l2_gradient=False, gradient="sobel"):
    """The reference for a uint8 tensor of any accepted shape; returns a tensor of that shape."""
    a = _images(img)
    h, w = a.shape[-2:]
    flat = a.reshape(-1, h, w)
    out = np.stack([canny_one(np.ascontiguousarray(x), low, high, ksize, l2_gradient, gradient) for x in flat]) \
        if flat.shape[0] else np.zeros(flat.shape, np.uint8)
    return torch.from_numpy(out.reshape(a.shape))


def canny_from_gradients(dx, dy, low, high, l2_gradient=False):
    """cv2.Canny(dx, dy, low, high) of int16 gradients, image by image (tensors or numpy arrays of
    any accepted shape); returns a tensor of their shape."""
    gx = _images(dx) if isinstance(dx, torch.Tensor) else np.asarray(dx)
    gy = _images(dy) if isinstance(dy, torch.Tensor) else np.asarray(dy)
    h, w = gx.shape[-2:]
    out = [cv2.Canny(np.ascontiguousarray(x), np.ascontiguousarray(y), low, high, L2gradient=l2_gradient)
           for x, y in zip(gx.reshape(-1, h, w), gy.reshape(-1, h, w))]
    return torch.from_numpy(np.stack(out).reshape(gx.shape) if out else np.zeros(gx.shape, np.uint8))


def hysteresis_reference(labels):
    """8-connected components of weak/strong pixels (cv2.connectedComponents) holding a strong one."""
    a = labels.detach().cpu().numpy()
    h, w = a.shape[-2:]
    out = []
    for x in a.reshape(-1, h, w):
        cand = ((x == 1) | (x == 2)).astype(np.uint8)
        n, comp = cv2.connectedComponents(cand, connectivity=8)
        strong_comp = np.zeros(n, bool)
        strong_comp[np.unique(comp[x == 2])] = True
        strong_comp[0] = False
        out.append(np.where(strong_comp[comp] & (cand > 0), 255, 0).astype(np.uint8))
    return torch.from_numpy(np.stack(out).reshape(a.shape) if out else np.zeros(a.shape, np.uint8))
