"""OpenCV references for the Canny tests (shared by the CUDA and Triton test files).

Nothing here calls fercuda: every expected value comes from cv2 (or, for the paper's gradient,
from numpy on the formula of the op's documentation).
"""

import cv2
import numpy as np
import torch


def blurred(img, ksize):
    """cv2.GaussianBlur(img, (k, k), 0) for one (H, W) uint8 array; ksize 0: the image."""
    return cv2.GaussianBlur(img, (ksize, ksize), 0) if ksize else img


def paper_pq(img):
    """P, Q (float32) of the 2x2 window with top-left (r, c), replicate border past the last row/col."""
    f = np.pad(img.astype(np.float64), ((0, 1), (0, 1)), mode="edge")
    f00, f01, f10, f11 = f[:-1, :-1], f[:-1, 1:], f[1:, :-1], f[1:, 1:]
    p = ((f01 - f00) + (f11 - f10)) / 2
    q = ((f00 - f10) + (f01 - f11)) / 2
    return p.astype(np.float32), q.astype(np.float32)


def canny_one(img, low, high, ksize=5, l2_gradient=False, gradient="sobel"):
    b = blurred(img, ksize)
    if gradient == "sobel":
        return cv2.Canny(b, low, high, L2gradient=l2_gradient)
    p, q = paper_pq(b)
    return cv2.Canny(np.rint(2 * p).astype(np.int16), np.rint(-2 * q).astype(np.int16), 2 * low, 2 * high,
                     L2gradient=l2_gradient)


def canny_batch(img, low, high, ksize=5, l2_gradient=False, gradient="sobel"):
    """The reference for a uint8 tensor of any accepted shape; returns a tensor of that shape."""
    a = img.detach().cpu().numpy()
    h, w = a.shape[-2:]
    flat = a.reshape(-1, h, w)
    out = np.stack([canny_one(np.ascontiguousarray(x), low, high, ksize, l2_gradient, gradient) for x in flat]) \
        if flat.shape[0] else np.zeros(flat.shape, np.uint8)
    return torch.from_numpy(out.reshape(a.shape))


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


def fer_images(fer2013_dir, count):
    """The first `count` test images of FER2013 (sorted paths), as an (N, 48, 48) uint8 tensor."""
    paths = sorted((fer2013_dir / "test").glob("*/*.jpg"))[:count]
    return torch.from_numpy(np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]))
