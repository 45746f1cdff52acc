"""Fake (meta) kernels: shapes and dtypes only, so torch.compile(fullgraph=True) can trace the ops.

Validation mirrors csrc/include/fercuda/checks.h, message for message.
"""

import functools

import torch

from fercuda._checks import (
    check_bn_act_args,
    check_bn_act_batch_stats,
    check_bn_act_grad_out,
    check_dtype,
    check_dwconv_batch_stats,
    check_dwconv_eps,
    check_dwconv_grad_out,
    check_dwconv_saved_z,
    check_dwconv_momentum,
    check_gradient_kind,
    check_image,
    check_ksize,
    check_same_shape,
    check_threshold,
    dwconv_channels_last,
    dwconv_out_shape,
)


def _like(t, dtype):
    return torch.empty(t.shape, dtype=dtype, device=t.device)


@torch.library.register_fake("fercuda::gaussian_blur")
def _gaussian_blur_fake(img, ksize=5):
    check_image(img, torch.uint8, "gaussian_blur", "img")
    check_ksize(ksize, "gaussian_blur", allow_zero=False)
    return _like(img, torch.uint8)


@torch.library.register_fake("fercuda::sobel")
def _sobel_fake(img):
    check_image(img, torch.uint8, "sobel", "img")
    return _like(img, torch.int16), _like(img, torch.int16)


@torch.library.register_fake("fercuda::paper_gradient")
def _paper_gradient_fake(img):
    check_image(img, torch.uint8, "paper_gradient", "img")
    return _like(img, torch.float32), _like(img, torch.float32)


@torch.library.register_fake("fercuda::nms")
def _nms_fake(dx, dy, low, high, l2_gradient=False):
    check_same_shape(dx, "dx", dy, "dy", "nms")
    check_image(dx, torch.int16, "nms", "dx")
    check_image(dy, torch.int16, "nms", "dy")
    check_threshold(low, "nms", "low")
    check_threshold(high, "nms", "high")
    return _like(dx, torch.uint8)


@torch.library.register_fake("fercuda::hysteresis")
def _hysteresis_fake(edge_map):
    check_image(edge_map, torch.uint8, "hysteresis", "edge_map")
    return _like(edge_map, torch.uint8)


@torch.library.register_fake("fercuda::canny")
def _canny_fake(img, low=50.0, high=150.0, ksize=5, l2_gradient=False, gradient="sobel"):
    check_image(img, torch.uint8, "canny", "img")
    check_threshold(low, "canny", "low")
    check_threshold(high, "canny", "high")
    check_ksize(ksize, "canny", allow_zero=True)
    check_gradient_kind(gradient, "canny")
    return _like(img, torch.uint8)


# ---- Fused depthwise 3x3 conv + BatchNorm + ReLU6 ---------------------------------
# The checks mirror check_dwconv_args in csrc/include/fercuda/checks.h, message for message.
# The same fakes serve the Triton ops (register_dwconv_fakes), whose contract is the C++ ops';
# op names the op in the messages, allow_double as in dwconv_out_shape.

def _dwconv_memory_format(x):
    return torch.channels_last if dwconv_channels_last(x) else torch.contiguous_format


def _dwconv_empty(x, shape, dtype=None):
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=_dwconv_memory_format(x))


# The largest conv output (values) the C++ CPU training op keeps for the backward (save_z):
# kKeepZValues in csrc/cpu/dwconv_cpu_paths.h.
KEEP_Z_VALUES = 2 << 20


@torch.library.register_fake("fercuda::dwconv_bn_relu6")
def _dwconv_bn_relu6_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1, padding=1,
                          eps=1e-5, *, op="dwconv_bn_relu6", allow_double=None):
    shape = dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                             allow_double=allow_double)
    check_dwconv_eps(op, eps)
    return _dwconv_empty(x, shape)


@torch.library.register_fake("fercuda::dwconv_bn_relu6_train")
def _dwconv_bn_relu6_train_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1,
                                padding=1, eps=1e-5, momentum=0.1, *, op="dwconv_bn_relu6_train", allow_double=None,
                                saves_z=None):
    n, c, h_out, w_out = dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                           stride, padding, allow_double=allow_double)
    check_dwconv_eps(op, eps)
    check_dwconv_momentum(op, momentum)
    check_dwconv_batch_stats(op, n, c, h_out, w_out)
    stats = x.new_empty((c,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    # save_z: the conv output in the statistics' dtype where the backend keeps it for the
    # backward (the C++ CPU kernels: channels_last float32 and bfloat16, outputs of at most
    # KEEP_Z_VALUES values), else empty.
    keeps_z = x.device.type == "cpu" if saves_z is None else saves_z
    keeps_z = (keeps_z and dwconv_channels_last(x) and x.dtype in (torch.float32, torch.bfloat16)
               and n * c * h_out * w_out <= KEEP_Z_VALUES)
    return (
        _dwconv_empty(x, (n, c, h_out, w_out)),
        stats,
        stats.new_empty((c,)),
        running_mean.new_empty((c,)),
        running_var.new_empty((c,)),
        _dwconv_empty(x, (n, c, h_out, w_out), stats.dtype) if keeps_z else stats.new_empty((0,)),
    )


@torch.library.register_fake("fercuda::dwconv_bn_relu6_backward")
def _dwconv_bn_relu6_backward_fake(grad_out, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                   training, z=None, *, op="dwconv_bn_relu6_backward", allow_double=None):
    out = dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, "mean",
                            "invstd", allow_double=allow_double)
    check_dwconv_grad_out(op, grad_out, x, out)
    check_dwconv_saved_z(op, z, x, out)
    c = x.shape[1]
    return (
        _dwconv_empty(x, tuple(x.shape)),
        weight.new_empty((c, 1, 3, 3)),
        weight.new_empty((c,)),
        bn_weight.new_empty((c,)),
        bn_bias.new_empty((c,)),
    )


def register_dwconv_fakes(suffix, allow_double, saves_z):
    """The fakes above for the ops fercuda::dwconv_bn_relu6{suffix}, _train{suffix} and
    _backward{suffix} of another backend: one set of shape rules and checks for every backend.
    saves_z: whether its train op returns the conv output (else an empty save_z)."""
    for name, fake in (("dwconv_bn_relu6", _dwconv_bn_relu6_fake),
                       ("dwconv_bn_relu6_train", functools.partial(_dwconv_bn_relu6_train_fake, saves_z=saves_z)),
                       ("dwconv_bn_relu6_backward", _dwconv_bn_relu6_backward_fake)):
        torch.library.register_fake(f"fercuda::{name}{suffix}",
                                    functools.partial(fake, op=name + suffix, allow_double=allow_double))


# ---- BatchNorm + ReLU6 (or identity) + residual add -----------------------------------------
# The checks mirror check_bn_act_args in csrc/include/fercuda/checks.h; the outputs keep x's
# layout by the fused block's rule. One set serves every backend (register_bn_act_fakes).


@torch.library.register_fake("fercuda::batch_norm_act")
def _batch_norm_act_fake(x, weight, bias, running_mean, running_var, residual=None, relu6=True, eps=1e-5, *,
                         op="batch_norm_act", allow_double=None):
    check_bn_act_args(op, x, weight, bias, running_mean, running_var, residual, allow_double)
    check_dwconv_eps(op, eps)
    return _dwconv_empty(x, tuple(x.shape))


@torch.library.register_fake("fercuda::batch_norm_act_train")
def _batch_norm_act_train_fake(x, weight, bias, running_mean, running_var, residual=None, relu6=True, eps=1e-5,
                               momentum=0.1, *, op="batch_norm_act_train", allow_double=None):
    check_bn_act_args(op, x, weight, bias, running_mean, running_var, residual, allow_double)
    check_dwconv_eps(op, eps)
    check_dwconv_momentum(op, momentum)
    n, c, h, w = x.shape
    check_bn_act_batch_stats(op, n, c, h, w)
    stats = x.new_empty((c,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (
        _dwconv_empty(x, (n, c, h, w)),
        stats,
        stats.new_empty((c,)),
        running_mean.new_empty((c,)),
        running_var.new_empty((c,)),
    )


@torch.library.register_fake("fercuda::batch_norm_act_backward")
def _batch_norm_act_backward_fake(grad_out, x, weight, bias, mean, invstd, relu6, training, *,
                                  op="batch_norm_act_backward", allow_double=None):
    check_bn_act_args(op, x, weight, bias, mean, invstd, None, allow_double, "mean", "invstd")
    check_bn_act_grad_out(op, grad_out, x)
    c = x.shape[1]
    return _dwconv_empty(x, tuple(x.shape)), weight.new_empty((c,)), bias.new_empty((c,))


def register_bn_act_fakes(suffix, allow_double):
    """The fakes above for fercuda::batch_norm_act{suffix}, _train{suffix} and _backward{suffix}."""
    for name, fake in (("batch_norm_act", _batch_norm_act_fake),
                       ("batch_norm_act_train", _batch_norm_act_train_fake),
                       ("batch_norm_act_backward", _batch_norm_act_backward_fake)):
        torch.library.register_fake(f"fercuda::{name}{suffix}",
                                    functools.partial(fake, op=name + suffix, allow_double=allow_double))
