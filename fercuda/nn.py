"""Modules built on fercuda's fused ops."""

import torch
from torch import nn

from fercuda.ops import dwconv_bn_relu6


class DWConvBNReLU6(nn.Module):
    """Depthwise 3x3 conv + BatchNorm2d + ReLU6 as one fused op.

    Same parameters, buffers, state_dict keys ("0.weight", ["0.bias"], "1.weight", "1.bias",
    "1.running_mean", "1.running_var", "1.num_batches_tracked") and train / eval behaviour as
    ``nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=bias), nn.BatchNorm2d(c,
    eps, momentum), nn.ReLU6())``, so weights load either way. The conv and BatchNorm
    submodules hold the parameters; forward never calls them.
    """

    def __init__(self, channels, stride=1, bias=False, eps=1e-5, momentum=0.1, device=None, dtype=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"DWConvBNReLU6: stride must be 1 or 2, got {stride}")
        factory = {"device": device, "dtype": dtype}
        self.add_module("0", nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=bias, **factory))
        self.add_module("1", nn.BatchNorm2d(channels, eps=eps, momentum=momentum, **factory))

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def forward(self, x):
        conv, bn = self.conv, self.bn
        weight, bias = conv.weight, conv.bias
        if torch.is_autocast_enabled(x.device.type):
            # As eager autocast runs the conv: input and conv weights in the autocast dtype;
            # BatchNorm's parameters and statistics stay float32.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if self.training:
            # nn.BatchNorm2d: count the batch; momentum=None is the cumulative average.
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        return dwconv_bn_relu6(
            x,
            weight,
            bias,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            stride=conv.stride[0],
            padding=1,
            eps=bn.eps,
            momentum=momentum,
            training=self.training,
        )

    def to_sequential(self) -> nn.Sequential:
        """The eager nn.Sequential(Conv2d, BatchNorm2d, ReLU6) sharing this module's parameters
        and buffers (copy.deepcopy it for an independent one)."""
        seq = nn.Sequential(self.conv, self.bn, nn.ReLU6())
        return seq.train(self.training)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "DWConvBNReLU6":
        """The fused module for a Sequential(depthwise Conv2d 3x3 padding 1, BatchNorm2d, ReLU6),
        sharing its parameters and buffers (an optimizer built on seq keeps working)."""
        reason = _mismatch(seq)
        if reason is not None:
            raise ValueError(f"DWConvBNReLU6.from_sequential: {reason}")
        conv, bn = seq[0], seq[1]
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.add_module("0", conv)
        module.add_module("1", bn)
        return module.train(seq.training)


def _mismatch(seq):
    """Why seq is not a fusable Sequential(Conv2d dw 3x3 pad 1, BatchNorm2d, ReLU6); None if it is."""
    if not isinstance(seq, nn.Sequential) or len(seq) != 3:
        return f"expected an nn.Sequential of 3 modules, got {type(seq).__name__}"
    conv, bn, act = seq
    if type(conv) is not nn.Conv2d:
        return f"module 0 must be nn.Conv2d, got {type(conv).__name__}"
    c = conv.in_channels
    if not (conv.out_channels == c and conv.groups == c):
        return f"module 0 must be depthwise (in = out = groups), got {conv}"
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.dilation != (1, 1):
        return f"module 0 must have kernel 3x3, padding 1, dilation 1, got {conv}"
    if conv.stride not in ((1, 1), (2, 2)) or conv.padding_mode != "zeros":
        return f"module 0 must have stride 1 or 2 and zero padding, got {conv}"
    if type(bn) is not nn.BatchNorm2d:
        return f"module 1 must be nn.BatchNorm2d, got {type(bn).__name__}"
    if bn.num_features != c or not bn.affine or not bn.track_running_stats:
        return f"module 1 must be an affine BatchNorm2d({c}) tracking running statistics, got {bn}"
    if type(act) is not nn.ReLU6:
        return f"module 2 must be nn.ReLU6, got {type(act).__name__}"
    return None


def convert(model: nn.Module) -> int:
    """Replaces, in place, every Sequential(depthwise Conv2d 3x3 pad 1, BatchNorm2d, ReLU6)
    inside model with a DWConvBNReLU6 holding the same state; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if _mismatch(child) is None:
            setattr(model, name, DWConvBNReLU6.from_sequential(child))
            count += 1
        else:
            count += convert(child)
    return count
