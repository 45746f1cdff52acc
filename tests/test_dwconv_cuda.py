"""The fused depthwise conv + BatchNorm + ReLU6 of every backend at the network's shapes, against
eager PyTorch in float64: the same assertions for the C++ CPU kernels (run everywhere, on batches
of at most 4), the CUDA C++ kernels and the Triton kernels (run where a GPU is;
tests/test_dwconv_triton.py runs the Triton kernels on CPU under Triton's interpreter, at shapes
it can afford)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fercuda  # noqa: F401  (loads the C++ ops)
import fercuda.ops
import fercuda.triton.dwconv  # noqa: F401  (registers the Triton ops)
from dwconv_cases import (
    LOW_PRECISION,
    assert_close_fp32,
    assert_grad_close_fp32,
    assert_within_twice_eager,
    float64_gradients,
    poisoned_allocations,
    reference,
    sample_inputs,
)
from fercuda import _build_info

DWCONV_OPS = ("fercuda::dwconv_bn_relu6", "fercuda::dwconv_bn_relu6_train", "fercuda::dwconv_bn_relu6_backward")
# fercuda.ops' backend= names; "cpu" is the C++ CPU kernel.
BACKENDS = ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda),
            pytest.param("triton", marks=pytest.mark.needs_cuda))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (N, C, H, W, stride): the network's blocks, and an odd shape whose channels do not fill a
# channels_last group of 32 and whose planes are not multiples of any tile.
SHAPES = [
    (64, 128, 48, 48, 1),
    (64, 128, 48, 48, 2),
    (64, 256, 24, 24, 1),
    (64, 512, 12, 12, 2),
    (64, 1024, 6, 6, 1),
    (64, 1536, 6, 6, 1),
    (3, 37, 9, 11, 1),
    (3, 37, 9, 11, 2),
]
SHAPE_IDS = [f"{n}x{c}x{h}x{w}-s{s}" for n, c, h, w, s in SHAPES]


def test_cuda_build_registers_dwconv_kernels():
    if not _build_info.WITH_CUDA:
        pytest.skip("fercuda._C was built without CUDA kernels (USE_CUDA=0 or no toolkit)")
    for name in DWCONV_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"


def device_of(backend):
    return "cpu" if backend == "cpu" else "cuda"


def batch(backend, n):
    """The batch size of a case: the network's on a GPU; at most 4 on the CPU, where the float64
    references of 64 images take minutes per case on two cores (the planes and channels stay)."""
    return n if backend != "cpu" else min(n, 4)


def op(backend, kind=""):
    """The registered op of a backend; kind "", "_train" or "_backward"."""
    return getattr(torch.ops.fercuda, f"dwconv_bn_relu6{kind}" + ("_triton" if backend == "triton" else ""))


def inference(backend, inputs, stride, padding=1):
    return op(backend)(*inputs, stride, padding, 1e-5)


def train(backend, inputs, stride, running_mean, running_var, padding=1):
    """(out, save_mean, save_invstd); the new running statistics copied into the buffers, as
    fercuda.ops.dwconv_bn_relu6 does."""
    out, mean, invstd, new_mean, new_var = op(backend, "_train")(
        *inputs[:5], running_mean, running_var, stride, padding, 1e-5, 0.1)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return out, mean, invstd


def backward(backend, grad_out, inputs, mean, invstd, stride, training, padding=1):
    return op(backend, "_backward")(grad_out, *inputs[:5], mean, invstd, stride, padding, training)


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_inference(backend, dtype, channels_last, shape, rng):
    n, c, h, w, stride = shape
    n = batch(backend, n)
    inputs = sample_inputs(device_of(backend), dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
    with poisoned_allocations():
        out = inference(backend, inputs, stride)
    expected = reference(*inputs, stride=stride)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=memory_format(channels_last))
    if dtype == torch.float32:
        assert_close_fp32(out, expected)
    else:
        eager = reference(*inputs[:5], inputs[5].clone(), inputs[6].clone(), stride=stride, dtype=dtype)
        assert_within_twice_eager(out, expected, eager, "out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_inference_float32_batchnorm_with_half_input(backend, dtype, rng):
    inputs = sample_inputs(device_of(backend), dtype, rng, n=batch(backend, 64), c=256, h=24, w=24,
                           bn_dtype=torch.float32)
    out = inference(backend, inputs, 1)
    eager = reference(*inputs[:5], inputs[5].to(dtype), inputs[6].to(dtype), dtype=dtype)
    assert_within_twice_eager(out, reference(*inputs), eager, "out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_training_forward_and_running_stats_after_two_steps(backend, channels_last, shape, rng):
    n, c, h, w, stride = shape
    n = batch(backend, n)
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
    bn = nn.BatchNorm2d(c, momentum=0.1, eps=1e-5).double().to(device_of(backend)).train()
    running_mean, running_var = inputs[5].clone(), inputs[6].clone()
    with torch.no_grad():
        bn.running_mean.copy_(running_mean)
        bn.running_var.copy_(running_var)
        bn.weight.copy_(inputs[3])
        bn.bias.copy_(inputs[4])
    for _ in range(2):
        x = sample_inputs(device_of(backend), torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)[0]
        step_inputs = (x,) + inputs[1:]
        with poisoned_allocations():
            out, save_mean, save_invstd = train(backend, step_inputs, stride, running_mean, running_var)
        z = F.conv2d(x.double(), inputs[1].double(), inputs[2].double(), stride, 1, 1, c)
        with torch.no_grad():
            expected = F.relu6(bn(z))
        assert out.is_contiguous(memory_format=memory_format(channels_last))
        assert_close_fp32(out, expected)
        assert_close_fp32(save_mean, z.mean(dim=(0, 2, 3)), scale=float(z.abs().max()))
        assert_close_fp32(save_invstd, torch.rsqrt(z.var(dim=(0, 2, 3), unbiased=False) + 1e-5))
    assert_close_fp32(running_mean, bn.running_mean)
    assert_close_fp32(running_var, bn.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gradients_match_float64_autograd(backend, training, channels_last, shape, rng):
    n, c, h, w, stride = shape
    n = batch(backend, n)
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
    if training:
        _, mean, invstd = train(backend, inputs, stride, inputs[5].clone(), inputs[6].clone())
    else:
        mean, invstd = inputs[5], torch.rsqrt(inputs[6] + 1e-5)
    ho, wo = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    grad_out = torch.randn((n, c, ho, wo), generator=rng).to(device_of(backend))
    grad_out = grad_out.contiguous(memory_format=memory_format(channels_last))
    with poisoned_allocations():
        grads = backward(backend, grad_out, inputs, mean, invstd, stride, training)
    expected, term_sums = float64_gradients(inputs, grad_out, stride=stride, training=training)
    names = ("x", "weight", "bias", "bn_weight", "bn_bias")
    grad_x_scale = float(expected[0].abs().max())
    for name, got, exp, term_sum, like in zip(names, grads, expected, term_sums, inputs[:5]):
        assert got.shape == exp.shape and got.dtype == like.dtype, name
        assert_grad_close_fp32(name, got, exp, term_sum, grad_x_scale)
    assert grads[0].is_contiguous(memory_format=memory_format(channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_low_precision_training_gradients(backend, dtype, channels_last, rng):
    n, c, h, w, stride = batch(backend, 64), 256, 24, 24, 1
    inputs = sample_inputs(device_of(backend), dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last,
                           bn_dtype=torch.float32)
    _, mean, invstd = train(backend, inputs, stride, inputs[5].clone(), inputs[6].clone())
    grad_out = torch.randn((n, c, h, w), generator=rng).to(device_of(backend), dtype)
    grads = backward(backend, grad_out, inputs, mean, invstd, stride, True)
    expected, _ = float64_gradients(inputs, grad_out, stride=stride, training=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    eager = reference(*leaves, inputs[5].to(dtype), inputs[6].to(dtype), training=True, dtype=dtype)
    eager.backward(grad_out)
    for name, got, exp, leaf in zip(("x", "weight", "bias", "bn_weight", "bn_bias"), grads, expected, leaves):
        if name != "bias":  # ~0 in training: both sides are rounding noise
            assert_within_twice_eager(got, exp, leaf.grad, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_are_deterministic(backend, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=batch(backend, 64), c=256, h=24, w=24)
    runs = []
    for _ in range(2):
        out, mean, invstd = train(backend, inputs, 1, inputs[5].clone(), inputs[6].clone())
        grad_out = torch.ones_like(out)
        runs.append((out, mean, invstd) + tuple(backward(backend, grad_out, inputs, mean, invstd, 1, True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_training_step(backend, rng):
    """fercuda.ops.dwconv_bn_relu6 in training: the shared autograd calls the backend's backward op."""
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=8, c=64, h=12, w=12)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    out = fercuda.ops.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), training=True, backend=backend)
    grad_out = torch.randn(out.shape, generator=rng).to(device_of(backend))
    out.backward(grad_out)
    expected, term_sums = float64_gradients(inputs, grad_out, training=True)
    scale = float(expected[0].abs().max())
    for name, leaf, exp, term_sum in zip(("x", "weight", "bias", "bn_weight", "bn_bias"), leaves, expected,
                                         term_sums):
        assert_grad_close_fp32(name, leaf.grad, exp, term_sum, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, rng):
    """Schema, fake kernel, autograd registration and AOT dispatch of the three ops, whose fakes and
    autograd are shared by the backends."""
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=4, c=40, h=6, w=6)
    torch.library.opcheck(op(backend).default, (*inputs, 1, 1, 1e-5))
    torch.library.opcheck(op(backend, "_train").default, (*inputs, 2, 1, 1e-5, 0.1))
    out, mean, invstd, _, _ = op(backend, "_train")(*inputs, 1, 1, 1e-5, 0.1)
    torch.library.opcheck(op(backend, "_backward").default,
                          (torch.randn_like(out), *inputs[:5], mean, invstd, 1, 1, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "'x' must be a 4-D"),
        (lambda a: a.__setitem__(1, a[1].reshape(-1, 1, 9)), r"'weight' must have shape \(C, 1, 3, 3\)"),
        (lambda a: a.__setitem__(7, 3), "'stride' must be 1 or 2, got 3"),
    ],
    ids=("x_dim", "weight_shape", "stride"),
)
def test_exception_names_argument(backend, change, match, rng):
    args = list(sample_inputs(device_of(backend), torch.float32, rng)) + [1, 1, 1e-5]
    change(args)
    with pytest.raises(RuntimeError, match=match):
        op(backend)(*args)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_cuda_exception_names_argument_on_another_device(backend, rng):
    args = list(sample_inputs("cuda", torch.float32, rng)) + [1, 1, 1e-5]
    args[3] = args[3].cpu()
    with pytest.raises(RuntimeError, match="'bn_weight' must be on the same device"):
        op(backend)(*args)
