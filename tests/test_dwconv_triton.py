"""Triton kernels of the fused depthwise conv + BatchNorm + ReLU6 against eager PyTorch in float64.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), so the inputs are small: each program instance costs milliseconds there.
"""

import pytest
import torch
import torch.nn as nn

import fercuda.ops

from dwconv_cases import (
    LOW_PRECISION,
    assert_close_fp32,
    assert_within_twice_eager,
    poisoned_allocations,
    reference,
    sample_inputs,
)
from fercuda.triton import dwconv as triton_dwconv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def clone_stats(inputs, dtype=None):
    x, w, b, bn_w, bn_b, rm, rv = inputs
    return rm.clone() if dtype is None else rm.to(dtype), rv.clone() if dtype is None else rv.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_inference(dtype, stride, channels_last, rng):
    inputs = sample_inputs(DEVICE, dtype, rng, channels_last=channels_last)
    with poisoned_allocations():
        out = triton_dwconv.dwconv_bn_relu6(*inputs, stride=stride)
    expected = reference(*inputs, stride=stride)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if dtype == torch.float32:
        assert_close_fp32(out, expected)
    else:
        eager = reference(*inputs[:5], *clone_stats(inputs), stride=stride, dtype=dtype)
        assert_within_twice_eager(out, expected, eager, "out")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_inference_float32_batchnorm_with_half_input(dtype, rng):
    inputs = sample_inputs(DEVICE, dtype, rng, bias=False, bn_dtype=torch.float32)
    out = triton_dwconv.dwconv_bn_relu6(*inputs, stride=1)
    expected = reference(*inputs)
    eager = reference(*inputs[:5], *clone_stats(inputs, dtype), dtype=dtype)
    assert out.dtype == dtype
    assert_within_twice_eager(out, expected, eager, "out")


@pytest.mark.parametrize("padding", (0, 2))
def test_inference_other_padding(padding, rng):
    inputs = sample_inputs(DEVICE, torch.float32, rng, h=6, w=5)
    out = triton_dwconv.dwconv_bn_relu6(*inputs, stride=1, padding=padding)
    assert_close_fp32(out, reference(*inputs, padding=padding))


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_training_forward_and_running_stats_after_two_steps(stride, channels_last, rng):
    """Batch statistics for the output, new running statistics equal to nn.BatchNorm2d's (unbiased
    variance, momentum) after two steps, each step feeding the next its returned statistics."""
    c = 3
    bn = nn.BatchNorm2d(c, momentum=0.1, eps=1e-5).double().to(DEVICE)
    inputs = sample_inputs(DEVICE, torch.float32, rng, c=c, channels_last=channels_last)
    running_mean, running_var = inputs[5].clone(), inputs[6].clone()
    bn.running_mean.copy_(running_mean)
    bn.running_var.copy_(running_var)
    with torch.no_grad():
        bn.weight.copy_(inputs[3])
        bn.bias.copy_(inputs[4])
    for step in range(2):
        x = sample_inputs(DEVICE, torch.float32, rng, c=c, channels_last=channels_last)[0]
        weight, bias = inputs[1], inputs[2]
        with poisoned_allocations():
            out, save_mean, save_invstd, running_mean, running_var = torch.ops.fercuda.dwconv_bn_relu6_train_triton(
                x, weight, bias, inputs[3], inputs[4], running_mean, running_var, stride, 1, 1e-5, 0.1)
        z = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), stride, 1, 1, c)
        with torch.no_grad():
            expected = torch.nn.functional.relu6(bn.train()(z))
        assert_close_fp32(out, expected)
        assert_close_fp32(save_mean, z.mean(dim=(0, 2, 3)))
        assert_close_fp32(save_invstd, torch.rsqrt(z.var(dim=(0, 2, 3), unbiased=False) + 1e-5))
        assert save_mean.dtype == save_invstd.dtype == torch.float32
        assert running_mean.dtype == running_var.dtype == torch.float32
    assert_close_fp32(running_mean, bn.running_mean)
    assert_close_fp32(running_var, bn.running_var)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_training_op_returns_the_cpp_ops_five_outputs_and_mutates_nothing(dtype, stride, channels_last, rng):
    """One contract: on the same input the Triton and the C++ training ops return the same five
    outputs, dtypes and layouts (up to the rounding of their different summation orders), and
    neither writes to its inputs."""
    bn_dtype = torch.float32 if dtype != torch.float32 else None
    inputs = sample_inputs("cpu", dtype, rng, channels_last=channels_last, bn_dtype=bn_dtype)
    args = (*inputs, stride, 1, 1e-5, 0.1)
    results = {}
    for name, op in (("cpp", torch.ops.fercuda.dwconv_bn_relu6_train),
                     ("triton", torch.ops.fercuda.dwconv_bn_relu6_train_triton)):
        device_inputs = [t.to(DEVICE) if name == "triton" else t.clone() for t in inputs]
        before = [t.clone() for t in device_inputs]
        with poisoned_allocations():
            results[name] = [t.cpu() for t in op(*device_inputs, *args[7:])]
        for arg, was, now in zip(("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var"),
                                 before, device_inputs):
            assert torch.equal(was, now), f"{name} op wrote to its input {arg}"
    names = ("out", "save_mean", "save_invstd", "new_running_mean", "new_running_var")
    for what, cpp, tri in zip(names, results["cpp"], results["triton"]):
        assert tri.shape == cpp.shape and tri.dtype == cpp.dtype, what
        assert tri.stride() == cpp.stride(), what
        # float32 sums in different orders; a half-precision out rounds them: one unit apart at most.
        tol = 1e-5 if tri.dtype == torch.float32 else torch.finfo(tri.dtype).eps
        torch.testing.assert_close(tri.double(), cpp.double(), rtol=tol, atol=tol * max(1.0, float(cpp.abs().max())),
                                   msg=what)


def test_training_op_empty_batch_matches_cpp():
    """An empty batch: no statistics; the new running statistics are the old ones."""
    inputs = sample_inputs("cpu", torch.float32, torch.Generator().manual_seed(3), n=0)
    cpp = torch.ops.fercuda.dwconv_bn_relu6_train(*inputs)
    tri = torch.ops.fercuda.dwconv_bn_relu6_train_triton(*[t.to(DEVICE) for t in inputs])
    assert len(tri) == len(cpp) == 5
    for a, b in zip(cpp, tri):
        assert torch.equal(a, b.cpu())
    assert torch.equal(tri[3].cpu(), inputs[5]) and torch.equal(tri[4].cpu(), inputs[6])


@pytest.mark.parametrize("momentum", (0.0, 1.0, 0.25))
def test_training_op_momentum_matches_cpp(momentum, rng):
    inputs = sample_inputs("cpu", torch.float32, rng)
    cpp = torch.ops.fercuda.dwconv_bn_relu6_train(*inputs, 1, 1, 1e-5, momentum)
    tri = torch.ops.fercuda.dwconv_bn_relu6_train_triton(*[t.to(DEVICE) for t in inputs], 1, 1, 1e-5, momentum)
    for a, b in zip(cpp[3:], tri[3:]):
        torch.testing.assert_close(b.cpu(), a)
    if momentum == 0.0:
        assert torch.equal(tri[3].cpu(), inputs[5]) and torch.equal(tri[4].cpu(), inputs[6])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(momentum=None), RuntimeError, "Expected a value of type 'float' for argument 'momentum'"),
        (dict(momentum=1.5), ValueError, r"argument 'momentum' must be a number in \[0, 1\], got 1.5"),
        (dict(eps=0.0), ValueError, "argument 'eps' must be a finite number > 0, got 0"),
    ],
    ids=("momentum_none", "momentum_range", "eps"),
)
def test_training_op_refuses_what_the_cpp_op_refuses(kwargs, error, match):
    inputs = small_args()
    args = dict(stride=1, padding=1, eps=1e-5, momentum=0.1)
    args.update(kwargs)
    for op in (torch.ops.fercuda.dwconv_bn_relu6_train, torch.ops.fercuda.dwconv_bn_relu6_train_triton):
        with pytest.raises(error, match=match):
            op(*inputs, **args)


@pytest.mark.parametrize("momentum", (0.1, None))
def test_entry_point_updates_running_stats_as_the_cpp_backend(momentum, rng):
    """fercuda.ops.dwconv_bn_relu6(training=True, backend="triton") writes the new running
    statistics into the buffers as the C++ backend does; momentum=None is refused alike."""
    inputs = sample_inputs("cpu", torch.float32, rng)
    stats = {}
    for backend, device in (("cpu", "cpu"), ("triton", DEVICE)):
        x = [t.to(device) for t in inputs[:5]]
        rm, rv = inputs[5].clone().to(device), inputs[6].clone().to(device)
        if momentum is None:
            with pytest.raises(TypeError, match=r"argument 'momentum' must be a number in \[0, 1\] when training"):
                fercuda.ops.dwconv_bn_relu6(*x, rm, rv, training=True, momentum=None, backend=backend)
            assert torch.equal(rm.cpu(), inputs[5]) and torch.equal(rv.cpu(), inputs[6])
            continue
        fercuda.ops.dwconv_bn_relu6(*x, rm, rv, training=True, momentum=momentum, backend=backend)
        stats[backend] = (rm.cpu(), rv.cpu())
    if momentum is not None:
        for a, b in zip(stats["cpu"], stats["triton"]):
            torch.testing.assert_close(b, a)
        assert not torch.equal(stats["cpu"][0], inputs[5])


def grads_float64(inputs, grad_out, *, stride, training):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs[:5]]
    stats = [inputs[5].double().clone(), inputs[6].double().clone()]
    out = reference(*leaves, *stats, stride=stride, training=training)
    out.backward(grad_out.double())
    return [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("training", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_gradients_match_float64_autograd(training, stride, channels_last, rng):
    inputs = sample_inputs(DEVICE, torch.float32, rng, channels_last=channels_last)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    out = triton_dwconv.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), stride=stride,
                                        training=training)
    grad_out = torch.randn(out.shape, generator=rng).to(DEVICE)
    with poisoned_allocations():
        out.backward(grad_out)
    expected = grads_float64(inputs, grad_out, stride=stride, training=training)
    names = ("x", "weight", "bias", "bn_weight", "bn_bias")
    for name, leaf, exp in zip(names, leaves, expected):
        assert leaf.grad.dtype == leaf.dtype, name
        # A float32 sum over N*H*W terms: its error scales with the terms, not with the sum
        # (grad_bias is ~0 in training, where the batch mean absorbs the conv bias).
        assert_close_fp32(leaf.grad, exp, scale=max(1.0, float(expected[0].abs().max())))
    assert leaves[0].grad.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_gradients_without_conv_bias(rng):
    inputs = sample_inputs(DEVICE, torch.float32, rng, bias=False)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs[:5]]
    out = triton_dwconv.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), training=True)
    grad_out = torch.randn(out.shape, generator=rng).to(DEVICE)
    out.backward(grad_out)
    expected = grads_float64(inputs, grad_out, stride=1, training=True)
    for leaf, exp in zip(leaves, expected):
        if leaf is not None:
            assert_close_fp32(leaf.grad, exp, scale=max(1.0, float(expected[0].abs().max())))
    grads = torch.ops.fercuda.dwconv_bn_relu6_backward_triton(
        grad_out, *inputs[:5], *torch.ops.fercuda.dwconv_bn_relu6_train_triton(*inputs)[1:3], 1, 1, True)
    assert grads[2].shape == (3,)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_training_gradients(dtype, rng):
    inputs = sample_inputs(DEVICE, dtype, rng, bn_dtype=torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    out = triton_dwconv.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), training=True)
    grad_out = torch.randn(out.shape, generator=rng).to(DEVICE, dtype)
    out.backward(grad_out)
    expected = grads_float64(inputs, grad_out, stride=1, training=True)
    eager_leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    eager = reference(*eager_leaves, inputs[5].to(dtype), inputs[6].to(dtype), training=True, dtype=dtype)
    eager.backward(grad_out)
    names = ("x", "weight", "bias", "bn_weight", "bn_bias")
    for name, leaf, eager_leaf, exp in zip(names, leaves, eager_leaves, expected):
        if name == "bias":
            continue  # ~0 in training: both sides are rounding noise
        assert_within_twice_eager(leaf.grad, exp, eager_leaf.grad, name)


def small_args():
    gen = torch.Generator().manual_seed(0)
    return sample_inputs(DEVICE, torch.float32, gen, n=2, c=2, h=3, w=4)


def test_opcheck_inference():
    x, w, b, bn_w, bn_b, rm, rv = small_args()
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), bn_w.requires_grad_(),
            bn_b.requires_grad_(), rm, rv, 1, 1, 1e-5)
    torch.library.opcheck(torch.ops.fercuda.dwconv_bn_relu6_triton.default, args)


def test_opcheck_training():
    x, w, b, bn_w, bn_b, rm, rv = small_args()
    torch.library.opcheck(torch.ops.fercuda.dwconv_bn_relu6_train_triton.default,
                          (x, w, b, bn_w, bn_b, rm, rv, 2, 1, 1e-5, 0.1))


def test_opcheck_backward():
    x, w, b, bn_w, bn_b, rm, rv = small_args()
    out, mean, invstd, _, _ = torch.ops.fercuda.dwconv_bn_relu6_train_triton(x, w, b, bn_w, bn_b, rm, rv)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fercuda.dwconv_bn_relu6_backward_triton.default,
                          (grad_out, x, w, b, bn_w, bn_b, mean, invstd, 1, 1, True))


def test_compile_fullgraph_training_step(rng):
    inputs = sample_inputs(DEVICE, torch.float32, rng)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    rm, rv = inputs[5].clone(), inputs[6].clone()

    def step(x, w, b, bn_w, bn_b):
        return triton_dwconv.dwconv_bn_relu6(x, w, b, bn_w, bn_b, rm, rv, training=True).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*leaves).backward()
    expected = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    eager_rm, eager_rv = inputs[5].clone(), inputs[6].clone()
    triton_dwconv.dwconv_bn_relu6(*expected, eager_rm, eager_rv, training=True).square().sum().backward()
    for leaf, exp in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, exp.grad)
    torch.testing.assert_close(rm, eager_rm)
    torch.testing.assert_close(rv, eager_rv)


def test_empty_batch():
    x, w, b, bn_w, bn_b, rm, rv = sample_inputs(DEVICE, torch.float32, torch.Generator().manual_seed(1), n=0)
    out = triton_dwconv.dwconv_bn_relu6(x, w, b, bn_w, bn_b, rm, rv, stride=2)
    assert out.shape == (0, 3, 3, 4)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(x=a["x"][0]), r"'x' must be a 4-D \(N, C, H, W\) tensor"),
        (lambda a: a.update(x=a["x"].double()), "'x' must be a Float, Half or BFloat16 tensor, got Double"),
        (lambda a: a.update(weight=a["weight"][:, :, :2]), r"'weight' must have shape \(C, 1, 3, 3\)"),
        (lambda a: a.update(bias=a["bias"][:1]), r"'bias' must have shape \(C,\)"),
        (lambda a: a.update(bn_weight=a["bn_weight"].half()), "'bn_weight' must be a Float tensor like x, got Half"),
        (lambda a: a.update(stride=3), "'stride' must be 1 or 2, got 3"),
        (lambda a: a.update(padding=-1), "'padding' must be >= 0, got -1"),
    ],
    ids=("x_dim", "x_dtype", "weight_shape", "bias_shape", "bn_dtype", "stride", "padding"),
)
def test_exception_names_argument(change, match):
    x, w, b, bn_w, bn_b, rm, rv = small_args()
    args = dict(x=x, weight=w, bias=b, bn_weight=bn_w, bn_bias=bn_b, running_mean=rm, running_var=rv, stride=1,
                padding=1)
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fercuda.dwconv_bn_relu6_triton(**args)


def test_training_rejects_single_value_per_channel():
    x, w, b, bn_w, bn_b, rm, rv = sample_inputs(DEVICE, torch.float32, torch.Generator().manual_seed(2), n=1, h=1,
                                                w=1)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        torch.ops.fercuda.dwconv_bn_relu6_train_triton(x, w, b, bn_w, bn_b, rm, rv)
