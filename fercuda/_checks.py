"""Input validation of fercuda's ops on the Python side, written once: the fake kernels
(fercuda/_meta.py) and the Triton ops (fercuda/triton/) call these functions. Each mirrors
csrc/include/fercuda/checks.h message for message and raises the C++ kernels' exception type:
RuntimeError, ValueError for TORCH_CHECK_VALUE (torch._check / torch._check_value where shapes are
symbolic, under torch.compile). The public entry points (fercuda/ops.py) also check here, with
TypeError, the Python types a registered op's schema would not take or would silently convert.
"""

import math
import numbers

import numpy as np
import torch


def _check(cond, message):
    """torch._check for symbolic conditions (fake tensors under torch.compile); a plain raise for
    concrete ones, which Dynamo can trace through the Triton ops' Python wrappers."""
    if isinstance(cond, torch.SymBool):
        torch._check(cond, message)
    elif not cond:
        raise RuntimeError(message())


def _check_value(cond, message):
    """_check raising ValueError, as TORCH_CHECK_VALUE does."""
    if isinstance(cond, torch.SymBool):
        torch._check_value(cond, message)
    elif not cond:
        raise ValueError(message())


def cpp_double_str(v):
    """A double as C++ streams it (precision 6, %g): what the C++ checks print."""
    return format(float(v), "g")


# c10::toString(ScalarType), as the C++ checks print dtypes.
C10_DTYPE_NAMES = {
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


def dtype_name(dtype):
    return C10_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def shape_str(t):
    dims = ", ".join(str(s) for s in t.shape)
    return f"({dims},)" if t.dim() == 1 else f"({dims})"


def check_dtype(t, dtype, op, arg):
    _check(
        t.dtype == dtype,
        lambda: f"fercuda.{op}: argument '{arg}' must be a {dtype_name(dtype)} tensor, got {dtype_name(t.dtype)}",
    )


def check_image(img, dtype, op, arg):
    check_dtype(img, dtype, op, arg)
    _check(
        img.dim() in (2, 3, 4),
        lambda: f"fercuda.{op}: argument '{arg}' must have shape (H, W), (N, H, W) or (N, 1, H, W), "
        f"got a {img.dim()}-D tensor of shape {shape_str(img)}",
    )
    if img.dim() == 4:
        _check(
            img.shape[1] == 1,
            lambda: f"fercuda.{op}: argument '{arg}' must have one channel when 4-D, (N, 1, H, W), "
            f"got shape {shape_str(img)} (convert colour images to grayscale first)",
        )


def check_same_shape(a, arg_a, b, arg_b, op):
    _check(
        a.shape == b.shape,
        lambda: f"fercuda.{op}: arguments '{arg_a}' and '{arg_b}' must have the same shape, "
        f"got {shape_str(a)} and {shape_str(b)}",
    )


def check_ksize(ksize, op, allow_zero):
    allowed = (0, 3, 5, 7) if allow_zero else (3, 5, 7)
    _check(
        ksize in allowed,
        lambda: f"fercuda.{op}: argument 'ksize' must be {'0 (no blur), ' if allow_zero else ''}3, 5 or 7, got {ksize}",
    )


def _type_name(v):
    return f"{type(v).__module__}.{type(v).__name__}" if type(v).__module__ == "numpy" else type(v).__name__


def _image_type_error(dtype, op, arg, given):
    return TypeError(
        f"fercuda.{op}: argument '{arg}' must be a torch.Tensor or numpy.ndarray of "
        f"{str(dtype).removeprefix('torch.')}, got {given}"
    )


def check_image_type(img, dtype, op, arg):
    """An image argument of the public entry points: a tensor, or a numpy array they convert."""
    if not isinstance(img, (torch.Tensor, np.ndarray)):
        raise _image_type_error(dtype, op, arg, _type_name(img))


# The numpy dtypes torch.from_numpy converts (in either byte order).
_TENSOR_NUMPY_DTYPES = frozenset(
    np.dtype(name)
    for name in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                 "float16", "float32", "float64", "complex64", "complex128")
)


def check_numpy_dtype(img, dtype, op, arg):
    """A numpy image of a dtype no tensor has (strings, objects, long double) is refused here; of
    any other the op's check names a wrong one, as it does a tensor's."""
    if img.dtype.newbyteorder("=") not in _TENSOR_NUMPY_DTYPES:
        raise _image_type_error(dtype, op, arg, f"a numpy.ndarray of {img.dtype}")


def check_tensor_type(v, op, arg, optional=False):
    """A tensor argument of a non-image op (numpy arrays are not converted: these ops hold weights
    and running statistics that they update in place)."""
    if not isinstance(v, torch.Tensor) and not (optional and v is None):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"fercuda.{op}: argument '{arg}' must be {expected}, got {_type_name(v)}")


def _is_real_number(v):
    """A real number: an int or float (numpy's and symbolic ones included) or a 0-D real tensor.
    Not a bool, which a schema's float would take as 0 or 1, nor a string, which float() would
    silently convert."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(v, (bool, np.bool_))


def check_number_type(v, op, arg, expected):
    if not _is_real_number(v):
        raise TypeError(f"fercuda.{op}: argument '{arg}' must be {expected}, got {_type_name(v)}")


def check_threshold_type(v, op, arg):
    check_number_type(v, op, arg, "a number >= 0")


def check_threshold(v, op, arg):
    _check(
        not math.isnan(v) and v >= 0.0, lambda: f"fercuda.{op}: argument '{arg}' must be a number >= 0, got {v}"
    )


def check_gradient_kind(gradient, op):
    _check(
        gradient in ("sobel", "paper"),
        lambda: f"fercuda.{op}: argument 'gradient' must be \"sobel\" or \"paper\", got \"{gradient}\"",
    )


def check_like_x(t, arg, x, op, allow_float32=False):
    """t on x's device and in x's dtype (or float32 where allowed), as checks.h words it."""
    _check(
        t.device == x.device,
        lambda: f"fercuda.{op}: arguments 'x' and '{arg}' must be on the same device, got {x.device} and {t.device}",
    )
    or_float = " or Float" if allow_float32 and x.dtype != torch.float32 else ""
    _check(
        t.dtype == x.dtype or (allow_float32 and t.dtype == torch.float32),
        lambda: f"fercuda.{op}: argument '{arg}' must be a {dtype_name(x.dtype)}{or_float} tensor like x, "
        f"got {dtype_name(t.dtype)}",
    )


def check_dwconv_channel_arg(op, t, arg, x, channels, allow_float32):
    _check(
        t.dim() == 1 and t.shape[0] == channels,
        lambda: f"fercuda.{op}: argument '{arg}' must have shape (C,) = ({channels},) for x of shape "
        f"{shape_str(x)}, got {shape_str(t)}",
    )
    check_like_x(t, arg, x, op, allow_float32)


def dwconv_out_size(size, stride, padding):
    """Output extent of the fused block's 3x3 window along one axis (<= 0: no output); the formula
    of dwconv::out_size in csrc/include/fercuda/dwconv_math.h."""
    return (size + 2 * padding - 3) // stride + 1


def dwconv_channels_last(x):
    """Whether the fused block runs x, and lays out its outputs, in channels_last: x is
    channels_last-contiguous and not also NCHW-contiguous (a tensor that is both, such as C == 1
    or H == W == 1, runs as NCHW; one contiguous in neither is copied to NCHW). The rule of
    fercuda::dwconv_channels_last in csrc/include/fercuda/checks.h, which every kernel follows."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, mean, var, stride, padding,
                      mean_arg="running_mean", var_arg="running_var", allow_double=None):
    _check(
        x.dim() == 4,
        lambda: f"fercuda.{op}: argument 'x' must be a 4-D (N, C, H, W) tensor, got a {x.dim()}-D tensor of "
        f"shape {shape_str(x)}",
    )
    if allow_double is None:  # the C++ CPU kernels take float64 (for gradcheck); CUDA and Triton do not
        allow_double = x.device.type == "cpu"
    kinds = "Float, Double, Half or BFloat16" if allow_double else "Float, Half or BFloat16"
    _check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16) or (allow_double and x.dtype == torch.float64),
        lambda: f"fercuda.{op}: argument 'x' must be a {kinds} tensor, got {dtype_name(x.dtype)}",
    )
    n, c, h, w = x.shape
    _check(
        weight.dim() == 4 and tuple(weight.shape) == (c, 1, 3, 3),
        lambda: f"fercuda.{op}: argument 'weight' must have shape (C, 1, 3, 3) = ({c}, 1, 3, 3) for x of shape "
        f"{shape_str(x)}, got {shape_str(weight)}",
    )
    check_like_x(weight, "weight", x, op)
    if bias is not None:
        check_dwconv_channel_arg(op, bias, "bias", x, c, False)
    half = x.dtype != torch.float32
    check_dwconv_channel_arg(op, bn_weight, "bn_weight", x, c, half)
    check_dwconv_channel_arg(op, bn_bias, "bn_bias", x, c, half)
    check_dwconv_channel_arg(op, mean, mean_arg, x, c, True)
    check_dwconv_channel_arg(op, var, var_arg, x, c, True)
    _check(stride in (1, 2), lambda: f"fercuda.{op}: argument 'stride' must be 1 or 2, got {stride}")
    _check(padding >= 0, lambda: f"fercuda.{op}: argument 'padding' must be >= 0, got {padding}")
    _check(
        h + 2 * padding >= 3 and w + 2 * padding >= 3,
        lambda: f"fercuda.{op}: the padded input must be at least 3x3 for a 3x3 kernel, got x of shape "
        f"{shape_str(x)} with padding {padding}",
    )
    return n, c, dwconv_out_size(h, stride, padding), dwconv_out_size(w, stride, padding)


def check_dwconv_eps(op, eps):
    _check_value(
        eps > 0.0 and eps < math.inf,  # false for NaN too
        lambda: f"fercuda.{op}: argument 'eps' must be a finite number > 0, got {cpp_double_str(eps)}",
    )


def check_dwconv_momentum(op, momentum):
    _check_value(
        momentum >= 0.0 and momentum <= 1.0,  # false for NaN too
        lambda: f"fercuda.{op}: argument 'momentum' must be a number in [0, 1], got {cpp_double_str(momentum)}",
    )


def check_dwconv_eps_momentum(op, eps, momentum, training):
    """eps and momentum of the public entry point, for every backend. momentum None (nn.BatchNorm2d's
    cumulative average) is accepted where it is unused, training=False."""
    check_number_type(eps, op, "eps", "a finite number > 0")
    check_dwconv_eps(op, float(eps))
    if momentum is None and not training:
        return
    if momentum is None:
        raise TypeError(
            f"fercuda.{op}: argument 'momentum' must be a number in [0, 1] when training, got None (for "
            "BatchNorm's cumulative average pass 1 / num_batches_tracked, as fercuda.nn.DWConvBNReLU6 does)"
        )
    check_number_type(momentum, op, "momentum", "a number in [0, 1]")
    check_dwconv_momentum(op, float(momentum))


def check_dwconv_grad_out(op, grad_out, x, out):
    _check(
        grad_out.dim() == 4 and tuple(grad_out.shape) == tuple(out),
        lambda: f"fercuda.{op}: argument 'grad_out' must have the output's shape ({out[0]}, {out[1]}, {out[2]}, "
        f"{out[3]}), got {shape_str(grad_out)}",
    )
    check_like_x(grad_out, "grad_out", x, op)


def check_dwconv_saved_z(op, z, x, out):
    """The backward's z (the train op's save_z): None, an empty tensor, or the output's shape on
    x's device in the accumulation type (float32; float64 for float64 x)."""
    if z is None or z.numel() == 0:
        return
    _check(
        z.dim() == 4 and tuple(z.shape) == tuple(out),
        lambda: f"fercuda.{op}: argument 'z' must be empty or have the output's shape ({out[0]}, {out[1]}, "
        f"{out[2]}, {out[3]}), got {shape_str(z)}",
    )
    _check(
        z.device == x.device,
        lambda: f"fercuda.{op}: arguments 'x' and 'z' must be on the same device, got {x.device} and {z.device}",
    )
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    _check(
        z.dtype == acc,
        lambda: f"fercuda.{op}: argument 'z' must be a {dtype_name(acc)} tensor (the conv output in the "
        f"accumulation type), got {dtype_name(z.dtype)}",
    )


def check_dwconv_batch_stats(op, n, c, h_out, w_out):
    """BatchNorm's batch statistics need two values per channel, as nn.BatchNorm2d demands."""
    if n * c * h_out * w_out != 0:
        _check(
            n * h_out * w_out > 1,
            lambda: f"fercuda.{op}: Expected more than 1 value per channel when training, got input size "
            f"[{n}, {c}, {h_out}, {w_out}]",
        )


# ---- BatchNorm + ReLU6 (or identity) + residual add ----------------------------------------
# Mirrors check_bn_act_args / check_bn_act_grad_out in csrc/include/fercuda/checks.h.


def check_bn_act_args(op, x, weight, bias, mean, var, residual, allow_double=None, mean_arg="running_mean",
                      var_arg="running_var"):
    """The arguments every batch_norm_act op shares (allow_double None: float64 on the CPU, where
    the C++ kernels take it)."""
    _check(
        x.dim() == 4,
        lambda: f"fercuda.{op}: argument 'x' must be a 4-D (N, C, H, W) tensor, got a {x.dim()}-D tensor of "
        f"shape {shape_str(x)}",
    )
    if allow_double is None:
        allow_double = x.device.type == "cpu"
    kinds = "Float, Double, Half or BFloat16" if allow_double else "Float, Half or BFloat16"
    _check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16) or (allow_double and x.dtype == torch.float64),
        lambda: f"fercuda.{op}: argument 'x' must be a {kinds} tensor, got {dtype_name(x.dtype)}",
    )
    c = x.shape[1]
    half = x.dtype != torch.float32
    check_dwconv_channel_arg(op, weight, "weight", x, c, half)
    check_dwconv_channel_arg(op, bias, "bias", x, c, half)
    check_dwconv_channel_arg(op, mean, mean_arg, x, c, True)
    check_dwconv_channel_arg(op, var, var_arg, x, c, True)
    if residual is not None:
        _check(
            residual.shape == x.shape,
            lambda: f"fercuda.{op}: argument 'residual' must have the shape of x {shape_str(x)}, got "
            f"{shape_str(residual)}",
        )
        _check(
            residual.device == x.device,
            lambda: f"fercuda.{op}: arguments 'x' and 'residual' must be on the same device, got {x.device} and "
            f"{residual.device}",
        )
        _check(
            residual.dtype == x.dtype,
            lambda: f"fercuda.{op}: argument 'residual' must be a {dtype_name(x.dtype)} tensor like x, got "
            f"{dtype_name(residual.dtype)}",
        )


def check_bn_act_grad_out(op, grad_out, x):
    _check(
        grad_out.shape == x.shape,
        lambda: f"fercuda.{op}: argument 'grad_out' must have the shape of x {shape_str(x)}, got "
        f"{shape_str(grad_out)}",
    )
    check_like_x(grad_out, "grad_out", x, op)


def check_bn_act_batch_stats(op, n, c, h, w):
    """Two values per channel for batch statistics: a ValueError, as nn.BatchNorm2d raises."""
    if n * c * h * w != 0:
        _check_value(
            n * h * w > 1,
            lambda: f"fercuda.{op}: Expected more than 1 value per channel when training, got input size "
            f"[{n}, {c}, {h}, {w}]",
        )


def check_bn_act_entry(op, tensors, eps, momentum, training):
    """The public entry point's Python types: tensors (no numpy arrays, which the registered op would
    refuse with the dispatcher's words), eps and momentum as check_dwconv_eps_momentum takes them."""
    for arg, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"fercuda.{op}: argument '{arg}' must be a torch.Tensor, got {_type_name(t)}")
    check_dwconv_eps_momentum(op, eps, momentum, training)
