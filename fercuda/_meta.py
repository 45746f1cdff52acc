"""Fake (meta) kernels: shapes and dtypes only, so torch.compile(fullgraph=True) can trace the ops.

Validation mirrors csrc/include/fercuda/checks.h, message for message.
"""

import math

import torch

# c10::toString(ScalarType), as the C++ checks print dtypes.
_C10_DTYPE_NAMES = {
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.bool: "Bool",
}


def _dtype_name(dtype):
    return _C10_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape_str(t):
    dims = ", ".join(str(s) for s in t.shape)
    return f"({dims},)" if t.dim() == 1 else f"({dims})"


def _check_dtype(t, dtype, op, arg):
    torch._check(
        t.dtype == dtype,
        lambda: f"fercuda.{op}: argument '{arg}' must be a {_dtype_name(dtype)} tensor, got {_dtype_name(t.dtype)}",
    )


def _check_image(img, dtype, op, arg):
    _check_dtype(img, dtype, op, arg)
    torch._check(
        img.dim() in (2, 3, 4),
        lambda: f"fercuda.{op}: argument '{arg}' must have shape (H, W), (N, H, W) or (N, 1, H, W), "
        f"got a {img.dim()}-D tensor of shape {_shape_str(img)}",
    )
    if img.dim() == 4:
        torch._check(
            img.shape[1] == 1,
            lambda: f"fercuda.{op}: argument '{arg}' must have one channel when 4-D, (N, 1, H, W), "
            f"got shape {_shape_str(img)} (convert colour images to grayscale first)",
        )


def _check_same_shape(a, arg_a, b, arg_b, op):
    torch._check(
        a.shape == b.shape,
        lambda: f"fercuda.{op}: arguments '{arg_a}' and '{arg_b}' must have the same shape, "
        f"got {_shape_str(a)} and {_shape_str(b)}",
    )


def _check_ksize(ksize, op, allow_zero):
    allowed = (0, 3, 5, 7) if allow_zero else (3, 5, 7)
    torch._check(
        ksize in allowed,
        lambda: f"fercuda.{op}: argument 'ksize' must be {'0 (no blur), ' if allow_zero else ''}3, 5 or 7, got {ksize}",
    )


def _check_threshold(v, op, arg):
    torch._check(
        not math.isnan(v) and v >= 0.0, lambda: f"fercuda.{op}: argument '{arg}' must be a number >= 0, got {v}"
    )


def _check_gradient_kind(gradient, op):
    torch._check(
        gradient in ("sobel", "paper"),
        lambda: f"fercuda.{op}: argument 'gradient' must be \"sobel\" or \"paper\", got \"{gradient}\"",
    )


def _like(t, dtype):
    return torch.empty(t.shape, dtype=dtype, device=t.device)


@torch.library.register_fake("fercuda::gaussian_blur")
def _gaussian_blur_fake(img, ksize=5):
    _check_image(img, torch.uint8, "gaussian_blur", "img")
    _check_ksize(ksize, "gaussian_blur", allow_zero=False)
    return _like(img, torch.uint8)


@torch.library.register_fake("fercuda::sobel")
def _sobel_fake(img):
    _check_image(img, torch.uint8, "sobel", "img")
    return _like(img, torch.int16), _like(img, torch.int16)


@torch.library.register_fake("fercuda::paper_gradient")
def _paper_gradient_fake(img):
    _check_image(img, torch.uint8, "paper_gradient", "img")
    return _like(img, torch.float32), _like(img, torch.float32)


@torch.library.register_fake("fercuda::nms")
def _nms_fake(dx, dy, low, high, l2_gradient=False):
    _check_same_shape(dx, "dx", dy, "dy", "nms")
    _check_image(dx, torch.int16, "nms", "dx")
    _check_image(dy, torch.int16, "nms", "dy")
    _check_threshold(low, "nms", "low")
    _check_threshold(high, "nms", "high")
    return _like(dx, torch.uint8)


@torch.library.register_fake("fercuda::hysteresis")
def _hysteresis_fake(edge_map):
    _check_image(edge_map, torch.uint8, "hysteresis", "edge_map")
    return _like(edge_map, torch.uint8)


@torch.library.register_fake("fercuda::canny")
def _canny_fake(img, low=50.0, high=150.0, ksize=5, l2_gradient=False, gradient="sobel"):
    _check_image(img, torch.uint8, "canny", "img")
    _check_threshold(low, "canny", "low")
    _check_threshold(high, "canny", "high")
    _check_ksize(ksize, "canny", allow_zero=True)
    _check_gradient_kind(gradient, "canny")
    return _like(img, torch.uint8)
