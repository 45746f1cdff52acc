"""BatchNorm + ReLU6 + residual add (fercuda.ops.batch_norm_act) next to what a user would otherwise
run: its sample inputs, the eager chain (batch_norm + hardtanh + add, the reference in float64 and a
peer), torch.compile of that chain, and FERNet's shapes where the op follows a conv.

benchmarks/bench_bn_act_cpu.py builds its cases from here. fercuda.ops is imported where it is used.
"""

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
MOMENTUM = 0.1


def network_bn_shapes(width_mult, batch=64, image_size=48):
    """{(N, C, H, W, relu6, residual): how many} of the BatchNorms that follow FERNet's stem,
    pointwise and shortcut convs at width_mult (the depthwise blocks' are fused into their op), in
    the network's order, found by running the plain model on one batch: relu6 where a ReLU6 follows
    the BatchNorm, residual where its output is added to another tensor (an inverted residual's
    projection with its identity shortcut, a residual module's shortcut)."""
    from fercuda.models import FERNet
    from fercuda.models.fernet import InvertedResidual

    model = FERNet(width_mult=width_mult, in_channels=3, fused=False).eval()
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            for i, child in enumerate(children):
                conv = children[i - 1] if i else None
                if isinstance(child, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d) and conv.groups == 1:
                    relu6 = i + 1 < len(children) and isinstance(children[i + 1], nn.ReLU6)
                    kinds[child] = (relu6, name.endswith("shortcut"))
    for module in model.modules():
        if isinstance(module, InvertedResidual):
            kinds[module.project[1]] = (False, module.use_shortcut)
    shapes = {}

    def hook(module, inputs, _output):
        key = (*inputs[0].shape, *kinds[module])
        shapes[key] = shapes.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in kinds]
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    return shapes


def bn_act_inputs(shape, *, residual, channels_last=False, dtype=torch.float32, device="cpu", seed=0):
    """x, weight, bias, running_mean, running_var, residual: x and residual in dtype, the BatchNorm
    tensors float32 (as under mixed precision); random values from a fixed seed, never zeros."""
    n, c, h, w = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, dtype=torch.float32, scale=1.0, offset=0.0):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).mul(scale).add(offset).to(dtype)

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = randn(n, c, h, w, dtype=dtype, scale=2.0, offset=0.5).contiguous(memory_format=memory_format)
    res = randn(n, c, h, w, dtype=dtype).contiguous(memory_format=memory_format) if residual else None
    weight = randn(c, scale=0.2, offset=1.0)
    bias = randn(c, offset=2.0)
    running_mean = randn(c, scale=0.3)
    running_var = randn(c, scale=0.1, offset=1.0).abs()
    return x, weight, bias, running_mean, running_var, res


def eager_chain(x, weight, bias, running_mean, running_var, residual=None, relu6=True, training=False):
    """What a user writes: batch_norm, then relu6 (hardtanh 0..6), then the add."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
    if relu6:
        y = F.hardtanh(y, 0.0, 6.0)
    return y if residual is None else y + residual


def fused_chain(x, weight, bias, running_mean, running_var, residual=None, relu6=True, training=False):
    """fercuda.ops.batch_norm_act on the same arguments."""
    from fercuda.ops import batch_norm_act

    return batch_norm_act(x, weight, bias, running_mean, running_var, residual, relu6=relu6, eps=EPS,
                          momentum=MOMENTUM, training=training)
