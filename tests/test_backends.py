"""fercuda.ops' backend= argument: every backend computes the same result (the Canny family's
backends, and the refusal of a backend that cannot run the given tensor: tests/test_canny.py)."""

import os

import torch

import fercuda.ops as F


def test_dwconv_backends_agree(rng):
    c = 3
    x = torch.randn(2, c, 5, 7, generator=rng)
    w = torch.randn(c, 1, 3, 3, generator=rng)
    bn_w, bn_b = torch.rand(c, generator=rng) + 0.5, torch.randn(c, generator=rng)
    mean, var = torch.randn(c, generator=rng), torch.rand(c, generator=rng) + 0.5
    ref = F.dwconv_bn_relu6(x, w, None, bn_w, bn_b, mean, var)
    assert torch.equal(F.dwconv_bn_relu6(x, w, None, bn_w, bn_b, mean, var, backend="cpu"), ref)
    if os.environ.get("TRITON_INTERPRET") == "1":
        got = F.dwconv_bn_relu6(x, w, None, bn_w, bn_b, mean, var, backend="triton")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
