"""Fake (meta) kernels: shapes and dtypes only, so torch.compile(fullgraph=True) can trace the ops."""

import torch


# ---- Fused depthwise 3x3 conv + BatchNorm + ReLU6 ---------------------------------
# The checks mirror check_dwconv_args in csrc/include/fercuda/checks.h, message for message.

# c10::toString(ScalarType) spellings, so the fakes' messages equal the kernels'.
_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _dtype_name(dtype):
    return _DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.").capitalize()


def _shape_str(t):
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


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
