"""Canny's comparison: the settings, the inputs (FER2013 faces, a mosaic of them, pictures), the
peers (cv2 on the CPU, the reference; kornia) and the Canny section of ``python -m fercuda.compare``.

benchmarks/bench_canny_cpu.py and bench_canny_gpu.py time the same inputs against the same peers.
fercuda.ops and fercuda.data are imported where they are used: benchmarks/gpu_warmup.py reads
this module's settings before fercuda._C is built.
"""

import cv2
import numpy as np
import torch

from fercuda.compare import Row, median_ms

# Gaussian 5x5, then thresholds 50 / 150 with the L1 gradient: what every comparison runs.
LOW, HIGH, KSIZE = 50.0, 150.0, 5
MOSAIC = (24, 40)  # rows x columns of 48x48 faces: 1152x1920, upscaled to 1920x1080


def cv2_canny(images):
    """cv2.Canny(cv2.GaussianBlur(image, (KSIZE, KSIZE), 0), LOW, HIGH) of one (H, W) image, or of
    each image of an (N, H, W) batch stacked into one array: the reference, and what a user calls."""
    images = np.asarray(images)
    if images.ndim == 2:
        return cv2.Canny(cv2.GaussianBlur(images, (KSIZE, KSIZE), 0), LOW, HIGH)
    return np.stack([cv2.Canny(cv2.GaussianBlur(im, (KSIZE, KSIZE), 0), LOW, HIGH) for im in images])


def kornia_canny(images):
    """A call of kornia.filters.canny on uint8 images ((H, W) or (N, H, W), any device), returning
    its edges. kornia works on float (N, 1, H, W) in [0, 1] with thresholds on that scale: the
    conversion is done once, outside the call, as a kornia user would hold float images."""
    import kornia

    x = images.reshape(-1, 1, *images.shape[-2:]).float().div_(255.0)
    return lambda: kornia.filters.canny(x, LOW / 255.0, HIGH / 255.0, kernel_size=(KSIZE, KSIZE))[1]


def fer_images(count, splits=("train",), root=None):
    """The first `count` FER2013 faces (uint8, (count, 48, 48)) of the splits' files in sorted
    order, or None where fewer are found. root: default fercuda.data.default_fer2013_root()."""
    if root is None:
        from fercuda.data import default_fer2013_root

        root = default_fer2013_root()
    files = [f for split in splits for f in sorted((root / split).glob("*/*.jpg"))][:count]
    if len(files) < count:
        return None
    return np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files])


def fer_mosaic(faces, size=(1920, 1080)):
    """A photograph-like picture: the first 24 x 40 faces side by side, upscaled (bicubic) to size (W, H)."""
    rows, cols = MOSAIC
    mosaic = np.concatenate([np.concatenate(list(faces[r * cols:(r + 1) * cols]), 1) for r in range(rows)], 0)
    return np.ascontiguousarray(cv2.resize(mosaic, size, interpolation=cv2.INTER_CUBIC))


def synthetic_picture(height, width, seed=0):
    """Smooth shapes with edges: random blobs, upscaled, plus a few rectangles and circles."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (height // 16, width // 16), dtype=np.uint8), (width, height),
                     interpolation=cv2.INTER_CUBIC)
    for _ in range(20):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        color = int(rng.integers(0, 256))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(10, height // 4)), color, -1)
        else:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(10, width // 4)), y + int(rng.integers(10, height // 4))),
                          color, -1)
    return img


def picture_1080p(faces=None):
    """A 1920x1080 picture: the mosaic of `faces` (default the first FER2013 train faces), or a
    synthetic picture where FER2013 is absent. Returns (picture, what it is)."""
    if faces is None:
        faces = fer_images(MOSAIC[0] * MOSAIC[1])
    if faces is None or len(faces) < MOSAIC[0] * MOSAIC[1]:
        return synthetic_picture(1080, 1920), "synthetic picture"
    return fer_mosaic(faces), "FER2013 mosaic upscaled"


def canny_section():
    """Canny against cv2 (reference) and kornia, on the CPU."""
    from fercuda import ops

    try:
        import kornia  # noqa: F401
    except ImportError:
        kornia = None

    rng = np.random.default_rng(0)
    cases = [
        ("noise 1024 x 48x48", rng.integers(0, 256, (1024, 48, 48), dtype=np.uint8)),
        ("noise 1920x1080", rng.integers(0, 256, (1, 1080, 1920), dtype=np.uint8)),
        ("synthetic picture 1920x1080", synthetic_picture(1080, 1920)[None]),
    ]
    fer = fer_images(4096, ("test",))
    if fer is not None:
        cases.append((f"FER2013 test {len(fer)} x 48x48", fer))
        picture, name = picture_1080p(fer)
        cases.append((f"{name} 1920x1080", picture[None]))
    else:
        from fercuda.data import FER2013_ENV, default_fer2013_root

        print(f"(FER2013 not found at {default_fer2013_root()}: its cases are skipped; set {FER2013_ENV})")

    rows = []
    for name, images in cases:
        batch = torch.from_numpy(np.ascontiguousarray(images))
        ours = ops.canny(batch, LOW, HIGH, ksize=KSIZE).numpy()
        differing = int((ours != cv2_canny(images)).sum())
        peers = {"OpenCV": median_ms(lambda: cv2_canny(images), budget_s=2.0)}
        if kornia is None:
            peers["kornia"] = None
        else:
            # kornia's hysteresis iterates to convergence (~50 ms a 48x48 image, tens of seconds
            # at 1080p): time 8 images, or a 1/64 crop of a large one, and scale by pixel count.
            part = batch[:8, : max(1, batch.shape[1] // 8), : max(1, batch.shape[2] // 8)] if len(batch) == 1 else batch[:8]
            scale = batch.numel() / part.numel()
            peers["kornia"] = median_ms(kornia_canny(part), 1, budget_s=2.0) * scale
        fercuda_ms = median_ms(lambda: ops.canny(batch, LOW, HIGH, ksize=KSIZE), budget_s=2.0)
        rows.append(Row("canny", name, "cv2", differing, fercuda_ms, peers))
    return rows
