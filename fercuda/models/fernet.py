"""The facial-expression network of Huo, Yu and Liu (2022), Table 2 and Figs. 6-8.

An Xception-like stack of separable convolutions with residual shortcuts and MobileNetV2
inverted residual blocks, fed with M = [canny(x), x, x] (see fercuda.data.fer_input).

Where the paper is silent the choices of Xception (Chollet 2017) and MobileNetV2 (Sandler
et al. 2018) are taken; each is noted where it is made.
"""

from __future__ import annotations

import torch
from torch import nn

# Table 2, channel counts at width_mult = 1 (the paper's alpha).
STEM_CHANNELS = (32, 64)
EXPANSION = 6


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of `divisor`, never dropping below 90 % of it
    (MobileNetV2's rule, so that alpha < 1 keeps channel counts friendly to vectorised kernels)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def depthwise_bn_relu6(channels: int, stride: int, fused: bool) -> nn.Module:
    """3x3 depthwise conv + BatchNorm + ReLU6. Both variants hold the same state_dict keys
    ("0.weight", "1.weight", "1.bias", "1.running_mean", ...), so checkpoints move between them."""
    if fused:
        from fercuda.nn import DWConvBNReLU6

        return DWConvBNReLU6(channels, stride=stride)
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU6(),
    )


class ConvBNReLU6(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )


def conv_bn(in_channels: int, out_channels: int, fused: bool, kernel_size: int = 1, stride: int = 1,
            relu6: bool = False) -> nn.Module:
    """Conv (no bias) + BatchNorm (+ ReLU6). Both variants hold the same state_dict keys ("0.weight",
    "1.weight", "1.bias", "1.running_mean", ...); the fused one (fercuda.nn.ConvBNAct) also takes the
    residual to add after them, forward(x, residual)."""
    if fused:
        from fercuda.nn import ConvBNAct

        return ConvBNAct(in_channels, out_channels, kernel_size, stride, relu6=relu6)
    if relu6:
        return ConvBNReLU6(in_channels, out_channels, kernel_size, stride)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def add_residual(block: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """block(x) + residual, the add inside the block's op where the block is fused."""
    if isinstance(block, nn.Sequential):
        return block(x) + residual
    return block(x, residual)


class SeparableConv(nn.Module):
    """Pointwise 1x1 first, then depthwise 3x3 (Fig. 6). No BatchNorm or nonlinearity between
    the two, as the paper prescribes; the depthwise conv is followed by BN + ReLU6 (Fig. 7)."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool, stride: int = 1):
        super().__init__()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.depthwise = depthwise_bn_relu6(out_channels, stride, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.pointwise(x))


class ResidualModule1(nn.Module):
    """Fig. 7 left: two separable convs and a 3x3 max-pool of stride 2; shortcut 1x1 conv of
    stride 2 + BN. As in Xception's entry flow, the sum is not followed by an activation."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool):
        super().__init__()
        self.body = nn.Sequential(
            SeparableConv(in_channels, out_channels, fused),
            SeparableConv(out_channels, out_channels, fused),
            # padding 1 as Xception's "same" pooling: 48 -> 24 -> 12 -> 6 as in Table 2.
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.shortcut = conv_bn(in_channels, out_channels, fused, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_residual(self.shortcut, x, self.body(x))


class ResidualModule2(nn.Module):
    """Fig. 7 right: two separable convs, no downsampling. The shortcut is the identity when the
    channel count is kept, else a 1x1 conv + BN, the shortcut Xception uses wherever shapes change."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool):
        super().__init__()
        self.body = nn.Sequential(
            SeparableConv(in_channels, out_channels, fused),
            SeparableConv(out_channels, out_channels, fused),
        )
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = conv_bn(in_channels, out_channels, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.shortcut, nn.Identity):
            return self.body(x) + x
        return add_residual(self.shortcut, x, self.body(x))


class InvertedResidual(nn.Module):
    """Fig. 8, MobileNetV2's block: 1x1 expansion (t = 6) + BN + ReLU6, 3x3 depthwise + BN +
    ReLU6, linear 1x1 projection + BN; identity shortcut when input and output shapes match.
    The expanded width is in_channels * t, as in MobileNetV2."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool, expansion: int = EXPANSION):
        super().__init__()
        hidden = in_channels * expansion
        self.use_shortcut = in_channels == out_channels
        self.expand = conv_bn(in_channels, hidden, fused, relu6=True)
        self.depthwise = depthwise_bn_relu6(hidden, 1, fused)
        self.project = conv_bn(hidden, out_channels, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        return add_residual(self.project, h, x) if self.use_shortcut else self.project(h)


class FERNet(nn.Module):
    """Table 2 of the paper. Input (N, in_channels, 48, 48); output logits (N, num_classes)
    (the paper's softmax lives in the loss).

    width_mult scales every hidden channel count (the paper's alpha), rounded to a multiple of 8
    as MobileNetV2 does; at width_mult = 1 the counts are Table 2's, unrounded. fused=True builds each depthwise conv + BN + ReLU6 as
    fercuda.nn.DWConvBNReLU6 and every other conv + BN (+ ReLU6) (+ the residual add after it) as
    fercuda.nn.ConvBNAct; fused=False from plain PyTorch layers, with identical state_dict
    keys, so one checkpoint loads into either.
    """

    def __init__(self, num_classes: int = 7, width_mult: float = 1.0, in_channels: int = 3, fused: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"FERNet: num_classes must be >= 1, got {num_classes}")
        if not width_mult > 0:
            raise ValueError(f"FERNet: width_mult must be > 0, got {width_mult}")
        if in_channels < 1:
            raise ValueError(f"FERNet: in_channels must be >= 1, got {in_channels}")
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.in_channels = in_channels
        self.fused = fused

        def c(n: int) -> int:
            # width_mult = 1 is Table 2 exactly (364 is no multiple of 8); scaled widths are rounded.
            return n if width_mult == 1 else make_divisible(n * width_mult)

        c32, c64, c128, c256, c364, c512, c728 = (c(n) for n in (32, 64, 128, 256, 364, 512, 728))
        self.features = nn.Sequential(
            conv_bn(in_channels, c32, fused, kernel_size=3, relu6=True),
            conv_bn(c32, c64, fused, kernel_size=3, relu6=True),
            ResidualModule1(c64, c128, fused),
            InvertedResidual(c128, c256, fused),
            InvertedResidual(c256, c256, fused),
            InvertedResidual(c256, c256, fused),
            InvertedResidual(c256, c256, fused),
            ResidualModule1(c256, c256, fused),
            ResidualModule2(c256, c364, fused),
            ResidualModule1(c364, c364, fused),
            InvertedResidual(c364, c512, fused),
            InvertedResidual(c512, c512, fused),
            SeparableConv(c512, c728, fused),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        # Table 2's last row: a 1x1 conv (with bias, as a classifier) instead of a dense layer.
        self.classifier = nn.Conv2d(c728, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # MobileNetV2's initialisation (Kaiming fan-out for convs, BN at identity).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FERNet: x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        return self.classifier(self.pool(self.features(x))).flatten(1)

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "width_mult": self.width_mult, "in_channels": self.in_channels}


def _conv_macs(module: nn.Module, output: torch.Tensor) -> int | None:
    """Multiply-adds of one image through a conv, from its weight and output shape."""
    weight = None
    if isinstance(module, nn.Conv2d):
        weight = module.weight
    else:
        try:
            from fercuda.nn import ConvBNAct, DWConvBNReLU6
        except ImportError:
            return None
        if isinstance(module, (DWConvBNReLU6, ConvBNAct)):
            weight = module.state_dict()["0.weight"]
    if weight is None:
        return None
    out_per_image = output[0].numel()
    # weight is (C_out, C_in / groups, kh, kw): each output element takes C_in/groups*kh*kw MACs.
    return out_per_image * weight.shape[1] * weight.shape[2] * weight.shape[3]


@torch.no_grad()
def complexity(model: nn.Module, image_size: int = 48) -> dict:
    """Parameter count and conv multiply-adds per image of size image_size x image_size.

    MACs are counted from the convolutions' shapes (Conv2d and the fused depthwise block) via
    forward hooks; BatchNorm, activations, pooling and additions are not counted, as is usual.
    FLOPs are reported as 2 x MACs.
    """
    total_macs = 0

    def hook(module, inputs, output):
        nonlocal total_macs
        macs = _conv_macs(module, output)
        if macs is not None:
            total_macs += macs

    fused_blocks = [m for m in model.modules() if type(m).__name__ in ("DWConvBNReLU6", "ConvBNAct")]
    # A fused block is counted as a whole; a Conv2d it may hold inside must not count twice.
    inside_fused = {id(sub) for block in fused_blocks for sub in block.modules() if sub is not block}
    handles = [block.register_forward_hook(hook) for block in fused_blocks]
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in inside_fused:
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        in_channels = getattr(model, "in_channels", 3)
        model(torch.zeros(1, in_channels, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "macs": total_macs, "flops": 2 * total_macs, "image_size": image_size}
