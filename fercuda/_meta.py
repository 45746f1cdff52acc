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


# ---- Fused depthwise 3x3 conv + BatchNorm + ReLU6 ---------------------------------
# The checks mirror check_dwconv_args in csrc/include/fercuda/checks.h, message for message.

def _check_dwconv_channel_arg(op, t, arg, x, channels, allow_float32):
    torch._check(
        t.dim() == 1 and t.shape[0] == channels,
        lambda: f"fercuda.{op}: argument '{arg}' must have shape (C,) = ({channels},) for x of shape "
        f"{_shape_str(x)}, got {_shape_str(t)}",
    )
    torch._check(
        t.device == x.device,
        lambda: f"fercuda.{op}: arguments 'x' and '{arg}' must be on the same device, got {x.device} and {t.device}",
    )
    or_float = " or Float" if allow_float32 and x.dtype != torch.float32 else ""
    torch._check(
        t.dtype == x.dtype or (allow_float32 and t.dtype == torch.float32),
        lambda: f"fercuda.{op}: argument '{arg}' must be a {_dtype_name(x.dtype)}{or_float} tensor like x, "
        f"got {_dtype_name(t.dtype)}",
    )


def _dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, mean, var, stride, padding,
                      mean_arg="running_mean", var_arg="running_var"):
    torch._check(
        x.dim() == 4,
        lambda: f"fercuda.{op}: argument 'x' must be a 4-D (N, C, H, W) tensor, got a {x.dim()}-D tensor of "
        f"shape {_shape_str(x)}",
    )
    allow_double = x.device.type == "cpu"
    kinds = "Float, Double, Half or BFloat16" if allow_double else "Float, Half or BFloat16"
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16) or (allow_double and x.dtype == torch.float64),
        lambda: f"fercuda.{op}: argument 'x' must be a {kinds} tensor, got {_dtype_name(x.dtype)}",
    )
    n, c, h, w = x.shape
    torch._check(
        weight.dim() == 4 and tuple(weight.shape) == (c, 1, 3, 3),
        lambda: f"fercuda.{op}: argument 'weight' must have shape (C, 1, 3, 3) = ({c}, 1, 3, 3) for x of shape "
        f"{_shape_str(x)}, got {_shape_str(weight)}",
    )
    torch._check(
        weight.device == x.device,
        lambda: f"fercuda.{op}: arguments 'x' and 'weight' must be on the same device, got {x.device} and "
        f"{weight.device}",
    )
    torch._check(
        weight.dtype == x.dtype,
        lambda: f"fercuda.{op}: argument 'weight' must be a {_dtype_name(x.dtype)} tensor like x, got "
        f"{_dtype_name(weight.dtype)}",
    )
    if bias is not None:
        _check_dwconv_channel_arg(op, bias, "bias", x, c, False)
    half = x.dtype != torch.float32
    _check_dwconv_channel_arg(op, bn_weight, "bn_weight", x, c, half)
    _check_dwconv_channel_arg(op, bn_bias, "bn_bias", x, c, half)
    _check_dwconv_channel_arg(op, mean, mean_arg, x, c, True)
    _check_dwconv_channel_arg(op, var, var_arg, x, c, True)
    torch._check(stride in (1, 2), lambda: f"fercuda.{op}: argument 'stride' must be 1 or 2, got {stride}")
    torch._check(padding >= 0, lambda: f"fercuda.{op}: argument 'padding' must be >= 0, got {padding}")
    torch._check(
        h + 2 * padding >= 3 and w + 2 * padding >= 3,
        lambda: f"fercuda.{op}: the padded input must be at least 3x3 for a 3x3 kernel, got x of shape "
        f"{_shape_str(x)} with padding {padding}",
    )
    return n, c, (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1


def _dwconv_memory_format(x):
    # Same rule as the kernels: channels_last only when x is not also NCHW-contiguous.
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dwconv_empty(x, shape):
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_dwconv_memory_format(x))


@torch.library.register_fake("fercuda::dwconv_bn_relu6")
def _dwconv_bn_relu6_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1, padding=1,
                          eps=1e-5):
    shape = _dwconv_out_shape("dwconv_bn_relu6", x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              stride, padding)
    return _dwconv_empty(x, shape)


@torch.library.register_fake("fercuda::dwconv_bn_relu6_train")
def _dwconv_bn_relu6_train_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1,
                                padding=1, eps=1e-5, momentum=0.1):
    op = "dwconv_bn_relu6_train"
    n, c, h_out, w_out = _dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                           stride, padding)
    if n * c * h_out * w_out != 0:
        torch._check(
            n * h_out * w_out > 1,
            lambda: f"fercuda.{op}: Expected more than 1 value per channel when training, got input size "
            f"[{n}, {c}, {h_out}, {w_out}]",
        )
    stats = x.new_empty((c,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (
        _dwconv_empty(x, (n, c, h_out, w_out)),
        stats,
        stats.new_empty((c,)),
        running_mean.new_empty((c,)),
        running_var.new_empty((c,)),
    )


@torch.library.register_fake("fercuda::dwconv_bn_relu6_backward")
def _dwconv_bn_relu6_backward_fake(grad_out, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                   training):
    op = "dwconv_bn_relu6_backward"
    out = _dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, "mean",
                            "invstd")
    torch._check(
        grad_out.dim() == 4 and tuple(grad_out.shape) == tuple(out),
        lambda: f"fercuda.{op}: argument 'grad_out' must have the output's shape ({out[0]}, {out[1]}, {out[2]}, "
        f"{out[3]}), got {_shape_str(grad_out)}",
    )
    torch._check(
        grad_out.device == x.device,
        lambda: f"fercuda.{op}: arguments 'x' and 'grad_out' must be on the same device, got {x.device} and "
        f"{grad_out.device}",
    )
    torch._check(
        grad_out.dtype == x.dtype,
        lambda: f"fercuda.{op}: argument 'grad_out' must be a {_dtype_name(x.dtype)} tensor like x, got "
        f"{_dtype_name(grad_out.dtype)}",
    )
    c = x.shape[1]
    return (
        _dwconv_empty(x, tuple(x.shape)),
        weight.new_empty((c, 1, 3, 3)),
        weight.new_empty((c,)),
        bn_weight.new_empty((c,)),
        bn_bias.new_empty((c,)),
    )
