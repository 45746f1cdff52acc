"""Public entry points of fercuda's operators (torch.ops.fercuda.*).

Images are uint8 tensors shaped (H, W), (N, H, W) or (N, 1, H, W), any strides (channels_last
included); every output has the input's shape and is contiguous. Each function is a thin
wrapper over its registered op, so torch.compile, export and opcheck see the op itself.
"""

import torch

from fercuda import _build_info
from fercuda import _meta  # noqa: F401  (fake kernels for torch.compile)

_CUDA_KERNELS_BUILT = bool(_build_info.WITH_CUDA)


def _check_device(op, *tensors):
    """A CUDA tensor needs a build with CUDA kernels; say so rather than the dispatcher's message."""
    for t in tensors:
        if t.device.type == "cuda" and not _CUDA_KERNELS_BUILT:
            raise RuntimeError(
                f"fercuda.{op}: got a CUDA tensor, but this build of fercuda holds no CUDA kernels "
                "(it was built without a CUDA toolkit or with USE_CUDA=0). Rebuild with a CUDA toolkit "
                "on the path (FORCE_CUDA=1 makes a missing toolkit an error): "
                "`FORCE_CUDA=1 pip install -e . --no-build-isolation`, or move the tensor to the CPU."
            )


def gaussian_blur(img: torch.Tensor, ksize: int = 5) -> torch.Tensor:
    """Gaussian blur of uint8 images, equal to ``cv2.GaussianBlur(img, (ksize, ksize), 0)``.

    ksize is 3, 5 or 7 (sigma from ksize, as cv2 does for sigma 0); reflect-101 border.
    Bit-exact with OpenCV's 8-bit fixed-point arithmetic.
    """
    _check_device("gaussian_blur", img)
    return torch.ops.fercuda.gaussian_blur.default(img, ksize)


def sobel(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives (dx, dy) as int16, equal to
    ``cv2.Sobel(img, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)`` and the same
    with (0, 1): the gradients cv2.Canny computes internally.
    """
    _check_device("sobel", img)
    return torch.ops.fercuda.sobel.default(img)


def paper_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2x2 finite differences (P, Q) of the paper's eq. (2), float32.

    On the window whose top-left pixel is (r, c), with the row and column beyond the last
    replicated: P = (f[r, c+1] - f[r, c] + f[r+1, c+1] - f[r+1, c]) / 2 (along columns),
    Q = (f[r, c] - f[r+1, c] + f[r, c+1] - f[r+1, c+1]) / 2 (the paper's y axis points up).
    """
    _check_device("paper_gradient", img)
    return torch.ops.fercuda.paper_gradient.default(img)


def nms(dx: torch.Tensor, dy: torch.Tensor, low: float, high: float, *, l2_gradient: bool = False) -> torch.Tensor:
    """Canny's non-maximum suppression and double threshold on int16 gradients.

    Returns a uint8 map: 0 not an edge, 1 weak candidate, 2 strong edge.
    ``hysteresis(nms(dx, dy, low, high, l2_gradient=L2))`` equals
    ``cv2.Canny(dx, dy, low, high, L2gradient=L2)`` bit for bit, for any int16 dx, dy.
    Thresholds follow cv2: swapped if low > high, floored (L2: clamped to 32767, squared, floored).
    """
    _check_device("nms", dx, dy)
    return torch.ops.fercuda.nms.default(dx, dy, float(low), float(high), bool(l2_gradient))


def hysteresis(edge_map: torch.Tensor) -> torch.Tensor:
    """Hysteresis over an ``nms`` map: 255 for strong pixels and every weak pixel 8-connected
    to one through weak pixels, 0 elsewhere (uint8), as cv2.Canny's last stage.
    """
    _check_device("hysteresis", edge_map)
    return torch.ops.fercuda.hysteresis.default(edge_map)


def canny(
    img: torch.Tensor,
    low: float = 50,
    high: float = 150,
    *,
    ksize: int = 5,
    l2_gradient: bool = False,
    gradient: str = "sobel",
) -> torch.Tensor:
    """Canny edges of uint8 images (255 edge, 0 elsewhere), in one pass per image.

    Equal bit for bit to ``cv2.Canny(cv2.GaussianBlur(img, (ksize, ksize), 0), low, high,
    L2gradient=l2_gradient)``; ksize=0 skips the blur (plain ``cv2.Canny(img, ...)``).
    gradient="paper" replaces Sobel by the paper's 2x2 differences: edges equal
    ``cv2.Canny(2 * P, -2 * Q, 2 * low, 2 * high)`` with (P, Q) = paper_gradient(blurred image).
    """
    _check_device("canny", img)
    return torch.ops.fercuda.canny.default(img, float(low), float(high), ksize, bool(l2_gradient), gradient)
