"""Modules built on fercuda's fused ops."""

import torch
from torch import nn

import torch.nn.functional as F

from fercuda.ops import batch_norm_act, dwconv_bn_relu6


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


class ConvBNAct(nn.Module):
    """Conv2d + BatchNorm2d (+ ReLU6) (+ a residual added last), the BatchNorm, activation and add
    as one op (fercuda.ops.batch_norm_act) after the conv.

    Same parameters, buffers and state_dict keys ("0.weight", ["0.bias"], "1.weight", "1.bias",
    "1.running_mean", "1.running_var", "1.num_batches_tracked") as ``nn.Sequential(nn.Conv2d(...),
    nn.BatchNorm2d(out_channels, eps, momentum)[, nn.ReLU6()])``, so weights load either way.
    ``forward(x, residual=None)`` returns ``act(bn(conv(x))) + residual``. train(): batch statistics,
    running statistics updated as nn.BatchNorm2d does. eval(): the BatchNorm folded into the conv's
    weight and bias (no BatchNorm op runs), then the activation and the add.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=None, relu6=True, bias=False,
                 eps=1e-5, momentum=0.1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        padding = kernel_size // 2 if padding is None else padding
        self.add_module("0", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, **factory))
        self.add_module("1", nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory))
        self.relu6 = relu6
        self._folded = None  # (key, weight, bias) of the last eval-mode fold, reused while the key holds

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def __getitem__(self, index):
        """module[0] the conv, module[1] the BatchNorm, as in the nn.Sequential twin."""
        return self._modules[str(index)]

    def forward(self, x, residual=None):
        if self.training or not self.bn.track_running_stats:
            return self._forward_batch_norm(x, residual)
        weight, bias = self.folded()
        conv = self.conv
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if self.relu6:
            y = F.hardtanh(y, 0.0, 6.0)
        return y if residual is None else y + residual

    def _forward_batch_norm(self, x, residual):
        bn = self.bn
        z = self.conv(x)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if self.training:
            # nn.BatchNorm2d: count the batch; momentum=None is the cumulative average.
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        # The op adds a residual of z's dtype; another (float32 beside an autocast conv) is added
        # after it, with eager's type promotion.
        fused_residual = residual if residual is not None and residual.dtype == z.dtype else None
        y = batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, fused_residual, relu6=self.relu6,
                           eps=bn.eps, momentum=momentum, training=self.training)
        return y if residual is None or fused_residual is not None else y + residual

    def folded(self):
        """(weight, bias) of the conv with the BatchNorm's running statistics folded in, float32 or
        the parameters' dtype: conv(x, weight, bias) == bn(conv(x)) in eval mode. Differentiable where
        gradients are enabled; reused between calls without gradients while no parameter or buffer
        has changed."""
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = None
        if cacheable:
            key = (tuple(None if t is None else (id(t), t._version, t.data_ptr(), t.dtype) for t in tensors), bn.eps,
                   torch.is_inference_mode_enabled())
            if self._folded is not None and self._folded[0] == key:
                return self._folded[1], self._folded[2]
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        weight = conv.weight * scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1)
        bias = shift.to(conv.weight.dtype)
        if cacheable:
            self._folded = (key, weight, bias)
        return weight, bias

    def train(self, mode=True):
        self._folded = None
        return super().train(mode)

    def to_sequential(self) -> nn.Sequential:
        """The eager nn.Sequential(Conv2d, BatchNorm2d[, ReLU6]) sharing this module's parameters and
        buffers (without the residual add, which the caller's forward makes)."""
        seq = nn.Sequential(self.conv, self.bn, *([nn.ReLU6()] if self.relu6 else []))
        return seq.train(self.training)
