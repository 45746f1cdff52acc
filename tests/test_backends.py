"""fercuda.ops' backend= argument: every backend computes the same result, and a backend that
cannot run the given tensor is refused with a message naming it."""

import os

import pytest
import torch

import fercuda.ops as F

from canny_reference import canny_batch


def test_canny_backends_agree_with_cv2(rng):
    img = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8, generator=rng)
    expected = canny_batch(img, 50, 150)
    assert torch.equal(F.canny(img), expected)
    assert torch.equal(F.canny(img, backend="cpu"), expected)
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        got = F.canny(img.to(dev), backend="triton").cpu()
        assert torch.equal(got, expected)


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


def test_unknown_backend_is_refused():
    img = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"fercuda.canny: argument 'backend' must be one of .* got 'opencl'"):
        F.canny(img, backend="opencl")


def test_backend_must_match_the_device():
    img = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"fercuda.canny: backend='cuda' needs a tensor on cuda, got a tensor on cpu"):
        F.canny(img, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor"):
        F.canny(torch.zeros(4, 4, dtype=torch.uint8), backend="triton")
