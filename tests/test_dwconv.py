"""The fused depthwise conv + BatchNorm + ReLU6 op family (fercuda.ops.dwconv_bn_relu6, the
torch.ops.fercuda.dwconv_bn_relu6{,_train,_backward}{,_triton} ops, fercuda.nn.DWConvBNReLU6)
against eager PyTorch in float64 (tests/dwconv_cases.py: inputs, reference, tolerances).

Most tests run one assertion body for every backend, the parameter `backend` in the node id:
  cpu     the C++ CPU kernels, everywhere (network shapes on batches of at most 4: the float64
          references of 64 images take minutes per case on two cores);
  cuda    the CUDA C++ kernels, where a GPU is (marked needs_cuda: skipped elsewhere);
  triton  the Triton kernels: on CUDA tensors where a GPU is, else on CPU tensors through Triton's
          interpreter (conftest.py sets TRITON_INTERPRET=1), which costs milliseconds per program
          instance: there only at the small shapes, the larger ones marked needs_cuda.
Then, in sections of their own, the tests that make sense for one backend: the C++ CPU kernels'
float64 path and their argument checks against the fakes, the CUDA build, the module, and the CUDA
device code compiled for the CPU (id `emulated`: its launch plans, forced splits, 64-bit indices).

GPU cases have "cuda" or "triton" in their node ids and never "cpu"; CPU cases neither of them.
"""

import copy
import ctypes
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fercuda  # noqa: F401  (loads the C++ ops)
import fercuda.nn as fnn
import fercuda.ops
import fercuda.triton.dwconv  # noqa: F401  (registers the Triton ops)
from cuda_emulation import build_emulation
from dwconv_cases import (
    HALF_INPUT_FLOAT32_STATS_TOL,
    LOW_PRECISION,
    assert_close_fp32,
    assert_grad_close_fp32,
    assert_max_error,
    assert_stats_close,
    assert_within_twice_eager,
    batch_stats,
    conv64,
    eager_gradients,
    float64_gradients,
    off_the_kinks,
    poisoned_allocations,
    reference,
    sample_inputs,
    stats_tolerance,
)
from fercuda import _build_info

OPS = torch.ops.fercuda
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = dict(argnames="channels_last", argvalues=(False, True), ids=("nchw", "channels_last"))
GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias")
NEEDS_CUDA = pytest.mark.needs_cuda
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fercuda.ops' backend= names: "cpu" the C++ CPU kernels, "cuda" the CUDA C++ kernels.
BACKENDS = ("cpu", pytest.param("cuda", marks=NEEDS_CUDA), "triton")
# The same, Triton only on a GPU: cases too large for the interpreter.
BACKENDS_TRITON_ON_GPU = ("cpu", pytest.param("cuda", marks=NEEDS_CUDA), pytest.param("triton", marks=NEEDS_CUDA))
# The backends checked against the C++ CPU op's outputs.
OTHER_BACKENDS = (pytest.param("cuda", marks=NEEDS_CUDA), "triton")

# (N, C, H, W, stride): the network's blocks, and an odd shape whose channels do not fill a
# channels_last group of 32 and whose planes are not multiples of any tile.
NETWORK_SHAPES = [
    (64, 128, 48, 48, 1),
    (64, 128, 48, 48, 2),
    (64, 256, 24, 24, 1),
    (64, 512, 12, 12, 2),
    (64, 1024, 6, 6, 1),
    (64, 1536, 6, 6, 1),
    (3, 37, 9, 11, 1),
    (3, 37, 9, 11, 2),
]
# Odd sizes, one channel, 1x1 images, widths that leave the CPU kernels' vector tails.
ODD_SHAPES = [(*nchw, stride) for nchw in ((3, 5, 7, 9), (2, 1, 6, 5), (4, 3, 1, 1), (2, 19, 12, 13))
              for stride in (1, 2)]
# What the Triton interpreter affords.
SMALL_SHAPES = [(2, 3, 5, 7, 1), (2, 3, 5, 7, 2)]
# The edges of the CPU kernels' register blocks (16 or 32 channels a vector block, up to 8
# output columns a block): widths 1 to 7 past a block, channels 1 to 17 past a vector, N=1,
# stride 2.
BLOCK_EDGE_SHAPES = [(1, 17, 5, 15, 1), (2, 33, 4, 9, 1), (1, 49, 5, 23, 2), (2, 16, 3, 17, 1), (1, 1, 6, 8, 2),
                     (2, 31, 5, 1, 1), (1, 47, 4, 10, 1), (2, 8, 3, 2, 2), (1, 64, 2, 7, 1)]


def shape_id(shape):
    return "x".join(map(str, shape[:4])) + (f"-s{shape[4]}" if len(shape) == 5 else "")


def cases(shapes, interpreted=(), backends=("cpu", "cuda", "triton")):
    """(backend, shape) parameters: cuda needs a GPU; triton too, but at the shapes in
    `interpreted`, which it runs under the interpreter where no GPU is."""
    params = []
    for backend in backends:
        for shape in shapes:
            gpu_only = backend == "cuda" or (backend == "triton" and shape not in interpreted)
            params.append(pytest.param(backend, shape, id=f"{backend}-{shape_id(shape)}",
                                       marks=NEEDS_CUDA if gpu_only else ()))
    return params


def device_of(backend):
    return {"cpu": "cpu", "cuda": "cuda", "triton": TRITON_DEVICE}[kernel_backend(backend)]


# The C++ CPU kernels on one instruction-set path: backend "cpu_<path>" (fercuda.set_cpu_isa),
# every path this CPU can run; the others skip, saying why. "cpu" takes the widest path.
CPU_ISAS = ("baseline", "avx2", "avx512", "avx512_bf16")


def isa_cases(shapes):
    """(backend, shape) parameters of the C++ CPU kernels on every instruction-set path."""
    supported = fercuda.supported_cpu_isas()
    return [pytest.param(f"cpu_{isa}", shape, id=f"cpu_{isa}-{shape_id(shape)}",
                         marks=pytest.mark.skipif(isa not in supported,
                                                  reason=f"this CPU cannot run the {isa} path (it runs {supported})"))
            for isa in CPU_ISAS for shape in shapes]


def kernel_backend(backend):
    """fercuda.ops' backend= of a test backend ("cpu_avx2" -> "cpu")."""
    return backend.split("_")[0]


@pytest.fixture(autouse=True)
def cpu_isa_of_backend(request):
    """Sets the instruction-set path of a "cpu_<path>" backend for the test, and restores it."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if not (isinstance(backend, str) and backend.startswith("cpu_")):
        yield
        return
    before = fercuda.set_cpu_isa(backend.split("_", 1)[1])
    try:
        yield
    finally:
        fercuda.set_cpu_isa(before)


def batch(backend, n):
    """The batch of a case: the network's on a GPU, at most 4 on the CPU."""
    return n if device_of(backend) == "cuda" else min(n, 4)


def op(backend, kind=""):
    """The registered op of a backend; kind "", "_train" or "_backward"."""
    return getattr(OPS, f"dwconv_bn_relu6{kind}" + ("_triton" if backend == "triton" else ""))


def train(backend, inputs, stride, running_mean, running_var, padding=1):
    """(out, save_mean, save_invstd); the new running statistics copied into the buffers, as
    fercuda.ops.dwconv_bn_relu6 does."""
    out, mean, invstd, new_mean, new_var, _ = op(backend, "_train")(
        *inputs[:5], running_mean, running_var, stride, padding, 1e-5, 0.1)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return out, mean, invstd


def backward(backend, grad_out, inputs, mean, invstd, stride, training, padding=1):
    return op(backend, "_backward")(grad_out, *inputs[:5], mean, invstd, stride, padding, training)


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def leaves_of(inputs):
    return [None if t is None else t.detach().clone().requires_grad_() for t in inputs[:5]]


# =============================================================================================
# Every backend: inference
# =============================================================================================


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend, shape", cases(NETWORK_SHAPES + ODD_SHAPES + SMALL_SHAPES, SMALL_SHAPES)
                         + isa_cases(BLOCK_EDGE_SHAPES + [(4, 256, 24, 24, 1), (4, 184, 6, 6, 1)]))
def test_inference(backend, shape, channels_last, dtype, rng):
    n, c, h, w, stride = shape
    inputs = sample_inputs(device_of(backend), dtype, rng, n=batch(backend, n), c=c, h=h, w=w,
                           channels_last=channels_last)
    with poisoned_allocations():
        out = fercuda.ops.dwconv_bn_relu6(*inputs, stride=stride, backend=kernel_backend(backend))
    expected = reference(*inputs, stride=stride)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=memory_format(channels_last))
    if dtype == torch.float32:
        assert_close_fp32(out, expected)
    else:
        eager = reference(*inputs[:5], inputs[5].clone(), inputs[6].clone(), stride=stride, dtype=dtype)
        assert_within_twice_eager(out, expected, eager, "out")


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "no_bias"))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend, shape", cases([(64, 256, 24, 24, 1), (2, 3, 5, 7, 1)], [(2, 3, 5, 7, 1)])
                         + isa_cases([(2, 33, 5, 9, 1)]))
def test_inference_float32_batchnorm_with_half_input(backend, shape, dtype, bias, channels_last, rng):
    n, c, h, w, stride = shape
    inputs = sample_inputs(device_of(backend), dtype, rng, n=batch(backend, n), c=c, h=h, w=w, bias=bias,
                           bn_dtype=torch.float32, channels_last=channels_last)
    out = op(backend)(*inputs, stride, 1, 1e-5)
    eager = reference(*inputs[:5], inputs[5].to(dtype), inputs[6].to(dtype), stride=stride, dtype=dtype)
    assert out.dtype == dtype
    assert_within_twice_eager(out, reference(*inputs, stride=stride), eager, "out")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_input_with_float32_batchnorm(backend, dtype, rng):
    """Inference and training: the output in x's dtype within twice the error of eager PyTorch
    (BatchNorm in float32 there too), the running statistics kept in float32."""
    inputs = sample_inputs(device_of(backend), dtype, rng, n=2, c=6, h=9, w=8, bn_dtype=torch.float32)
    for training in (False, True):
        rm, rv = inputs[5].clone(), inputs[6].clone()
        y = fercuda.ops.dwconv_bn_relu6(*inputs[:5], rm, rv, training=training, backend=backend)
        ref_mean, ref_var = inputs[5].double().clone(), inputs[6].double().clone()
        expected = reference(*inputs[:5], ref_mean, ref_var, training=training)
        eager = reference(*inputs[:5], inputs[5].clone(), inputs[6].clone(), training=training, dtype=dtype,
                          bn_dtype=torch.float32)
        assert y.dtype == dtype and rm.dtype == torch.float32
        assert_within_twice_eager(y, expected, eager, "out")
        assert_stats_close(rm, ref_mean, HALF_INPUT_FLOAT32_STATS_TOL, "running_mean")
        assert_stats_close(rv, ref_var, HALF_INPUT_FLOAT32_STATS_TOL, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input(backend, rng):
    inputs = list(sample_inputs(device_of(backend), torch.float32, rng, n=2, c=4, h=10, w=14))
    inputs[0] = inputs[0][:, :, ::2, 1::2]  # neither NCHW- nor channels_last-contiguous
    out = fercuda.ops.dwconv_bn_relu6(*inputs, backend=backend)
    assert_close_fp32(out, reference(*inputs))


@pytest.mark.parametrize("padding", (0, 2))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_other_padding(backend, padding, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng, h=6, w=5)
    out = fercuda.ops.dwconv_bn_relu6(*inputs, stride=1, padding=padding, backend=backend)
    assert_close_fp32(out, reference(*inputs, padding=padding))


# =============================================================================================
# Every backend: training forward, batch and running statistics
# =============================================================================================


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend, shape", cases(ODD_SHAPES + SMALL_SHAPES, SMALL_SHAPES)
                         + isa_cases(BLOCK_EDGE_SHAPES))
def test_training_forward(backend, shape, channels_last, dtype, rng):
    """One step of the functional training op: the output, the float32 batch statistics and the
    new running statistics in the BatchNorm tensors' dtype; the inputs left as they were."""
    n, c, h, w, stride = shape
    inputs = sample_inputs(device_of(backend), dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
    rm, rv = inputs[5].clone(), inputs[6].clone()
    y, save_mean, save_invstd, new_mean, new_var, save_z = op(backend, "_train")(*inputs[:5], rm, rv, stride, 1, 1e-5,
                                                                                  0.3)
    assert torch.equal(rm, inputs[5]) and torch.equal(rv, inputs[6])  # the op is functional
    assert y.is_contiguous(memory_format=memory_format(channels_last))
    ref_mean, ref_var = inputs[5].double().clone(), inputs[6].double().clone()
    expected = reference(*inputs[:5], ref_mean, ref_var, stride=stride, training=True, momentum=0.3)
    if dtype == torch.float32:
        assert_close_fp32(y, expected)
    else:
        eager = reference(*inputs[:5], inputs[5].clone(), inputs[6].clone(), stride=stride, training=True, momentum=0.3,
                          dtype=dtype)
        assert_within_twice_eager(y, expected, eager, "out")
    # Batch statistics of the conv output, float32 whatever x's dtype.
    mean, invstd = batch_stats(conv64(inputs, stride))
    tol = stats_tolerance(dtype)
    assert save_mean.dtype == save_invstd.dtype == torch.float32
    assert_stats_close(save_mean, mean, tol, "save_mean")
    assert_stats_close(save_invstd, invstd, tol, "save_invstd")
    assert new_mean.dtype == inputs[5].dtype and new_var.dtype == inputs[6].dtype
    assert_stats_close(new_mean, ref_mean, tol, "new_running_mean")
    assert_stats_close(new_var, ref_var, tol, "new_running_var")
    # save_z: the conv output in the statistics' dtype and y's layout, kept for the backward by
    # the CPU kernels in channels_last float32 and bfloat16 (outputs this small always); else
    # none.
    assert save_z.dtype == save_mean.dtype
    from fercuda._checks import dwconv_channels_last  # the op's layout rule (C=1 counts as NCHW)

    if kernel_backend(backend) != "cpu" or not dwconv_channels_last(inputs[0]) or \
            dtype not in (torch.float32, torch.bfloat16):
        assert save_z.shape == (0,)
    else:
        z64 = conv64(inputs, stride)
        assert save_z.shape == y.shape and save_z.stride() == y.stride()
        torch.testing.assert_close(save_z.double(), z64, rtol=1e-5, atol=1e-5 * max(1.0, float(z64.abs().max())))


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend, shape", cases(NETWORK_SHAPES + SMALL_SHAPES, SMALL_SHAPES))
def test_training_forward_and_running_stats_after_two_steps(backend, shape, channels_last, rng):
    """Batch statistics for the output, new running statistics equal to nn.BatchNorm2d's (unbiased
    variance, momentum) after two steps, each step feeding the next its returned statistics."""
    n, c, h, w, stride = shape
    n = batch(backend, n)
    device = device_of(backend)
    inputs = sample_inputs(device, torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
    bn = nn.BatchNorm2d(c, momentum=0.1, eps=1e-5).double().to(device).train()
    running_mean, running_var = inputs[5].clone(), inputs[6].clone()
    with torch.no_grad():
        bn.running_mean.copy_(running_mean)
        bn.running_var.copy_(running_var)
        bn.weight.copy_(inputs[3])
        bn.bias.copy_(inputs[4])
    for _ in range(2):
        x = sample_inputs(device, torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)[0]
        step_inputs = (x,) + inputs[1:]
        with poisoned_allocations():
            out, save_mean, save_invstd = train(backend, step_inputs, stride, running_mean, running_var)
        z = conv64(step_inputs, stride)
        with torch.no_grad():
            expected = F.relu6(bn(z))
        assert out.is_contiguous(memory_format=memory_format(channels_last))
        assert_close_fp32(out, expected)
        mean, invstd = batch_stats(z)
        assert save_mean.dtype == save_invstd.dtype == torch.float32
        assert_close_fp32(save_mean, mean, scale=float(z.abs().max()))
        assert_close_fp32(save_invstd, invstd)
        assert running_mean.dtype == running_var.dtype == torch.float32
    assert_close_fp32(running_mean, bn.running_mean)
    assert_close_fp32(running_var, bn.running_var)


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_training_op_returns_the_cpp_ops_five_outputs_and_mutates_nothing(backend, dtype, stride, channels_last, rng):
    """One contract: on the same input the backend's and the C++ CPU training ops return the same
    five outputs, dtypes and layouts (up to the rounding of their different summation orders),
    and neither writes to its inputs."""
    bn_dtype = torch.float32 if dtype != torch.float32 else None
    inputs = sample_inputs("cpu", dtype, rng, channels_last=channels_last, bn_dtype=bn_dtype)
    results = {}
    for name, train_op, device in (("cpp", OPS.dwconv_bn_relu6_train, "cpu"),
                                   (backend, op(backend, "_train"), device_of(backend))):
        device_inputs = [t.to(device) if device != "cpu" else t.clone() for t in inputs]
        before = [t.clone() for t in device_inputs]
        with poisoned_allocations():
            results[name] = [t.cpu() for t in train_op(*device_inputs, stride, 1, 1e-5, 0.1)]
        for arg, was, now in zip(("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var"),
                                 before, device_inputs):
            assert torch.equal(was, now), f"{name} op wrote to its input {arg}"
    names = ("out", "save_mean", "save_invstd", "new_running_mean", "new_running_var")
    for what, cpp, got in zip(names, results["cpp"], results[backend]):
        assert got.shape == cpp.shape and got.dtype == cpp.dtype, what
        assert got.stride() == cpp.stride(), what
        # float32 sums in different orders; a half-precision out rounds them: one unit apart at most.
        tol = 1e-5 if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
        torch.testing.assert_close(got.double(), cpp.double(), rtol=tol, atol=tol * max(1.0, float(cpp.abs().max())),
                                   msg=what)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_training_op_empty_batch_matches_cpp(backend):
    """An empty batch: no statistics; the new running statistics are the old ones."""
    inputs = sample_inputs("cpu", torch.float32, torch.Generator().manual_seed(3), n=0)
    cpp = OPS.dwconv_bn_relu6_train(*inputs)
    got = op(backend, "_train")(*[t.to(device_of(backend)) for t in inputs])
    assert len(got) == len(cpp) == 6
    for a, b in zip(cpp[:5], got[:5]):
        assert torch.equal(a, b.cpu())
    assert torch.equal(got[3].cpu(), inputs[5]) and torch.equal(got[4].cpu(), inputs[6])
    # save_z: the CPU kernels' (empty) conv output; the other backends keep none.
    assert cpp[5].numel() == 0 and got[5].shape == (0,)


@pytest.mark.parametrize("momentum", (0.0, 1.0, 0.25))
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_training_op_momentum_matches_cpp(backend, momentum, rng):
    inputs = sample_inputs("cpu", torch.float32, rng)
    cpp = OPS.dwconv_bn_relu6_train(*inputs, 1, 1, 1e-5, momentum)
    got = op(backend, "_train")(*[t.to(device_of(backend)) for t in inputs], 1, 1, 1e-5, momentum)
    for a, b in zip(cpp[3:5], got[3:5]):
        torch.testing.assert_close(b.cpu(), a)
    if momentum == 0.0:
        assert torch.equal(got[3].cpu(), inputs[5]) and torch.equal(got[4].cpu(), inputs[6])


@pytest.mark.parametrize("momentum", (0.1, None))
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_entry_point_updates_running_stats_as_the_cpp_backend(backend, momentum, rng):
    """fercuda.ops.dwconv_bn_relu6(training=True, backend=...) writes the new running statistics
    into the buffers as the C++ CPU backend does; momentum=None is refused alike."""
    inputs = sample_inputs("cpu", torch.float32, rng)
    stats = {}
    for name, device in (("cpu", "cpu"), (backend, device_of(backend))):
        x = [t.to(device) for t in inputs[:5]]
        rm, rv = inputs[5].clone().to(device), inputs[6].clone().to(device)
        if momentum is None:
            with pytest.raises(TypeError, match=r"argument 'momentum' must be a number in \[0, 1\] when training"):
                fercuda.ops.dwconv_bn_relu6(*x, rm, rv, training=True, momentum=None, backend=name)
            assert torch.equal(rm.cpu(), inputs[5]) and torch.equal(rv.cpu(), inputs[6])
            continue
        fercuda.ops.dwconv_bn_relu6(*x, rm, rv, training=True, momentum=momentum, backend=name)
        stats[name] = (rm.cpu(), rv.cpu())
    if momentum is not None:
        for a, b in zip(stats["cpu"], stats[backend]):
            torch.testing.assert_close(b, a)
        assert not torch.equal(stats["cpu"][0], inputs[5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_bounds_and_none_when_frozen(backend, rng):
    # momentum 0 and 1 are BatchNorm's own bounds; None is accepted where it is unused (training=False).
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=2, c=4, h=5, w=5)
    frozen = fercuda.ops.dwconv_bn_relu6(*inputs, backend=backend)
    assert torch.equal(fercuda.ops.dwconv_bn_relu6(*inputs, momentum=None, backend=backend), frozen)
    for momentum in (0.0, 1.0):
        rm, rv = inputs[5].clone(), inputs[6].clone()
        fercuda.ops.dwconv_bn_relu6(*inputs[:5], rm, rv, momentum=momentum, training=True, backend=backend)
        ref_mean, ref_var = inputs[5].double().clone(), inputs[6].double().clone()
        reference(*inputs[:5], ref_mean, ref_var, training=True, momentum=momentum)
        torch.testing.assert_close(rm.double(), ref_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv.double(), ref_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs = sample_inputs(device_of(backend), torch.float32, torch.Generator().manual_seed(1), n=0, c=4, h=5, w=5)
    x, w, b, bw, bb = leaves_of(inputs)
    rm, rv = inputs[5].clone(), inputs[6].clone()
    assert fercuda.ops.dwconv_bn_relu6(x, w, b, bw, bb, rm, rv, backend=backend).shape == (0, 4, 5, 5)
    assert fercuda.ops.dwconv_bn_relu6(x, w, b, bw, bb, rm, rv, stride=2, backend=backend).shape == (0, 4, 3, 3)
    y = fercuda.ops.dwconv_bn_relu6(x, w, b, bw, bb, rm, rv, stride=2, training=True, backend=backend)
    assert y.shape == (0, 4, 3, 3)
    assert torch.equal(rm, inputs[5]) and torch.equal(rv, inputs[6])
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend, rng):
    """backend= picks the kernels, not the result: each backend gives the C++ CPU kernels' output
    (the default for CPU tensors) up to rounding, the "cpu" backend that very output."""
    inputs = sample_inputs("cpu", torch.float32, rng, bias=False)
    default = fercuda.ops.dwconv_bn_relu6(*inputs)
    got = fercuda.ops.dwconv_bn_relu6(*[None if t is None else t.to(device_of(backend)) for t in inputs],
                                      backend=backend).cpu()
    if backend == "cpu":
        assert torch.equal(got, default)
    else:
        torch.testing.assert_close(got, default, rtol=1e-5, atol=1e-5)


# =============================================================================================
# Every backend: gradients
# =============================================================================================


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("training", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("backend, shape", cases(NETWORK_SHAPES))
def test_gradients_match_float64_autograd(backend, shape, training, channels_last, rng):
    """The backward op at the network's shapes, its reductions within float32 rounding of their terms."""
    n, c, h, w, stride = shape
    n = batch(backend, n)
    device = device_of(backend)
    inputs = sample_inputs(device, torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
    if training:
        _, mean, invstd = train(backend, inputs, stride, inputs[5].clone(), inputs[6].clone())
    else:
        mean, invstd = inputs[5], torch.rsqrt(inputs[6] + 1e-5)
    ho, wo = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    grad_out = torch.randn((n, c, ho, wo), generator=rng).to(device)
    grad_out = off_the_kinks(grad_out, inputs, stride=stride, training=training)
    grad_out = grad_out.contiguous(memory_format=memory_format(channels_last))
    with poisoned_allocations():
        grads = backward(backend, grad_out, inputs, mean, invstd, stride, training)
    expected, term_sums = float64_gradients(inputs, grad_out, stride=stride, training=training)
    grad_x_scale = float(expected[0].abs().max())
    for name, got, exp, term_sum, like in zip(GRAD_NAMES, grads, expected, term_sums, inputs[:5]):
        assert got.shape == exp.shape and got.dtype == like.dtype, name
        assert_grad_close_fp32(name, got, exp, term_sum, grad_x_scale)
    assert grads[0].is_contiguous(memory_format=memory_format(channels_last))


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("training", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_through_autograd_match_float64(backend, training, stride, channels_last, rng):
    """fercuda.ops.dwconv_bn_relu6's autograd, frozen and batch statistics, on a small input."""
    device = device_of(backend)
    inputs = sample_inputs(device, torch.float32, rng, channels_last=channels_last)
    leaves = leaves_of(inputs)
    out = fercuda.ops.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), stride=stride, training=training,
                                      backend=backend)
    grad_out = torch.randn(out.shape, generator=rng).to(device)
    with poisoned_allocations():
        out.backward(grad_out)
    expected, _ = float64_gradients(inputs, grad_out, stride=stride, training=training)
    for name, leaf, exp in zip(GRAD_NAMES, leaves, expected):
        assert leaf.grad.dtype == leaf.dtype, name
        # A float32 sum over N*H*W terms: its error scales with the terms, not with the sum
        # (grad_bias is ~0 in training, where the batch mean absorbs the conv bias).
        assert_close_fp32(leaf.grad, exp, scale=max(1.0, float(expected[0].abs().max())))
    assert leaves[0].grad.is_contiguous(memory_format=memory_format(channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_without_conv_bias(backend, rng):
    device = device_of(backend)
    inputs = sample_inputs(device, torch.float32, rng, bias=False)
    leaves = leaves_of(inputs)
    out = fercuda.ops.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), training=True, backend=backend)
    grad_out = torch.randn(out.shape, generator=rng).to(device)
    out.backward(grad_out)
    expected, _ = float64_gradients(inputs, grad_out, stride=1, training=True)
    for leaf, exp in zip(leaves, expected):
        if leaf is not None:
            assert_close_fp32(leaf.grad, exp, scale=max(1.0, float(expected[0].abs().max())))
    _, mean, invstd, _, _, _ = op(backend, "_train")(*inputs)
    grads = backward(backend, grad_out, inputs, mean, invstd, 1, True)
    assert grads[2].shape == (3,)


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend, shape", cases([(64, 256, 24, 24, 1), (2, 3, 5, 7, 1)], [(2, 3, 5, 7, 1)]))
def test_low_precision_training_gradients(backend, shape, dtype, channels_last, rng):
    n, c, h, w, stride = shape
    n = batch(backend, n)
    device = device_of(backend)
    inputs = sample_inputs(device, dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last,
                           bn_dtype=torch.float32)
    leaves = leaves_of(inputs)
    out = fercuda.ops.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), stride=stride, training=True,
                                      backend=backend)
    grad_out = torch.randn(out.shape, generator=rng).to(device, dtype)
    out.backward(grad_out)
    expected, _ = float64_gradients(inputs, grad_out, stride=stride, training=True)
    eager = eager_gradients(inputs, grad_out, dtype, stride=stride, training=True)
    for name, leaf, exp, eager_grad in zip(GRAD_NAMES, leaves, expected, eager):
        if name != "bias":  # ~0 in training: both sides are rounding noise
            assert_within_twice_eager(leaf.grad, exp, eager_grad, name)


@pytest.mark.parametrize("training", (False, True), ids=("frozen_bn", "batch_stats"))
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Channel counts below, at and past the vector blocks of the channels_last kernels (32 floats).
@pytest.mark.parametrize("backend, shape", cases([(3, 5, 11, 10, 2), (2, 37, 9, 8, 1), (2, 70, 6, 6, 1),
                                                  (2, 33, 7, 9, 2)])
                         + isa_cases([(1, 17, 5, 15, 1), (2, 33, 4, 9, 1), (1, 49, 5, 11, 2), (2, 70, 6, 6, 1)]))
def test_backward_matches_reference(backend, shape, dtype, channels_last, training, rng):
    n, c, h, w, stride = shape
    device = device_of(backend)
    inputs = sample_inputs(device, dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
    leaves = leaves_of(inputs)
    grad = torch.randn(n, c, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=rng,
                       dtype=torch.float64).to(device)
    # Low precision: where the float64 pre-activation lies within float32 rounding of ReLU6's
    # kinks, the kernel's (from the same half-precision inputs) may fall on the other side and
    # pass or stop a gradient that float64 does not: one such position moved grad bn_weight by
    # 4 bfloat16 ulps (FERCUDA_TEST_SEED=1716067840). Zero gradient there.
    if dtype != torch.float32:
        grad = off_the_kinks(grad, [t if t is None else t.double() for t in inputs], stride=stride,
                             training=training)
    y = fercuda.ops.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), stride=stride, training=training,
                                    backend=kernel_backend(backend))
    grads = torch.autograd.grad(y, leaves, grad.to(dtype))
    assert grads[0].is_contiguous(memory_format=memory_format(channels_last))
    expected, term_sums = float64_gradients(inputs, grad, stride=stride, training=training)
    eager = eager_gradients(inputs, grad, dtype, stride=stride, training=training) if dtype != torch.float32 else None
    grad_x_scale = float(expected[0].abs().max())
    for i, (name, got, exp, term_sum) in enumerate(zip(GRAD_NAMES, grads, expected, term_sums)):
        assert got.dtype == inputs[i].dtype, name
        if eager is None:
            # float32: the reductions' error scales with their terms (the conv bias gradient with
            # batch statistics is a sum of terms that cancels to ~0).
            assert_grad_close_fp32(name, got, exp, term_sum, grad_x_scale)
        else:
            assert_max_error(got, exp, eager=eager[i], what=name)


@pytest.mark.parametrize("backend", BACKENDS_TRITON_ON_GPU)
def test_reductions_are_deterministic(backend, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=batch(backend, 64), c=256, h=24, w=24)
    runs = []
    for _ in range(2):
        out, mean, invstd = train(backend, inputs, 1, inputs[5].clone(), inputs[6].clone())
        grad_out = torch.ones_like(out)
        runs.append((out, mean, invstd) + tuple(backward(backend, grad_out, inputs, mean, invstd, 1, True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS_TRITON_ON_GPU)
def test_autograd_training_step(backend, rng):
    """fercuda.ops.dwconv_bn_relu6 in training: the shared autograd calls the backend's backward op."""
    device = device_of(backend)
    inputs = sample_inputs(device, torch.float32, rng, n=8, c=64, h=12, w=12)
    leaves = leaves_of(inputs)
    out = fercuda.ops.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), training=True, backend=backend)
    grad_out = torch.randn(out.shape, generator=rng).to(device)
    out.backward(grad_out)
    expected, term_sums = float64_gradients(inputs, grad_out, training=True)
    scale = float(expected[0].abs().max())
    for name, leaf, exp, term_sum in zip(GRAD_NAMES, leaves, expected, term_sums):
        assert_grad_close_fp32(name, leaf.grad, exp, term_sum, scale)


# =============================================================================================
# Every backend: torch.library and torch.compile
# =============================================================================================


@pytest.mark.parametrize("backend, shape", cases([(4, 40, 6, 6), (2, 3, 6, 7)], [(2, 3, 6, 7)]))
def test_opcheck(backend, shape, rng):
    """Schema, fake kernel, autograd registration and AOT dispatch of the three ops, whose fakes and
    autograd are shared by the backends."""
    n, c, h, w = shape
    device = device_of(backend)
    for channels_last in (False, True):
        inputs = sample_inputs(device, torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
        leaves = leaves_of(inputs)
        for stride in (1, 2):
            torch.library.opcheck(op(backend).default, (*leaves, *inputs[5:], stride, 1, 1e-5))
            torch.library.opcheck(op(backend, "_train").default, (*leaves, *inputs[5:], stride, 1, 1e-5, 0.1))
        out, mean, invstd, _, _, _ = op(backend, "_train")(*inputs, 1, 1, 1e-5, 0.1)
        grad = torch.randn(out.shape, generator=rng).to(device)
        frozen = (inputs[5].clone(), torch.rsqrt(inputs[6] + 1e-5))
        for training, stats in ((False, frozen), (True, (mean, invstd))):
            torch.library.opcheck(op(backend, "_backward").default, (grad, *inputs[:5], *stats, 1, 1, training))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_training_step(backend, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng)
    leaves = leaves_of(inputs)
    rm, rv = inputs[5].clone(), inputs[6].clone()

    def step(x, w, b, bn_w, bn_b):
        return fercuda.ops.dwconv_bn_relu6(x, w, b, bn_w, bn_b, rm, rv, training=True, backend=backend).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*leaves).backward()
    expected = leaves_of(inputs)
    eager_rm, eager_rv = inputs[5].clone(), inputs[6].clone()
    fercuda.ops.dwconv_bn_relu6(*expected, eager_rm, eager_rv, training=True, backend=backend).square().sum().backward()
    for leaf, exp in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, exp.grad)
    torch.testing.assert_close(rm, eager_rm)
    torch.testing.assert_close(rv, eager_rv)


# =============================================================================================
# Every backend: bad input, refused with the argument named
# =============================================================================================


def _set(index, value):
    return lambda a: a.__setitem__(index, value(a) if callable(value) else value)


# (id, change of the op's positional arguments, message, backends that refuse it)
ARGUMENT_ERRORS = [
    ("x_dim", _set(0, lambda a: a[0][0]), r"'x' must be a 4-D \(N, C, H, W\) tensor", BACKENDS),
    # float64 is among the C++ CPU kernels' dtypes only.
    ("x_dtype", _set(0, lambda a: a[0].double()), "'x' must be a Float, Half or BFloat16 tensor, got Double",
     OTHER_BACKENDS),
    ("weight_shape", _set(1, lambda a: a[1].reshape(-1, 1, 9)), r"'weight' must have shape \(C, 1, 3, 3\)", BACKENDS),
    ("weight_rows", _set(1, lambda a: a[1][:, :, :2]), r"'weight' must have shape \(C, 1, 3, 3\)", BACKENDS),
    ("bias_shape", _set(2, lambda a: a[2][:1]), r"'bias' must have shape \(C,\)", BACKENDS),
    ("bn_dtype", _set(3, lambda a: a[3].half()), "'bn_weight' must be a Float tensor like x, got Half", BACKENDS),
    ("stride", _set(7, 3), "'stride' must be 1 or 2, got 3", BACKENDS),
    ("padding", _set(8, -1), "'padding' must be >= 0, got -1", BACKENDS),
]


def _argument_error_cases():
    params = []
    for name, change, match, backends in ARGUMENT_ERRORS:
        for backend in backends:
            value, marks = (backend.values[0], backend.marks) if hasattr(backend, "values") else (backend, ())
            params.append(pytest.param(value, change, match, id=f"{value}-{name}", marks=marks))
    return params


@pytest.mark.parametrize("backend, change, match", _argument_error_cases())
def test_exception_names_argument(backend, change, match, rng):
    args = list(sample_inputs(device_of(backend), torch.float32, rng)) + [1, 1, 1e-5]
    change(args)
    with pytest.raises(RuntimeError, match=match):
        op(backend)(*args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(momentum=None), RuntimeError, "Expected a value of type 'float' for argument 'momentum'"),
        (dict(momentum=1.5), ValueError, r"argument 'momentum' must be a number in \[0, 1\], got 1.5"),
        (dict(eps=0.0), ValueError, "argument 'eps' must be a finite number > 0, got 0"),
    ],
    ids=("momentum_none", "momentum_range", "eps"),
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_training_op_eps_momentum(backend, kwargs, error, match):
    inputs = sample_inputs(device_of(backend), torch.float32, torch.Generator().manual_seed(0), n=2, c=2, h=3, w=4)
    args = dict(stride=1, padding=1, eps=1e-5, momentum=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        op(backend, "_train")(*inputs, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_single_value_per_channel_in_training(backend):
    inputs = sample_inputs(device_of(backend), torch.float32, torch.Generator().manual_seed(2), n=1, h=1, w=1)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        op(backend, "_train")(*inputs)


BAD_EPS = [(math.nan, "nan"), (-1e-5, "-1e-05"), (0.0, "0"), (math.inf, "inf"), (-math.inf, "-inf")]
BAD_MOMENTUM = [(math.nan, "nan"), (-0.1, "-0.1"), (1.5, "1.5"), (math.inf, "inf")]


def _entry_backends(backend):
    """backend= values that reach `backend`'s kernels: None picks the C++ kernels of the device."""
    return ("triton",) if backend == "triton" else (None, backend)


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("eps, printed", BAD_EPS, ids=[p for _, p in BAD_EPS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_eps(backend, eps, printed, training, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=2, c=4, h=5, w=5)
    stats = [t.clone() for t in inputs[5:]]
    for name in _entry_backends(backend):
        with pytest.raises(ValueError, match=f"^fercuda.dwconv_bn_relu6: argument 'eps' must be a finite number > 0, "
                                             f"got {printed}$"):
            fercuda.ops.dwconv_bn_relu6(*inputs, eps=eps, training=training, backend=name)
    assert all(torch.equal(a, b) for a, b in zip(inputs[5:], stats))  # refused before any update


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("momentum, printed", BAD_MOMENTUM, ids=[p for _, p in BAD_MOMENTUM])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_momentum(backend, momentum, printed, training, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng, n=2, c=4, h=5, w=5)
    stats = [t.clone() for t in inputs[5:]]
    for name in _entry_backends(backend):
        with pytest.raises(ValueError, match=r"^fercuda.dwconv_bn_relu6: argument 'momentum' must be a number in "
                                             rf"\[0, 1\], got {printed}$"):
            fercuda.ops.dwconv_bn_relu6(*inputs, momentum=momentum, training=training, backend=name)
    assert all(torch.equal(a, b) for a, b in zip(inputs[5:], stats))


# =============================================================================================
# The C++ CPU kernels only: float64 (no GPU kernel takes it), argument checks against the fakes
# =============================================================================================


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(**LAYOUTS)
def test_gradcheck(training, stride, channels_last, rng):
    inputs = sample_inputs("cpu", torch.float64, rng, n=2, c=3, h=5, w=6, bias=stride == 1,
                           channels_last=channels_last)
    rm, rv = inputs[5], inputs[6]

    def fn(x, w, b, bw, bb):
        return fercuda.ops.dwconv_bn_relu6(x, w, b, bw, bb, rm.clone(), rv.clone(), stride=stride, training=training)

    assert torch.autograd.gradcheck(fn, tuple(leaves_of(inputs)), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_other_paddings(padding, stride, rng):
    inputs = sample_inputs("cpu", torch.float64, rng, n=2, c=3, h=7, w=8)
    leaves = leaves_of(inputs)
    for training in (False, True):
        args = (*leaves, *inputs[5:])
        y = OPS.dwconv_bn_relu6_train(*args, stride, padding, 1e-5, 0.1)[0] if training else \
            OPS.dwconv_bn_relu6(*args, stride, padding, 1e-5)
        ref = reference(*leaves, inputs[5].clone(), inputs[6].clone(), stride=stride, padding=padding,
                        training=training)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
        got = torch.autograd.grad(y, leaves, grad)
        expected = torch.autograd.grad(ref, leaves, grad)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def _raises_same(args, match, op=None, exc=RuntimeError):
    """The C++ kernel and the fake refuse alike (the same first line)."""
    op = op or OPS.dwconv_bn_relu6
    with pytest.raises(exc, match=match) as real:
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(exc, match=match) as fake_err:
            op(*fake)
    assert str(fake_err.value).splitlines()[0] == str(real.value).splitlines()[0]


def _inputs_2x4x5x5():
    return list(sample_inputs("cpu", torch.float32, None, n=2, c=4, h=5, w=5))


def _good():
    return [*_inputs_2x4x5x5(), 1, 1, 1e-5]


def test_exception_weight_shape():
    args = _good()
    args[1] = torch.randn(4, 1, 5, 5)
    _raises_same(args, r"argument 'weight' must have shape \(C, 1, 3, 3\) = \(4, 1, 3, 3\).*got \(4, 1, 5, 5\)")


def test_exception_channel_count():
    args = _good()
    args[3] = torch.randn(3)
    _raises_same(args, r"argument 'bn_weight' must have shape \(C,\) = \(4,\).*got \(3,\)")


def test_exception_bias_channel_count():
    args = _good()
    args[2] = torch.randn(5)
    _raises_same(args, r"argument 'bias' must have shape \(C,\) = \(4,\)")


def test_exception_stride():
    args = _good()
    args[7] = 3
    _raises_same(args, "argument 'stride' must be 1 or 2, got 3")


def test_exception_mixed_dtypes():
    args = _good()
    args[1] = args[1].double()
    _raises_same(args, "argument 'weight' must be a Float tensor like x, got Double")


def test_exception_float64_batchnorm_with_half_input():
    args = _good()
    args[0] = args[0].half()
    args[1] = args[1].half()
    args[2] = args[2].half()
    args[6] = args[6].double()
    _raises_same(args, "argument 'running_var' must be a Half or Float tensor like x, got Double")


def test_exception_mixed_devices():
    args = _good()
    args[4] = args[4].to("meta")
    with pytest.raises(RuntimeError, match="arguments 'x' and 'bn_bias' must be on the same device, got cpu and meta"):
        OPS.dwconv_bn_relu6(*args)


def test_exception_integer_input():
    args = _good()
    args[0] = torch.randint(0, 9, (2, 4, 5, 5))
    _raises_same(args, "argument 'x' must be a Float, Double, Half or BFloat16 tensor, got Long")


def test_exception_3d_input():
    args = _good()
    args[0] = args[0][0]
    _raises_same(args, r"argument 'x' must be a 4-D \(N, C, H, W\) tensor, got a 3-D tensor of shape \(4, 5, 5\)")


def test_exception_too_small_for_padding():
    args = _good()
    args[0] = torch.randn(2, 4, 2, 2)
    args[8] = 0
    _raises_same(args, "the padded input must be at least 3x3")


def test_exception_batch_of_one_1x1_in_training():
    args = [*sample_inputs("cpu", torch.float32, None, n=1, c=4, h=1, w=1), 1, 1, 1e-5, 0.1]
    _raises_same(args, "Expected more than 1 value per channel when training", OPS.dwconv_bn_relu6_train)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))


def test_exception_grad_out_shape():
    x, w, b, bw, bb, rm, rv = _inputs_2x4x5x5()
    args = [torch.randn(2, 4, 4, 4), x, w, b, bw, bb, rm, rv, 1, 1, False]
    _raises_same(args, r"argument 'grad_out' must have the output's shape \(2, 4, 5, 5\)",
                 OPS.dwconv_bn_relu6_backward)


def test_exception_saved_z():
    """The backward's z: empty or the output's shape, in the accumulation type."""
    x, w, b, bw, bb, rm, rv = _inputs_2x4x5x5()
    args = [torch.randn(2, 4, 5, 5), x, w, b, bw, bb, rm, rv, 1, 1, True]
    _raises_same([*args, torch.zeros(2, 4, 4, 5)], r"argument 'z' must be empty or have the output's shape "
                 r"\(2, 4, 5, 5\), got", OPS.dwconv_bn_relu6_backward)
    _raises_same([*args, torch.zeros(2, 4, 5, 5, dtype=torch.float64)], "argument 'z' must be a Float tensor "
                 r"\(the conv output in the accumulation type\), got Double", OPS.dwconv_bn_relu6_backward)
    # None or empty: the conv is computed again, and the gradients are the same.
    x = x.contiguous(memory_format=torch.channels_last)
    args[0:2] = [args[0].contiguous(memory_format=torch.channels_last), x]
    _, mean, invstd, _, _, z = OPS.dwconv_bn_relu6_train(x, w, b, bw, bb, rm, rv, 1, 1, 1e-5, 0.1)
    assert z.shape == x.shape
    assert OPS.dwconv_bn_relu6_train(x.contiguous(), w, b, bw, bb, rm, rv, 1, 1, 1e-5, 0.1)[5].shape == (0,)
    args[8:] = [1, 1, True]
    args[6:8] = [mean, invstd]
    for a, b_ in zip(OPS.dwconv_bn_relu6_backward(*args, z), OPS.dwconv_bn_relu6_backward(*args, torch.zeros(0))):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps, printed", BAD_EPS, ids=[p for _, p in BAD_EPS])
def test_exception_eps_in_the_ops(eps, printed):
    # The C++ kernels and the fakes, called directly: the same ValueError.
    match = f"argument 'eps' must be a finite number > 0, got {printed}$"
    _raises_same([*_good()[:-1], eps], "fercuda.dwconv_bn_relu6: " + match, exc=ValueError)
    args = [*_inputs_2x4x5x5(), 1, 1, eps, 0.1]
    _raises_same(args, "fercuda.dwconv_bn_relu6_train: " + match, OPS.dwconv_bn_relu6_train, exc=ValueError)


@pytest.mark.parametrize("momentum, printed", BAD_MOMENTUM, ids=[p for _, p in BAD_MOMENTUM])
def test_exception_momentum_in_the_train_op(momentum, printed):
    args = [*_inputs_2x4x5x5(), 1, 1, 1e-5, momentum]
    _raises_same(args, f"fercuda.dwconv_bn_relu6_train: argument 'momentum' must be a number in \\[0, 1\\], got {printed}$",
                 OPS.dwconv_bn_relu6_train, exc=ValueError)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps="1e-5"), "argument 'eps' must be a finite number > 0, got str"),
    (dict(eps=None), "argument 'eps' must be a finite number > 0, got NoneType"),
    (dict(eps=True), "argument 'eps' must be a finite number > 0, got bool"),
    (dict(momentum="0.1", training=True), r"argument 'momentum' must be a number in \[0, 1\], got str"),
    (dict(momentum=True, training=True), r"argument 'momentum' must be a number in \[0, 1\], got bool"),
    (dict(momentum=None, training=True), r"argument 'momentum' must be a number in \[0, 1\] when training, got None"),
], ids=["eps_str", "eps_none", "eps_bool", "momentum_str", "momentum_bool", "momentum_none_training"])
def test_exception_eps_momentum_types(kwargs, message):
    with pytest.raises(TypeError, match="^fercuda.dwconv_bn_relu6: " + message):
        fercuda.ops.dwconv_bn_relu6(*_inputs_2x4x5x5(), **kwargs)


ARG_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var")


@pytest.mark.parametrize("position", range(7), ids=ARG_NAMES)
@pytest.mark.parametrize("make", [lambda t: t.numpy(), lambda t: t.tolist()], ids=["numpy", "list"])
def test_exception_non_tensor_argument(position, make):
    args = list(_inputs_2x4x5x5())
    given = make(args[position] if args[position] is not None else torch.zeros(4))
    args[position] = given
    name = "numpy.ndarray" if isinstance(given, np.ndarray) else "list"
    expected = "a torch.Tensor or None" if ARG_NAMES[position] == "bias" else "a torch.Tensor"
    with pytest.raises(TypeError, match=f"^fercuda.dwconv_bn_relu6: argument '{ARG_NAMES[position]}' must be "
                                        f"{expected}, got {name}$"):
        fercuda.ops.dwconv_bn_relu6(*args)


# =============================================================================================
# The C++ CPU kernels' instruction-set paths (the values of every path are checked above, by
# the cpu_<path> cases of the tests of every backend)
# =============================================================================================


def test_cpu_isa_paths_are_listed_and_set():
    supported = fercuda.supported_cpu_isas()
    assert supported[0] == "baseline" and set(supported) <= set(CPU_ISAS)
    assert list(supported) == [isa for isa in CPU_ISAS if isa in supported]  # narrowest first
    assert fercuda.cpu_isa() in supported
    before = fercuda.set_cpu_isa("baseline")
    try:
        assert fercuda.cpu_isa() == "baseline"
        assert fercuda.set_cpu_isa("auto") == "baseline"
        assert fercuda.cpu_isa() == supported[-1]
    finally:
        fercuda.set_cpu_isa(before)


def test_exception_cpu_isa_names_the_argument():
    with pytest.raises(ValueError, match=r"argument 'isa' must be one of 'auto', .*got 'sse9'"):
        fercuda.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match=r"argument 'isa' must be a str, got int"):
        fercuda.set_cpu_isa(2)
    missing = [isa for isa in CPU_ISAS if isa not in fercuda.supported_cpu_isas()]
    if missing:
        with pytest.raises(RuntimeError, match=f"this CPU cannot run the '{missing[0]}' path"):
            fercuda.set_cpu_isa(missing[0])


def _python_with_env(code, **env):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_environment_variable_forces_the_path():
    run = _python_with_env("import fercuda; print(fercuda.cpu_isa())", FERCUDA_CPU_ISA="baseline")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["baseline"]
    bad = _python_with_env("import fercuda", FERCUDA_CPU_ISA="avx9")
    assert bad.returncode != 0
    assert "FERCUDA_CPU_ISA must be one of 'auto', 'baseline', 'avx2', 'avx512', 'avx512_bf16', got 'avx9'" in bad.stderr


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend, shape", isa_cases([(4, 48, 6, 6, 1), (3, 40, 13, 11, 2)]))
def test_outputs_do_not_depend_on_the_thread_count(backend, shape, channels_last, dtype, rng):
    n, c, h, w, stride = shape
    inputs = sample_inputs("cpu", dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last,
                           bn_dtype=torch.float32)
    grad_out = torch.randn(n, c, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=rng).to(dtype)
    grad_out = grad_out.contiguous(memory_format=memory_format(channels_last))
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out, mean, invstd = train(backend, inputs, stride, inputs[5].clone(), inputs[6].clone())
            infer = op(backend)(*inputs, stride, 1, 1e-5)
            runs.append((out, mean, invstd, infer) + tuple(backward(backend, grad_out, inputs, mean, invstd, stride,
                                                                     True)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# =============================================================================================
# CUDA only: the build and the device checks
# =============================================================================================


DWCONV_OPS = ("fercuda::dwconv_bn_relu6", "fercuda::dwconv_bn_relu6_train", "fercuda::dwconv_bn_relu6_backward")


def test_cuda_build_registers_dwconv_kernels():
    if not _build_info.WITH_CUDA:
        pytest.skip("fercuda._C was built without CUDA kernels (USE_CUDA=0 or no toolkit)")
    for name in DWCONV_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_exception_argument_on_another_device(backend, rng):
    args = list(sample_inputs("cuda", torch.float32, rng)) + [1, 1, 1e-5]
    args[3] = args[3].cpu()
    with pytest.raises(RuntimeError, match="'bn_weight' must be on the same device"):
        op(backend)(*args)


# =============================================================================================
# The module: fercuda.nn.DWConvBNReLU6 and convert (the C++ kernels of the input's device)
# =============================================================================================


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize(**LAYOUTS)
def test_running_stats_match_batchnorm(momentum, channels_last, rng):
    c = 7
    fused = fnn.DWConvBNReLU6(c, stride=2, bias=True, momentum=momentum).double()
    seq = copy.deepcopy(fused.to_sequential())
    for _ in range(4):
        x = torch.randn(3, c, 9, 8, generator=rng, dtype=torch.float64).contiguous(
            memory_format=memory_format(channels_last))
        y = fused(x)
        ref = seq(x)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for key, ref_value in seq.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], ref_value, rtol=1e-12, atol=1e-12, msg=key)
    assert int(fused.bn.num_batches_tracked) == 4


def test_compile_fullgraph_forward_backward(rng):
    torch._dynamo.reset()
    fused = fnn.DWConvBNReLU6(4, stride=1, bias=True)
    reference_module = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    for training in (True, False):
        fused.train(training)
        reference_module.train(training)
        x = torch.randn(2, 4, 7, 6, generator=rng)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = compiled(x1)
        y.square().sum().backward()
        y_ref = reference_module(x2)
        y_ref.square().sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x1.grad, x2.grad)
        for p, p_ref in zip(fused.parameters(), reference_module.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad)
        torch.testing.assert_close(fused.bn.running_var, reference_module.bn.running_var)


def test_module_state_dict_round_trip(rng):
    seq = nn.Sequential(nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=True), nn.BatchNorm2d(6), nn.ReLU6())
    seq.train()
    seq(torch.randn(4, 6, 8, 8, generator=rng))  # non-trivial running statistics
    fused = fnn.DWConvBNReLU6(6, stride=2, bias=True)
    assert list(fused.state_dict()) == list(seq.state_dict())
    fused.load_state_dict(seq.state_dict())
    back = nn.Sequential(nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=True), nn.BatchNorm2d(6), nn.ReLU6())
    back.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 9, 7, generator=rng)
    seq.eval(), fused.eval(), back.eval()
    torch.testing.assert_close(fused(x), seq(x))
    torch.testing.assert_close(back(x), seq(x))
    assert list(fnn.DWConvBNReLU6(6).state_dict()) == [
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_module_to_and_from_sequential(rng):
    fused = fnn.DWConvBNReLU6(5, stride=1).eval()
    seq = fused.to_sequential()
    assert isinstance(seq[0], nn.Conv2d) and isinstance(seq[1], nn.BatchNorm2d) and isinstance(seq[2], nn.ReLU6)
    again = fnn.DWConvBNReLU6.from_sequential(seq)
    x = torch.randn(2, 5, 6, 6, generator=rng)
    torch.testing.assert_close(again(x), seq(x))
    with pytest.raises(ValueError, match="module 0 must have kernel 3x3"):
        fnn.DWConvBNReLU6.from_sequential(nn.Sequential(nn.Conv2d(5, 5, 5, 1, 2, groups=5), nn.BatchNorm2d(5),
                                                         nn.ReLU6()))


def test_convert_replaces_matching_blocks(rng):
    def block(c, stride):
        return nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6())

    model = nn.Sequential(
        block(4, 1),
        nn.Conv2d(4, 8, 1),
        nn.Sequential(block(8, 2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU6()),  # not depthwise: kept
    )
    model.train()
    model(torch.randn(3, 4, 10, 10, generator=rng))
    model.eval()
    x = torch.randn(2, 4, 10, 10, generator=rng)
    expected = model(x)
    assert fnn.convert(model) == 2
    assert isinstance(model[0], fnn.DWConvBNReLU6) and isinstance(model[2][0], fnn.DWConvBNReLU6)
    assert isinstance(model[3], nn.Sequential)
    torch.testing.assert_close(model(x), expected)


def test_module_autocast_bfloat16(rng):
    fused = fnn.DWConvBNReLU6(4).eval()
    seq = copy.deepcopy(fused).to_sequential()
    x = torch.randn(2, 4, 8, 8, generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
        y_ref = seq(x)
    assert y.dtype == torch.bfloat16 and fused.bn.running_mean.dtype == torch.float32
    ref = seq.double()(x.double())
    assert_max_error(y, ref, eager=y_ref, floor=torch.finfo(torch.bfloat16).eps * 6, what="out")


# =============================================================================================
# The CUDA device code compiled for the CPU (id "emulated"): plans, splits, 64-bit indices
# =============================================================================================
# csrc/cuda/dwconv_kernels.cuh built with tests/cuda_emulation.h standing in for the CUDA
# built-ins (threads, barriers, dynamic shared memory); tests/dwconv_cuda_emulated.cpp launches
# the kernels with the plans dwconv_cuda.cu launches them with (the plan_* functions: grids,
# blocks, shared memory, scratch sizes and index width), so the one-pass kernels, the multi-block
# reductions and their merges, the backward passes and the 64-bit index path are checked on
# machines without a GPU. The op glue of dwconv_cuda.cu (argument checks, dtype dispatch,
# allocation, empty inputs) and real GPU scheduling are covered by the cuda cases above.
#
# Every emulated CUDA thread is an OS thread and every barrier a rendezvous of 256 of them, so the
# shapes are small and the reductions' block counts bounded (the SM count the plan sees is a
# parameter, as on a smaller GPU).

EMU_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
H200_SMS = 132
EMU_EPS = 1e-5
EMU_MOMENTUM = 0.3

_P, _F, _I, _L = ctypes.c_void_p, ctypes.c_double, ctypes.c_int, ctypes.c_int64
_SIZES = [_L, _L, _L, _L, _I, _I, _I]  # n, c, h, w, stride, padding, channels_last
EMU_SIGNATURES = {
    "emu_dwconv_inference": [_I] + [_P] * 8 + _SIZES + [_F, _I],
    "emu_dwconv_train": [_I] + [_P] * 10 + _SIZES + [_F, _F, _I, _L, _I],
    "emu_dwconv_backward": [_I] + [_P] * 13 + _SIZES + [_I, _I, _L, _I],
    "emu_dwconv_plans": _SIZES + [_I, _L, _I, _P],
}


@pytest.fixture(scope="module")
def emulation_library(tmp_path_factory):
    torch_include = Path(torch.__file__).parent / "include"  # c10::Half, c10::BFloat16, as the GPU build uses
    dll = build_emulation(tmp_path_factory, "dwconv_cuda_emulated.cpp", opt="-O0", includes=[torch_include])
    for name, argtypes in EMU_SIGNATURES.items():
        getattr(dll, name).argtypes = argtypes
    dll.emu_last_error.restype = ctypes.c_char_p
    return dll


@pytest.fixture(params=["emulated"])
def emu(request, emulation_library):
    """The emulation; one torch thread meanwhile: the references run on tiny tensors, where waking
    torch's thread pool costs more than the work, and it would compete with the emulated threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield emulation_library
    torch.set_num_threads(threads)


class Config(NamedTuple):
    """How the emulated op is launched: the SM count plan_reduce sizes the reductions for, the
    reductions' least split (0: the op's), and whether the 64-bit index path is forced."""

    sm_count: int = H200_SMS
    min_chunk: int = 0
    int64: bool = False


AS_THE_OP = Config()


def _poisoned(shape, dtype, channels_last=False):
    return torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=memory_format(channels_last))


def _as_f32(t):
    return None if t is None else t.float().contiguous()


def _sizes(x, stride, channels_last):
    n, c, h, w = x.shape
    return [n, c, h, w, stride, 1, int(channels_last)]


def _out_shape(x, stride):
    n, c, h, w = x.shape
    return n, c, (h - 1) // stride + 1, (w - 1) // stride + 1


def _call(emu, name, *args):
    """emu.name(*args) with each tensor passed as its data pointer, the tensors kept alive by args."""
    rc = getattr(emu, name)(*(ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args))
    assert rc == 0, f"{name}: the launch was refused: {emu.emu_last_error().decode()}"


# The op glue of dwconv_cuda.cu, on the CPU: x in its layout, the BatchNorm tensors in float32,
# outputs poisoned so that an element no thread writes shows.


def emulated_inference(emu, inputs, stride, channels_last, config=AS_THE_OP):
    x, w, b, bn_w, bn_b, rm, rv = inputs
    y = _poisoned(_out_shape(x, stride), x.dtype, channels_last)
    fmt = memory_format(channels_last)
    _call(emu, "emu_dwconv_inference", EMU_DTYPE_CODES[x.dtype], x.contiguous(memory_format=fmt), w.contiguous(),
          None if b is None else b.contiguous(), *[_as_f32(t) for t in (bn_w, bn_b, rm, rv)], y,
          *_sizes(x, stride, channels_last), EMU_EPS, int(config.int64))
    return y


def emulated_train(emu, inputs, stride, channels_last, config=AS_THE_OP):
    """(y, save_mean, save_invstd, new running_mean, new running_var), the last two in float32."""
    x, w, b, bn_w, bn_b, rm, rv = inputs
    c = x.shape[1]
    y = _poisoned(_out_shape(x, stride), x.dtype, channels_last)
    save_mean, save_invstd = _poisoned((c,), torch.float32), _poisoned((c,), torch.float32)
    new_mean, new_var = rm.float().clone(), rv.float().clone()
    _call(emu, "emu_dwconv_train", EMU_DTYPE_CODES[x.dtype], x.contiguous(memory_format=memory_format(channels_last)),
          w.contiguous(), _as_f32(b), _as_f32(bn_w), _as_f32(bn_b), new_mean, new_var, y, save_mean, save_invstd,
          *_sizes(x, stride, channels_last), EMU_EPS, EMU_MOMENTUM, config.sm_count, config.min_chunk,
          int(config.int64))
    return y, save_mean, save_invstd, new_mean, new_var


def emulated_backward(emu, grad_out, inputs, mean, invstd, stride, channels_last, training, config=AS_THE_OP):
    """(grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias); grad_bias as when bias is given."""
    x, w, b, bn_w, bn_b = inputs[:5]
    c = x.shape[1]
    grad_x = _poisoned(x.shape, x.dtype, channels_last)
    grad_w = _poisoned(w.shape, w.dtype)
    grad_b = _poisoned((c,), w.dtype)
    grad_bn_w, grad_bn_b = _poisoned((c,), torch.float32), _poisoned((c,), torch.float32)
    fmt = memory_format(channels_last)
    _call(emu, "emu_dwconv_backward", EMU_DTYPE_CODES[x.dtype], grad_out.contiguous(memory_format=fmt),
          x.contiguous(memory_format=fmt), w.contiguous(), None if b is None else b.contiguous(), _as_f32(bn_w),
          _as_f32(bn_b), _as_f32(mean), _as_f32(invstd), grad_x, grad_w, grad_b, grad_bn_w, grad_bn_b,
          *_sizes(x, stride, channels_last), int(training), config.sm_count, config.min_chunk, int(config.int64))
    return grad_x, grad_w, grad_b, grad_bn_w, grad_bn_b


class Plans(NamedTuple):
    apply_blocks: int
    apply_int64: bool
    reduce_channel_groups: int
    reduce_splits: int
    reduce_chunk: int
    reduce_int64: bool
    reduce_shared_bytes: int
    grad_x_blocks: int
    grad_x_int64: bool


def plans(emu, shape, stride, channels_last, config=AS_THE_OP):
    out = torch.zeros(len(Plans._fields), dtype=torch.int64)
    emu.emu_dwconv_plans(*shape, stride, 1, int(channels_last), config.sm_count, config.min_chunk,
                         int(config.int64), ctypes.c_void_p(out.data_ptr()))
    out = out.tolist()
    return Plans(*(bool(v) if f.endswith("int64") else v for f, v in zip(Plans._fields, out)))


class Case(NamedTuple):
    shape: tuple
    stride: int
    channels_last: bool
    config: Config = AS_THE_OP
    splits: int = 1  # of each channel group's positions in the reductions, for the config

    @property
    def id(self):
        layout = "cl" if self.channels_last else "nchw"
        extra = "" if self.config == AS_THE_OP else f"-sm{self.config.sm_count}-chunk{self.config.min_chunk}"
        return f"{shape_id(self.shape)}-s{self.stride}-{layout}{extra}"


# Odd sizes, one channel and 1x1 images; channels_last with fewer channels than a group of 32 and
# with 37 (a full group and a partial one). Splits: NCHW splits need 1024 positions a split at
# least, channels_last 32; a forced small chunk splits across rows and images.
REDUCE_CASES = [
    Case((2, 3, 5, 7), 1, False),
    Case((2, 3, 5, 7), 2, False),
    Case((2, 1, 1, 1), 1, False),
    Case((1, 2, 33, 40), 1, False, splits=2),
    Case((2, 2, 9, 13), 2, False, Config(sm_count=1, min_chunk=5), splits=4),
    Case((2, 3, 5, 7), 1, True, splits=3),
    Case((3, 37, 9, 11), 1, True, splits=10),
    Case((3, 37, 9, 11), 2, True, splits=3),
    Case((2, 5, 6, 7), 2, True, Config(min_chunk=3), splits=8),
    Case((2, 1, 1, 1), 2, True),
]
REDUCE_IDS = [case.id for case in REDUCE_CASES]
FORCED_SPLIT_CASES = [case for case in REDUCE_CASES if case.config.min_chunk]


def _emulated_inputs(rng, case, dtype=torch.float32, bn_dtype=None):
    n, c, h, w = case.shape
    return sample_inputs("cpu", dtype, rng, n=n, c=c, h=h, w=w, channels_last=case.channels_last,
                         bias=c % 2 == 1, bn_dtype=bn_dtype)


def _assert_emulated_gradients(grads, inputs, grad_out, stride, training):
    """The op's five gradients (grad_bias = sum(grad_z) whether or not the conv has a bias)."""
    expected, term_sums = float64_gradients(inputs, grad_out, stride=stride, training=training)
    grad_x_scale = float(expected[0].abs().max())
    for name, got, exp, term_sum in zip(GRAD_NAMES, grads, expected, term_sums):
        assert_grad_close_fp32(name, got, exp, term_sum, grad_x_scale)


@pytest.mark.parametrize("index", ("int32", "int64"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 37, 9, 11), (2, 1, 1, 1), (1, 2, 4, 17)], ids=shape_id)
def test_inference_index_widths(emu, rng, shape, stride, channels_last, index):
    case = Case(shape, stride, channels_last)
    inputs = _emulated_inputs(rng, case)
    out = emulated_inference(emu, inputs, stride, channels_last, Config(int64=index == "int64"))
    assert_close_fp32(out, reference(*inputs, stride=stride))


@pytest.mark.parametrize("case", REDUCE_CASES, ids=REDUCE_IDS)
def test_training_forward_reduction_splits(emu, rng, case):
    """Batch statistics, their multi-block merge, running statistics."""
    assert plans(emu, case.shape, case.stride, case.channels_last, case.config).reduce_splits == case.splits
    inputs = _emulated_inputs(rng, case)
    y, save_mean, save_invstd, new_mean, new_var = emulated_train(emu, inputs, case.stride, case.channels_last,
                                                                  case.config)
    running_mean, running_var = inputs[5].double().clone(), inputs[6].double().clone()
    expected = reference(*inputs[:5], running_mean, running_var, stride=case.stride, training=True,
                         momentum=EMU_MOMENTUM)
    assert_close_fp32(y, expected)
    z = conv64(inputs, case.stride)
    mean, invstd = batch_stats(z)
    assert_close_fp32(save_mean, mean, scale=float(z.abs().max()))
    assert_close_fp32(save_invstd, invstd)
    assert_close_fp32(new_mean, running_mean)
    assert_close_fp32(new_var, running_var)


@pytest.mark.parametrize("training", (True, False), ids=("batch_stats", "frozen_bn"))
@pytest.mark.parametrize("case", REDUCE_CASES, ids=REDUCE_IDS)
def test_backward_reduction_splits(emu, rng, case, training):
    """grad_x, grad_weight, grad_bias, grad of the BatchNorm parameters."""
    inputs = _emulated_inputs(rng, case)
    if training:
        mean, invstd = batch_stats(conv64(inputs, case.stride))
    else:
        mean, invstd = inputs[5], torch.rsqrt(inputs[6].double() + EMU_EPS)
    x = inputs[0]
    grad_out = torch.randn(_out_shape(x, case.stride), generator=rng).to(x.dtype)
    grads = emulated_backward(emu, grad_out, inputs, mean, invstd, case.stride, case.channels_last, training,
                              case.config)
    _assert_emulated_gradients(grads, inputs, grad_out, case.stride, training)


@pytest.mark.parametrize("case", FORCED_SPLIT_CASES, ids=[case.id for case in FORCED_SPLIT_CASES])
def test_int64_index_training_and_backward(emu, rng, case):
    """The 64-bit index path, forced: no test tensor reaches 2^31 elements."""
    config = case.config._replace(int64=True)
    chosen = plans(emu, case.shape, case.stride, case.channels_last, config)
    assert chosen.apply_int64 and chosen.reduce_int64 and chosen.grad_x_int64
    inputs = _emulated_inputs(rng, case)
    y, save_mean, save_invstd, _, _ = emulated_train(emu, inputs, case.stride, case.channels_last, config)
    assert_close_fp32(y, reference(*inputs[:5], inputs[5].clone(), inputs[6].clone(), stride=case.stride,
                                   training=True, momentum=EMU_MOMENTUM))
    grad_out = torch.randn(y.shape, generator=rng)
    grads = emulated_backward(emu, grad_out, inputs, save_mean, save_invstd, case.stride, case.channels_last, True,
                              config)
    _assert_emulated_gradients(grads, inputs, grad_out, case.stride, True)


def test_index_width_follows_the_tensor_size(emu):
    # Plans need no memory: a plane of 2^31 - 256 outputs is the first that takes 64-bit indices.
    limit = 2**31 - 256
    assert not plans(emu, (1, 1, 1, limit - 1), 1, False).grad_x_int64
    assert plans(emu, (1, 1, 1, limit), 1, False).grad_x_int64
    assert not plans(emu, (1, 1, 8, 8 * (limit // 8 - 1)), 1, False).apply_int64  # 8 outputs a thread
    assert plans(emu, (2, 1, 8, 8 * (limit // 8)), 1, False).apply_int64
    big = plans(emu, (64, 128, 48, 48), 1, True)
    assert not (big.apply_int64 or big.reduce_int64 or big.grad_x_int64)


def test_network_plan(emu):
    # The first block of the network on an H200: enough reduction blocks to fill it, shared
    # memory for two accumulators a thread.
    p = plans(emu, (64, 128, 48, 48), 1, False)
    assert (p.reduce_channel_groups, p.reduce_splits) == (128, 9)
    assert p.reduce_chunk * p.reduce_splits >= 64 * 48 * 48 > p.reduce_chunk * (p.reduce_splits - 1)
    assert p.reduce_shared_bytes == 2 * 256 * 4
    assert p.apply_blocks == -(-64 * 128 * 48 * 6 // 256)
    assert p.grad_x_blocks == 64 * 128 * 48 * 48 // 256


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_inference_training_backward(emu, rng, dtype, channels_last):
    """float16 and bfloat16: x, weight, bias and the outputs in the dtype, float32 inside."""
    case = Case((2, 5, 6, 7), 1, channels_last)
    inputs = _emulated_inputs(rng, case, dtype, bn_dtype=torch.float32)
    stats_dtype = [inputs[5].to(dtype), inputs[6].to(dtype)]

    out = emulated_inference(emu, inputs, 1, channels_last)
    assert out.dtype == dtype
    assert_within_twice_eager(out, reference(*inputs), reference(*inputs[:5], *stats_dtype, dtype=dtype), "inference")

    y, save_mean, save_invstd, new_mean, new_var = emulated_train(emu, inputs, 1, channels_last, case.config)
    running_mean, running_var = inputs[5].double().clone(), inputs[6].double().clone()
    expected = reference(*inputs[:5], running_mean, running_var, training=True, momentum=EMU_MOMENTUM)
    eager = reference(*inputs[:5], *[t.clone() for t in stats_dtype], training=True, momentum=EMU_MOMENTUM,
                      dtype=dtype)
    assert_within_twice_eager(y, expected, eager, "training")
    # The statistics are float32 sums of exactly widened values: float32 accuracy.
    z = conv64(inputs, 1)
    mean, invstd = batch_stats(z)
    assert_close_fp32(save_mean, mean, scale=float(z.abs().max()))
    assert_close_fp32(save_invstd, invstd)
    assert_close_fp32(new_mean, running_mean)
    assert_close_fp32(new_var, running_var)

    grad_out = torch.randn(y.shape, generator=rng).to(dtype)
    grads = emulated_backward(emu, grad_out, inputs, save_mean, save_invstd, 1, channels_last, True, case.config)
    expected, _ = float64_gradients(inputs, grad_out, training=True)
    eager_grads = eager_gradients(inputs, grad_out, dtype, training=True)
    for name, got, exp, eager_grad in zip(GRAD_NAMES, grads, expected, eager_grads):
        if name != "bias":  # ~0 in training: both sides are rounding noise
            assert_within_twice_eager(got, exp, eager_grad, name)
