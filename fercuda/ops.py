"""Public entry points of fercuda's operators (torch.ops.fercuda.*).

Images are uint8 tensors shaped (H, W), (N, H, W) or (N, 1, H, W), any strides (channels_last
included); every output has the input's shape and is contiguous. The image ops also take numpy
arrays, as cv2 users hold them, and then return numpy arrays: the input is viewed with
torch.from_numpy and the output with .numpy(), no copies (but of an array with negative strides,
which tensors cannot have). Each function is a thin wrapper over its registered op, so
torch.compile, export and opcheck see the op itself.
"""

import os

import numpy as np
import torch

from fercuda import _build_info, _checks
from fercuda import _meta  # noqa: F401  (fake kernels for torch.compile)

_CUDA_KERNELS_BUILT = bool(_build_info.WITH_CUDA)

# Kernels behind each op: "cpu" and "cuda" are the C++ kernels of torch.ops.fercuda for that
# device; "triton" the Triton kernels of fercuda.triton (CUDA tensors, or CPU tensors under
# TRITON_INTERPRET=1). None picks the C++ kernel of the input's device.
BACKENDS = ("cpu", "cuda", "triton")


def _backend(op, backend, tensor):
    """Validate a backend= argument against the input's device; returns the backend to run."""
    if backend is None:
        return "cuda" if tensor.device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"fercuda.{op}: argument 'backend' must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"fercuda.{op}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for Triton's "
                f"CPU interpreter), got a tensor on {tensor.device}"
            )
        return backend
    if tensor.device.type != backend:
        raise ValueError(
            f"fercuda.{op}: backend={backend!r} needs a tensor on {backend}, got a tensor on {tensor.device}"
        )
    return backend


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


def _as_tensor(img, dtype, op, arg):
    """An image argument as a tensor: a tensor as it is, a numpy array as a tensor sharing its memory
    (of any dtype tensors have: the op's check then names a wrong one as it would a tensor's)."""
    _checks.check_image_type(img, dtype, op, arg)
    if isinstance(img, torch.Tensor):
        return img
    _checks.check_numpy_dtype(img, dtype, op, arg)
    if not img.dtype.isnative or any(s < 0 for s in img.strides):
        # Tensors have neither a foreign byte order nor negative strides (a flipped view, img[::-1]).
        img = np.ascontiguousarray(img, dtype=img.dtype.newbyteorder("="))
    return torch.from_numpy(img)


def _as_numpy_if(numpy_in, out):
    """The op's output (a tensor or a tuple of them), as numpy arrays when the input was one."""
    if not numpy_in:
        return out
    return tuple(t.numpy() for t in out) if isinstance(out, tuple) else out.numpy()


def _check_thresholds(op, low, high):
    _checks.check_threshold_type(low, op, "low")
    _checks.check_threshold_type(high, op, "high")


def gaussian_blur(img: torch.Tensor, ksize: int = 5) -> torch.Tensor:
    """Gaussian blur of uint8 images, equal to ``cv2.GaussianBlur(img, (ksize, ksize), 0)``.

    ksize is 3, 5 or 7 (sigma from ksize, as cv2 does for sigma 0); reflect-101 border.
    Bit-exact with OpenCV's 8-bit fixed-point arithmetic. img may be a numpy array (then so is the output).
    """
    t = _as_tensor(img, torch.uint8, "gaussian_blur", "img")
    _check_device("gaussian_blur", t)
    return _as_numpy_if(t is not img, torch.ops.fercuda.gaussian_blur.default(t, ksize))


def sobel(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives (dx, dy) as int16, equal to
    ``cv2.Sobel(img, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)`` and the same
    with (0, 1): the gradients cv2.Canny computes internally. img may be a numpy array (then so
    are dx and dy).
    """
    t = _as_tensor(img, torch.uint8, "sobel", "img")
    _check_device("sobel", t)
    return _as_numpy_if(t is not img, torch.ops.fercuda.sobel.default(t))


def paper_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2x2 finite differences (P, Q) of the paper's eq. (2), float32.

    On the window whose top-left pixel is (r, c), with the row and column beyond the last
    replicated: P = (f[r, c+1] - f[r, c] + f[r+1, c+1] - f[r+1, c]) / 2 (along columns),
    Q = (f[r, c] - f[r+1, c] + f[r, c+1] - f[r+1, c+1]) / 2 (the paper's y axis points up).
    img may be a numpy array (then so are P and Q).
    """
    t = _as_tensor(img, torch.uint8, "paper_gradient", "img")
    _check_device("paper_gradient", t)
    return _as_numpy_if(t is not img, torch.ops.fercuda.paper_gradient.default(t))


def nms(dx: torch.Tensor, dy: torch.Tensor, low: float, high: float, *, l2_gradient: bool = False) -> torch.Tensor:
    """Canny's non-maximum suppression and double threshold on int16 gradients.

    Returns a uint8 map: 0 not an edge, 1 weak candidate, 2 strong edge.
    ``hysteresis(nms(dx, dy, low, high, l2_gradient=L2))`` equals
    ``cv2.Canny(dx, dy, low, high, L2gradient=L2)`` bit for bit, for any int16 dx, dy.
    Thresholds follow cv2: swapped if low > high, floored (L2: clamped to 32767, squared, floored).
    As cv2 on x86 floors them, an L1 threshold >= 2**31, inf included, becomes INT_MIN: high=inf
    makes every candidate above low strong, so edges are found where cv2.Canny finds them.
    dx and dy may be numpy arrays (then so is the output).
    """
    tx = _as_tensor(dx, torch.int16, "nms", "dx")
    ty = _as_tensor(dy, torch.int16, "nms", "dy")
    _check_thresholds("nms", low, high)
    _check_device("nms", tx, ty)
    out = torch.ops.fercuda.nms.default(tx, ty, float(low), float(high), bool(l2_gradient))
    return _as_numpy_if(tx is not dx or ty is not dy, out)


def hysteresis(edge_map: torch.Tensor) -> torch.Tensor:
    """Hysteresis over an ``nms`` map: 255 for strong pixels and every weak pixel 8-connected
    to one through weak pixels, 0 elsewhere (uint8), as cv2.Canny's last stage. edge_map may be a
    numpy array (then so is the output).
    """
    t = _as_tensor(edge_map, torch.uint8, "hysteresis", "edge_map")
    _check_device("hysteresis", t)
    return _as_numpy_if(t is not edge_map, torch.ops.fercuda.hysteresis.default(t))


def canny(
    img: torch.Tensor,
    low: float = 50,
    high: float = 150,
    *,
    ksize: int = 5,
    l2_gradient: bool = False,
    gradient: str = "sobel",
    backend: str | None = None,
) -> torch.Tensor:
    """Canny edges of uint8 images (255 edge, 0 elsewhere), in one pass per image.

    Equal bit for bit to ``cv2.Canny(cv2.GaussianBlur(img, (ksize, ksize), 0), low, high,
    L2gradient=l2_gradient)``; ksize=0 skips the blur (plain ``cv2.Canny(img, ...)``).
    gradient="paper" replaces Sobel by the paper's 2x2 differences: edges equal
    ``cv2.Canny(2 * P, -2 * Q, 2 * low, 2 * high)`` with (P, Q) = paper_gradient(blurred image).
    Thresholds follow cv2 as in ``nms``: an L1 threshold >= 2**31, inf included, is floored to
    INT_MIN as cv2 on x86 floors it, so ``canny(img, 20, inf)`` finds edges, those of cv2.Canny.

    img may be a numpy array (then so is the output). backend: None (the C++ kernel of img's
    device), "cpu", "cuda" or "triton"; every backend returns the same pixels.
    """
    t = _as_tensor(img, torch.uint8, "canny", "img")
    _check_thresholds("canny", low, high)
    if _backend("canny", backend, t) == "triton":
        from fercuda.triton.canny import canny as canny_triton

        out = canny_triton(t, float(low), float(high), ksize=ksize, l2_gradient=l2_gradient, gradient=gradient)
        return _as_numpy_if(t is not img, out)
    _check_device("canny", t)
    out = torch.ops.fercuda.canny.default(t, float(low), float(high), ksize, bool(l2_gradient), gradient)
    return _as_numpy_if(t is not img, out)


# ==== Fused depthwise 3x3 conv + BatchNorm + ReLU6 ====================================

from fercuda import _autograd  # noqa: E402,F401  (autograd of the dwconv_bn_relu6 ops)


def dwconv_bn_relu6(
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    *,
    stride=1,
    padding=1,
    eps=1e-5,
    momentum=0.1,
    training=False,
    backend=None,
):
    """relu6(batch_norm(conv2d(x, weight, bias, stride, padding, groups=C))) in one fused op.

    x is (N, C, H, W), NCHW-contiguous or channels_last (the output keeps the format);
    weight (C, 1, 3, 3); bias (C,) or None; BatchNorm tensors (C,), float32 allowed when x
    is float16 / bfloat16. training=False normalizes with the running statistics;
    training=True with the batch statistics, and updates running_mean / running_var in
    place as nn.BatchNorm2d does with this momentum (use momentum = 1 / num_batches_tracked
    for BatchNorm's cumulative average). Differentiable in both modes.

    backend: None (the C++ kernel of x's device), "cpu", "cuda" or "triton". eps must be finite
    and > 0, momentum in [0, 1] (or None when training=False, where it is unused).
    """
    for arg, v in (("x", x), ("weight", weight), ("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                   ("running_mean", running_mean), ("running_var", running_var)):
        _checks.check_tensor_type(v, "dwconv_bn_relu6", arg, optional=arg == "bias")
    _checks.check_dwconv_eps_momentum("dwconv_bn_relu6", eps, momentum, training)
    # The Triton ops have the C++ ops' contract (outputs, no mutation, fakes, autograd): only the op differs.
    if _backend("dwconv_bn_relu6", backend, x) == "triton":
        from fercuda.triton import dwconv  # noqa: F401  (registers the Triton ops)

        suffix = "_triton"
    else:
        _check_device("dwconv_bn_relu6", x)
        suffix = ""
    if training:
        out, _, _, new_mean, new_var, _ = getattr(torch.ops.fercuda, "dwconv_bn_relu6_train" + suffix)(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, eps, momentum
        )
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        return out
    return getattr(torch.ops.fercuda, "dwconv_bn_relu6" + suffix)(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, eps
    )


# ==== BatchNorm + ReLU6 (or identity) + residual add ===================================


def batch_norm_act(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    residual=None,
    *,
    relu6=True,
    eps=1e-5,
    momentum=0.1,
    training=False,
    backend=None,
):
    """``relu6(batch_norm(x)) + residual`` in one op: what follows a conv.

    x is (N, C, H, W), NCHW-contiguous or channels_last (the output keeps the format); weight,
    bias, running_mean, running_var (C,), float32 allowed when x is float16 / bfloat16; residual
    None or a tensor of x's shape and dtype, added after the activation. relu6=False leaves the
    activation out (BatchNorm, then the add). training=False normalizes with the running
    statistics; training=True with the batch statistics, and updates running_mean / running_var in
    place as nn.BatchNorm2d does with this momentum. Differentiable in both modes.

    backend: None (the C++ kernel of x's device), "cpu", "cuda" or "triton". eps must be finite
    and > 0, momentum in [0, 1] (or None when training=False, where it is unused).
    """
    op = "batch_norm_act"
    _checks.check_bn_act_entry(op, dict(x=x, weight=weight, bias=bias, running_mean=running_mean,
                                        running_var=running_var, residual=residual), eps, momentum, training)
    # The Triton ops have the C++ ops' contract (outputs, no mutation, fakes, autograd): only the op differs.
    if _backend(op, backend, x) == "triton":
        from fercuda.triton import bn_act  # noqa: F401  (registers the Triton ops)

        suffix = "_triton"
    else:
        _check_device(op, x)
        suffix = ""
    if training:
        out, _, _, new_mean, new_var = getattr(torch.ops.fercuda, "batch_norm_act_train" + suffix)(
            x, weight, bias, running_mean, running_var, residual, bool(relu6), eps, momentum
        )
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        return out
    return getattr(torch.ops.fercuda, "batch_norm_act" + suffix)(
        x, weight, bias, running_mean, running_var, residual, bool(relu6), eps
    )
