"""fercuda against its peers, on built-in inputs: ``python -m fercuda.compare``.

Prints one table: for each case, how fercuda's output agrees with its reference (differing
pixels against OpenCV for Canny, the largest error against float64 PyTorch for the fused block),
the median time of fercuda and of each peer, and fercuda's speed-up over each. Sections are functions that
return rows (SECTIONS at the bottom); a new kernel family adds its own section.

Environment: FERCUDA_FER2013 (folder holding FER2013's train/ and test/), FERCUDA_COMPARE_THREADS
(threads for torch and cv2 alike; default torch's).
"""

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fercuda import ops

FER2013 = Path(os.environ.get("FERCUDA_FER2013", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"))


@dataclass
class Row:
    section: str
    case: str
    reference: str  # what "differing" counts against
    differing: int | None  # elements of fercuda's output that differ from the reference
    fercuda_ms: float
    peers_ms: dict[str, float | None] = field(default_factory=dict)  # None: peer not available
    max_error: float | None = None  # for floating-point outputs: largest |fercuda - reference|


def median_ms(fn, repeat=5, budget_s=2.0):
    """Median of up to `repeat` timed calls after one warm-up, fewer when a call is slow."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    repeat = max(1, min(repeat, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _fer_images(split, count):
    files = sorted((FER2013 / split).glob("*/*.jpg"))[:count]
    if not files:
        return None
    import cv2

    return np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files])


def _synthetic_picture(height, width, seed=0):
    """Smooth shapes with edges: random blobs, upscaled, plus a few rectangles and circles."""
    import cv2

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


def canny_section():
    """Canny (Gaussian 5x5, thresholds 50 / 150, L1) against cv2 (reference) and kornia."""
    import cv2

    try:
        import kornia
    except ImportError:
        kornia = None
    low, high, ksize = 50, 150, 5

    def cv2_canny(images):
        return np.stack([cv2.Canny(cv2.GaussianBlur(im, (ksize, ksize), 0), low, high) for im in images])

    def kornia_canny(batch):
        x = batch[:, None].float().div_(255)
        return kornia.filters.canny(x, low / 255, high / 255, kernel_size=(ksize, ksize))[1]

    rng = np.random.default_rng(0)
    cases = [
        ("noise 1024 x 48x48", rng.integers(0, 256, (1024, 48, 48), dtype=np.uint8)),
        ("noise 1920x1080", rng.integers(0, 256, (1, 1080, 1920), dtype=np.uint8)),
        ("synthetic picture 1920x1080", _synthetic_picture(1080, 1920)[None]),
    ]
    fer = _fer_images("test", 4096)
    if fer is not None:
        cases.append((f"FER2013 test {len(fer)} x 48x48", fer))
        mosaic = np.concatenate([np.concatenate(list(fer[r * 40:(r + 1) * 40]), 1) for r in range(24)], 0)
        cases.append(("FER2013 mosaic upscaled 1920x1080",
                      cv2.resize(mosaic, (1920, 1080), interpolation=cv2.INTER_CUBIC)[None]))
    else:
        print(f"(FER2013 not found at {FER2013}: its cases are skipped; set FERCUDA_FER2013)")

    rows = []
    for name, images in cases:
        batch = torch.from_numpy(np.ascontiguousarray(images))
        ours = ops.canny(batch, low, high, ksize=ksize).numpy()
        differing = int((ours != cv2_canny(images)).sum())
        peers = {"OpenCV": median_ms(lambda: cv2_canny(images))}
        if kornia is None:
            peers["kornia"] = None
        else:
            # kornia's hysteresis iterates to convergence (~50 ms a 48x48 image, tens of seconds
            # at 1080p): time 8 images, or a 1/64 crop of a large one, and scale by pixel count.
            part = batch[:8, : max(1, batch.shape[1] // 8), : max(1, batch.shape[2] // 8)] if len(batch) == 1 else batch[:8]
            scale = batch.numel() / part.numel()
            peers["kornia"] = median_ms(lambda: kornia_canny(part), repeat=1) * scale
        rows.append(Row("canny", name, "cv2", differing, median_ms(lambda: ops.canny(batch, low, high, ksize=ksize)), peers))
    return rows


def dwconv_section():
    """Fused depthwise conv + BatchNorm + ReLU6 (inference, float32) against eager PyTorch and
    torch.compile; the reference is the eager block in float64."""
    from fercuda.compare_dwconv import dwconv_section as rows_of

    return [
        Row("dwconv_bn_relu6", case.removeprefix("dwconv_bn_relu6 "), "float64", None, t_fused,
            {"eager PyTorch": t_eager, "torch.compile": t_compile}, max_error=err)
        for case, err, t_fused, t_eager, t_compile, _, _ in rows_of()
    ]


SECTIONS = [canny_section, dwconv_section]


def format_table(rows):
    peer_names = list(dict.fromkeys(name for row in rows for name in row.peers_ms))
    header = ["section", "case", "agreement (vs)", "fercuda ms"]
    header += [f"{p} ms" for p in peer_names] + [f"speed-up vs {p}" for p in peer_names]
    lines = []
    for row in rows:
        if row.max_error is not None:
            agreement = f"max err {row.max_error:.1e} ({row.reference})"
        else:
            agreement = "-" if row.differing is None else f"{row.differing} ({row.reference})"
        line = [row.section, row.case, agreement, f"{row.fercuda_ms:.2f}"]
        peer_ms = [row.peers_ms.get(p) for p in peer_names]
        line += ["-" if t is None else f"{t:.2f}" for t in peer_ms]
        line += ["-" if t is None else f"{t / row.fercuda_ms:.1f}x" for t in peer_ms]
        lines.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def main():
    import cv2

    threads = int(os.environ.get("FERCUDA_COMPARE_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    print(f"fercuda compare: torch {torch.__version__}, OpenCV {cv2.__version__}, {threads} threads for both")
    rows = []
    for section in SECTIONS:
        rows += section()
    print(format_table(rows))
    print("kornia: timed on 8 images or a 1/64 crop and scaled by pixel count (an estimate).")
    if any(row.differing for row in rows) or any(row.max_error is not None and row.max_error > 1e-4 for row in rows):
        raise SystemExit("fercuda compare: some outputs differ from their reference")


if __name__ == "__main__":
    main()
