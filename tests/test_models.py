import pytest
import torch
from torch import nn

import fercuda.nn
from fercuda.models import FERNet, complexity, make_divisible

# Fused vs plain outputs in float32, eval mode.
FUSED_VS_PLAIN_ATOL = 1e-4


def expected_param_count(num_classes=7, in_channels=3, t=6):
    """Parameters of Table 2 counted by hand from the layer list, independent of the model code."""

    def bn(c):
        return 2 * c

    def sep(cin, cout):  # pointwise (no bias), depthwise 3x3 (no bias), BN
        return cin * cout + 9 * cout + bn(cout)

    def rm1(cin, cout):  # two separable convs + 1x1 stride-2 shortcut with BN
        return sep(cin, cout) + sep(cout, cout) + cin * cout + bn(cout)

    def rm2(cin, cout):
        return sep(cin, cout) + sep(cout, cout) + (0 if cin == cout else cin * cout + bn(cout))

    def ir(cin, cout):
        h = cin * t
        return cin * h + bn(h) + 9 * h + bn(h) + h * cout + bn(cout)

    total = in_channels * 32 * 9 + bn(32) + 32 * 64 * 9 + bn(64)
    total += rm1(64, 128) + ir(128, 256) + 3 * ir(256, 256) + rm1(256, 256) + rm2(256, 364)
    total += rm1(364, 364) + ir(364, 512) + ir(512, 512) + sep(512, 728)
    total += 728 * num_classes + num_classes
    return total


def randomize_batchnorm(model, generator):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "DWConvBNReLU6":
            for name, buf in m.named_buffers(recurse=False):
                if name == "running_mean":
                    buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)
                elif name == "running_var":
                    buf.copy_(torch.rand(buf.shape, generator=generator) + 0.5)


def test_output_shape():
    model = FERNet(width_mult=0.25).eval()
    assert model(torch.randn(3, 3, 48, 48)).shape == (3, 7)
    assert FERNet(num_classes=8, width_mult=0.25).eval()(torch.randn(1, 3, 48, 48)).shape == (1, 8)


def test_parameter_count_matches_table_2():
    model = FERNet(fused=False)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count()
    assert complexity(model)["params"] == expected_param_count()


def test_complexity_counts_conv_macs():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    assert complexity(conv)["macs"] == 48 * 48 * 8 * 3 * 9
    fused = nn.Sequential(fercuda.nn.DWConvBNReLU6(8, stride=2))
    fused.in_channels = 8
    assert complexity(fused)["macs"] == 24 * 24 * 8 * 9
    full = complexity(FERNet(width_mult=0.25, fused=True))
    assert full["macs"] == complexity(FERNet(width_mult=0.25, fused=False))["macs"]
    assert full["flops"] == 2 * full["macs"]


def test_fused_and_plain_share_state_dict_keys_and_outputs(rng):
    fused = FERNet(width_mult=0.25, fused=True)
    plain = FERNet(width_mult=0.25, fused=False)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert any(isinstance(m, fercuda.nn.DWConvBNReLU6) for m in fused.modules())
    assert not any(isinstance(m, fercuda.nn.DWConvBNReLU6) for m in plain.modules())
    with torch.no_grad():
        randomize_batchnorm(plain, rng)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 48, 48, generator=rng)
    with torch.no_grad():
        expected = plain.eval()(x)
        got = fused.eval()(x)
    torch.testing.assert_close(got, expected, atol=FUSED_VS_PLAIN_ATOL, rtol=1e-4)


def test_width_mult_scales_channels():
    half = FERNet(width_mult=0.5)
    assert half.features[0][0].out_channels == 16
    assert half.classifier.in_channels == make_divisible(728 * 0.5) == 368
    assert FERNet().classifier.in_channels == 728
    assert make_divisible(0.25 * 364) == 88  # 91 rounds to a multiple of 8
    assert make_divisible(0.1 * 32) == 8  # never below one multiple of 8


@pytest.mark.parametrize("fused", [True, False])
def test_backward_reaches_every_parameter(fused, rng):
    model = FERNet(width_mult=0.25, fused=fused).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 48, 48, generator=rng)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_arguments():
    with pytest.raises(ValueError, match="width_mult"):
        FERNet(width_mult=0)
    with pytest.raises(ValueError, match="num_classes"):
        FERNet(num_classes=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        FERNet(width_mult=0.25)(torch.randn(1, 1, 48, 48))
