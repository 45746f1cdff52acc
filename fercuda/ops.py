"""Public entry points of fercuda's operators (torch.ops.fercuda.*)."""

import torch

from fercuda import _meta  # noqa: F401  (fake kernels for torch.compile)


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
):
    """relu6(batch_norm(conv2d(x, weight, bias, stride, padding, groups=C))) in one fused op.

    x is (N, C, H, W), NCHW-contiguous or channels_last (the output keeps the format);
    weight (C, 1, 3, 3); bias (C,) or None; BatchNorm tensors (C,), float32 allowed when x
    is float16 / bfloat16. training=False normalizes with the running statistics;
    training=True with the batch statistics, and updates running_mean / running_var in
    place as nn.BatchNorm2d does with this momentum (use momentum = 1 / num_batches_tracked
    for BatchNorm's cumulative average). Differentiable in both modes.
    """
    if training:
        out, _, _, new_mean, new_var = torch.ops.fercuda.dwconv_bn_relu6_train(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, eps, momentum
        )
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        return out
    return torch.ops.fercuda.dwconv_bn_relu6(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, eps
    )
