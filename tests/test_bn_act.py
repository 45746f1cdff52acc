"""BatchNorm + ReLU6 (or identity) + residual add (fercuda.ops.batch_norm_act, the
torch.ops.fercuda.batch_norm_act{,_train,_backward}{,_triton} ops) against eager PyTorch in float64
(tests/bn_act_cases.py: inputs, reference, tolerances).

Most tests run one assertion body for every backend, the parameter `backend` in the node id:
  cpu     the C++ CPU kernels (batches of at most 2 at the network's shapes);
  cuda    the CUDA C++ kernels, where a GPU is (marked needs_cuda: skipped elsewhere);
  triton  the Triton kernels: on CUDA tensors where a GPU is, else on CPU tensors through Triton's
          interpreter, at the small shapes only;
  cpu_<path>  the C++ CPU kernels on one instruction-set path (baseline, avx2, avx512,
          avx512_bf16; fercuda.set_cpu_isa), every path this CPU can run, the others skipped with
          the reason: the value, statistics and gradient tests at the kernels' vector edges
          (bn_act_cases.ISA_SHAPES) and a few of the network's shapes.
Then the tests that make sense for one backend: float64 and the argument checks against the fakes
(C++ CPU kernels), and the CUDA device code compiled for the CPU (id `emulated`).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fercuda  # noqa: F401  (loads the C++ ops)
import fercuda.ops
from bn_act_cases import (
    ISA_SHAPES,
    assert_grads_close_fp32,
    eager_gradients,
    float64_gradients,
    isa_backends,
    isa_cases,
    kernel_backend,
    off_the_kinks,
    reference,
    sample_inputs,
)
from dwconv_cases import assert_close_fp32, assert_within_twice_eager, poisoned_allocations

OPS = torch.ops.fercuda
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
LAYOUTS = dict(argnames="channels_last", argvalues=(False, True), ids=("nchw", "channels_last"))
GRAD_NAMES = ("x", "weight", "bias")
NEEDS_CUDA = pytest.mark.needs_cuda
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = ("cpu", pytest.param("cuda", marks=NEEDS_CUDA), "triton")

# (N, C, H, W): outputs of FERNet's stem and pointwise convs (batch 2 on the CPU), then odd sizes:
# channels that fill no vector, one channel, 1x1 images, planes of no tile's size.
NETWORK_SHAPES = [(64, 64, 48, 48), (64, 768, 12, 12), (64, 364, 6, 6)]
ODD_SHAPES = [(3, 37, 9, 11), (2, 1, 6, 5), (4, 3, 1, 1), (2, 19, 12, 13)]
# What the Triton interpreter affords.
SMALL_SHAPES = [(2, 3, 5, 7), (3, 5, 1, 4)]

ACTS = dict(argnames="relu6", argvalues=(True, False), ids=("relu6", "identity"))
# (relu6, residual) as FERNet uses them: the stem and the expansions; the projections with their
# shortcut; the shortcuts' BatchNorm. ReLU6 then an add is in test_noncontiguous_and_mixed_layouts.
KINDS = dict(argnames="relu6, residual", argvalues=((True, False), (False, True), (False, False)),
             ids=("relu6", "identity-add", "identity"))
# Every code path in two: ReLU6 then an add, and BatchNorm alone.
KINDS_TWO = dict(argnames="relu6, residual", argvalues=((True, True), (False, False)),
                 ids=("relu6-add", "identity"))


def shape_id(shape):
    return "x".join(map(str, shape))


def cases(shapes, interpreted=(), backends=("cpu", "cuda", "triton")):
    params = []
    for backend in backends:
        for shape in shapes:
            gpu_only = backend == "cuda" or (backend == "triton" and shape not in interpreted)
            params.append(pytest.param(backend, shape, id=f"{backend}-{shape_id(shape)}",
                                       marks=NEEDS_CUDA if gpu_only else ()))
    return params


def device_of(backend):
    return {"cpu": "cpu", "cuda": "cuda", "triton": TRITON_DEVICE}[kernel_backend(backend)]


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
    return n if device_of(backend) == "cuda" else min(n, 2)


def op(backend, kind=""):
    """The registered op of a backend; kind "", "_train" or "_backward"; cpu_<path>: the CPU op."""
    if backend == "triton":
        import fercuda.triton.bn_act  # noqa: F401  (registers the Triton ops)
    return getattr(OPS, f"batch_norm_act{kind}" + ("_triton" if backend == "triton" else ""))


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def leaves_of(inputs):
    return [None if t is None else t.detach().clone().requires_grad_() for t in inputs[:3]]


def _bn_dtype(dtype):
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _assert_out(out, expected, eager, dtype, what="out"):
    if dtype == torch.float32:
        assert_close_fp32(out, expected)
    else:
        assert_within_twice_eager(out, expected, eager, what)


# =============================================================================================
# Every backend: inference and training forward
# =============================================================================================


@pytest.mark.parametrize(**KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend, shape", cases(NETWORK_SHAPES + ODD_SHAPES[:3] + SMALL_SHAPES, SMALL_SHAPES)
                         + isa_cases(ISA_SHAPES))
def test_inference(backend, shape, channels_last, dtype, relu6, residual, rng):
    n, c, h, w = shape
    inputs = sample_inputs(device_of(backend), dtype, rng, n=batch(backend, n), c=c, h=h, w=w,
                           channels_last=channels_last, residual=residual, bn_dtype=_bn_dtype(dtype))
    with poisoned_allocations():
        out = fercuda.ops.batch_norm_act(*inputs, relu6=relu6, backend=kernel_backend(backend))
    expected = reference(*inputs, relu6=relu6)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=memory_format(channels_last))
    eager = reference(*inputs, relu6=relu6, dtype=dtype, bn_dtype=_bn_dtype(dtype))
    _assert_out(out, expected, eager, dtype)


@pytest.mark.parametrize(**KINDS_TWO)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend, shape", cases(NETWORK_SHAPES[1:] + ODD_SHAPES + SMALL_SHAPES, SMALL_SHAPES)
                         + isa_cases(ISA_SHAPES))
def test_training_forward(backend, shape, channels_last, dtype, relu6, residual, rng):
    """One step of the functional training op: the output, the float32 batch statistics and the
    new running statistics; the inputs left as they were."""
    n, c, h, w = shape
    bn_dtype = _bn_dtype(dtype)
    inputs = sample_inputs(device_of(backend), dtype, rng, n=batch(backend, n), c=c, h=h, w=w,
                           channels_last=channels_last, residual=residual, bn_dtype=bn_dtype)
    x, weight, bias, rm, rv, res = inputs
    before = [t.clone() for t in (rm, rv)]
    with poisoned_allocations():
        y, save_mean, save_invstd, new_mean, new_var = op(backend, "_train")(x, weight, bias, rm, rv, res, relu6,
                                                                             1e-5, 0.3)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # the op is functional
    assert y.is_contiguous(memory_format=memory_format(channels_last))
    ref_mean, ref_var = rm.double().clone(), rv.double().clone()
    expected = reference(x, weight, bias, ref_mean, ref_var, res, relu6=relu6, training=True, momentum=0.3)
    eager = reference(x, weight, bias, rm.clone(), rv.clone(), res, relu6=relu6, training=True, momentum=0.3,
                      dtype=dtype, bn_dtype=bn_dtype)
    _assert_out(y, expected, eager, dtype)
    x64 = x.double()
    mean = x64.mean((0, 2, 3))
    invstd = torch.rsqrt(x64.var((0, 2, 3), unbiased=False) + 1e-5)
    assert save_mean.dtype == save_invstd.dtype == torch.float32
    assert_close_fp32(save_mean, mean, scale=float(x64.abs().max()))
    assert_close_fp32(save_invstd, invstd)
    assert new_mean.dtype == rm.dtype and new_var.dtype == rv.dtype
    assert_close_fp32(new_mean, ref_mean)
    assert_close_fp32(new_var, ref_var)


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS + tuple(isa_backends()))
def test_running_stats_match_batchnorm_after_two_steps(backend, channels_last, rng):
    """The entry point updates the buffers in place as nn.BatchNorm2d (float64) does, step after step."""
    device = device_of(backend)
    inputs = sample_inputs(device, torch.float32, rng, n=3, c=6, h=4, w=5, channels_last=channels_last)
    bn = nn.BatchNorm2d(6, momentum=0.1).double().to(device).train()
    with torch.no_grad():
        for p, t in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), inputs[1:5]):
            p.copy_(t)
    rm, rv = inputs[3].clone(), inputs[4].clone()
    for _ in range(2):
        x = sample_inputs(device, torch.float32, rng, n=3, c=6, h=4, w=5, channels_last=channels_last)[0]
        out = fercuda.ops.batch_norm_act(x, inputs[1], inputs[2], rm, rv, inputs[5], training=True, backend=kernel_backend(backend))
        with torch.no_grad():
            expected = F.hardtanh(bn(x.double()), 0.0, 6.0) + inputs[5].double()
        assert_close_fp32(out, expected)
    assert_close_fp32(rm, bn.running_mean)
    assert_close_fp32(rv, bn.running_var)


@pytest.mark.parametrize("backend", BACKENDS + tuple(isa_backends()))
def test_noncontiguous_and_mixed_layouts(backend, rng):
    """x in neither layout (copied to NCHW); a residual in another layout than x."""
    inputs = list(sample_inputs(device_of(backend), torch.float32, rng, n=2, c=4, h=10, w=14))
    inputs[0] = inputs[0][:, :, ::2, 1::2]
    inputs[5] = inputs[5][:, :, ::2, 1::2].contiguous(memory_format=torch.channels_last)
    out = fercuda.ops.batch_norm_act(*inputs, backend=kernel_backend(backend))
    assert_close_fp32(out, reference(*inputs))
    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    inputs[5] = inputs[5].contiguous()
    out = fercuda.ops.batch_norm_act(*inputs, training=True, backend=kernel_backend(backend))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_fp32(out, reference(*inputs, training=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs = sample_inputs(device_of(backend), torch.float32, torch.Generator().manual_seed(1), n=0, c=4, h=5, w=5)
    x, w, b = leaves_of(inputs)
    rm, rv = inputs[3].clone(), inputs[4].clone()
    assert fercuda.ops.batch_norm_act(x, w, b, rm, rv, inputs[5], backend=kernel_backend(backend)).shape == (0, 4, 5, 5)
    y = fercuda.ops.batch_norm_act(x, w, b, rm, rv, inputs[5], training=True, backend=kernel_backend(backend))
    assert y.shape == (0, 4, 5, 5)
    assert torch.equal(rm, inputs[3]) and torch.equal(rv, inputs[4])
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_single_value_per_channel_in_training(backend):
    inputs = sample_inputs(device_of(backend), torch.float32, torch.Generator().manual_seed(2), n=1, c=4, h=1, w=1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        fercuda.ops.batch_norm_act(*inputs, training=True, backend=kernel_backend(backend))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm2d(4).train()(inputs[0].double())
    assert str(ours.value).startswith("fercuda.batch_norm_act_train")
    fercuda.ops.batch_norm_act(*inputs, training=False, backend=kernel_backend(backend))  # running statistics: fine


@pytest.mark.parametrize("backend", BACKENDS + tuple(isa_backends()))
def test_backends_agree_with_the_cpp_training_op(backend, rng):
    """One contract: the backend's training op returns the C++ CPU op's five outputs (dtypes,
    layouts, values up to their summation orders) and its backward the same three gradients."""
    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, True)):
        inputs = sample_inputs("cpu", dtype, rng, channels_last=channels_last, bn_dtype=torch.float32)
        cpp = OPS.batch_norm_act_train(*inputs, True, 1e-5, 0.1)
        got = [t.cpu() for t in op(backend, "_train")(*[t.to(device_of(backend)) for t in inputs], True, 1e-5, 0.1)]
        grad_out = torch.randn(inputs[0].shape, generator=rng).to(dtype)
        cpp_grads = OPS.batch_norm_act_backward(grad_out, *inputs[:3], cpp[1], cpp[2], True, True)
        got_grads = op(backend, "_backward")(*[t.to(device_of(backend)) for t in (grad_out, *inputs[:3], cpp[1], cpp[2])],
                                             True, True)
        for a, b in zip(cpp + cpp_grads, got + [t.cpu() for t in got_grads]):
            assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
            tol = 1e-5 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps
            torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol * max(1.0, float(a.abs().max())))


# =============================================================================================
# Every backend: gradients
# =============================================================================================


@pytest.mark.parametrize(**ACTS)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("training", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("backend, shape", cases(NETWORK_SHAPES[1:] + ODD_SHAPES[::2] + SMALL_SHAPES, SMALL_SHAPES)
                         + isa_cases(ISA_SHAPES))
def test_gradients_match_float64_autograd(backend, shape, training, channels_last, relu6, rng):
    """float32: the backward op's (grad_x, grad_weight, grad_bias) against float64 autograd."""
    n, c, h, w = shape
    device = device_of(backend)
    inputs = sample_inputs(device, torch.float32, rng, n=batch(backend, n), c=c, h=h, w=w,
                           channels_last=channels_last, residual=False)
    x, weight, bias, rm, rv, _ = inputs
    if training:
        _, mean, invstd, _, _ = op(backend, "_train")(x, weight, bias, rm, rv, None, relu6, 1e-5, 0.1)
    else:
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
    grad_out = torch.randn(x.shape, generator=rng).to(device).contiguous(memory_format=memory_format(channels_last))
    grad_out = off_the_kinks(grad_out, inputs, training=training) if relu6 else grad_out
    with poisoned_allocations():
        grads = op(backend, "_backward")(grad_out, x, weight, bias, mean, invstd, relu6, training)
    assert grads[0].is_contiguous(memory_format=memory_format(channels_last))
    expected, terms = float64_gradients(inputs, grad_out, relu6=relu6, training=training)
    assert_grads_close_fp32(GRAD_NAMES, [g.cpu() for g in grads], [e.cpu() for e in expected],
                            [t.cpu() for t in terms])


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend, shape", cases([(64, 256, 12, 12), (2, 3, 5, 7)], [(2, 3, 5, 7)])
                         + isa_cases(ISA_SHAPES[1:3]))
def test_low_precision_gradients_through_autograd(backend, shape, dtype, channels_last, rng):
    """float16 / bfloat16 x and residual, float32 BatchNorm tensors (autocast's mix): gradients
    of every input within twice the error of eager PyTorch in that precision."""
    n, c, h, w = shape
    inputs = sample_inputs(device_of(backend), dtype, rng, n=batch(backend, n), c=c, h=h, w=w,
                           channels_last=channels_last, bn_dtype=torch.float32)
    x, weight, bias, rm, rv, res = inputs
    leaves = leaves_of(inputs)
    res_leaf = res.detach().clone().requires_grad_()
    out = fercuda.ops.batch_norm_act(*leaves, rm.clone(), rv.clone(), res_leaf, training=True, backend=kernel_backend(backend))
    grad_out = off_the_kinks(torch.randn(x.shape, generator=rng).to(x.device, dtype), inputs, training=True)
    out.backward(grad_out)
    assert torch.equal(res_leaf.grad, grad_out)
    expected, terms = float64_gradients(inputs, grad_out, training=True)
    eager = eager_gradients(inputs, grad_out, dtype, training=True, bn_dtype=torch.float32)
    assert all(leaf.grad.dtype == leaf.dtype for leaf in leaves)
    # grad_x in x's precision; the float32 weight and bias gradients (float32 sums) to float32's.
    assert_within_twice_eager(leaves[0].grad, expected[0], eager[0], "x")
    assert_grads_close_fp32(GRAD_NAMES[1:], [leaf.grad.cpu() for leaf in leaves[1:]], [e.cpu() for e in expected[1:]],
                            [t.cpu() for t in terms[1:]])


@pytest.mark.parametrize("backend", BACKENDS + tuple(isa_backends()))
def test_reductions_are_deterministic_and_independent_of_threads(backend, rng):
    n = 4 if device_of(backend) == "cuda" or backend.startswith("cpu") else 2
    shape = (n, 64, 12, 12) if backend != "triton" or TRITON_DEVICE == "cuda" else (2, 3, 5, 7)
    threads = torch.get_num_threads()
    for channels_last in (False, True):
        inputs = sample_inputs(device_of(backend), torch.float32, rng, n=shape[0], c=shape[1], h=shape[2],
                               w=shape[3], channels_last=channels_last)
        x, weight, bias, rm, rv, res = inputs
        runs = []
        for num_threads in (1, threads, 3):
            torch.set_num_threads(num_threads)
            try:
                out, mean, invstd, new_mean, new_var = op(backend, "_train")(x, weight, bias, rm, rv, res, True, 1e-5,
                                                                             0.1)
                grads = op(backend, "_backward")(torch.ones_like(out), x, weight, bias, mean, invstd, True, True)
            finally:
                torch.set_num_threads(threads)
            runs.append((out, mean, invstd, new_mean, new_var) + tuple(grads))
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend, shape", isa_cases([ISA_SHAPES[1], ISA_SHAPES[3]]))
def test_cpu_paths_do_not_depend_on_the_thread_count(backend, shape, dtype, rng):
    """Every instruction-set path, both layouts, reductions of one and of several parts: the five
    outputs of training and the three gradients, bit for bit at 1, 2 and 3 threads."""
    n, c, h, w = shape
    threads = torch.get_num_threads()
    for channels_last in (False, True):
        inputs = sample_inputs("cpu", dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last,
                               bn_dtype=torch.float32)
        grad_out = torch.randn(inputs[0].shape, generator=rng).to(dtype).contiguous(
            memory_format=memory_format(channels_last))
        runs = []
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                out = OPS.batch_norm_act_train(*inputs, True, 1e-5, 0.1)
                runs.append(out + OPS.batch_norm_act_backward(grad_out, *inputs[:3], out[1], out[2], True, True))
        finally:
            torch.set_num_threads(threads)
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                assert torch.equal(a, b)


def _c10_bfloat16_bits(a):
    """c10::BFloat16(float)'s bits of float32 values: round to nearest even, any NaN to 0x7FC0."""
    u = a.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(a.isnan(), torch.full_like(rounded, 0x7FC0), rounded)


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend", isa_backends())
def test_cpu_paths_round_bfloat16_as_c10(backend, channels_last):
    """Every bfloat16 bit pattern (NaNs of any sign and payload, infinities, denormals) times a
    weight per channel, BatchNorm otherwise the identity (invstd exactly 1): the output's bits are
    c10's rounding of the float32 product, which the vector narrowing (vcvtneps2bf16 on the
    avx512_bf16 path) must match, NaN and float32 denormal results included."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(1, 1, 256, 256)
    weight = torch.tensor([1.0, 0.3, 3e-5, 1.7e-3, -2.5], dtype=torch.float32)
    x = x.expand(1, len(weight), 256, 256).contiguous(memory_format=memory_format(channels_last))
    eps = 2.0 ** -17  # running_var + eps == 1 exactly: invstd 1, scale = weight, shift 0
    zeros = torch.zeros(len(weight))
    out = OPS.batch_norm_act(x, weight, zeros, zeros, torch.full_like(zeros, 1 - eps), None, False, eps)
    # float32 products as the kernel's fma(x, weight, +0) rounds them (+0 turns -0 into +0)
    product = x.float() * weight[None, :, None, None] + 0.0
    got = out.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    expected = _c10_bfloat16_bits(product.contiguous())
    bad = got != expected
    assert not bad.any(), (f"{int(bad.sum())} values differ, e.g. float32 {product.contiguous()[bad][0].item()!r}: "
                           f"{int(got[bad][0]):#06x} vs c10 {int(expected[bad][0]):#06x}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("backend", isa_backends())
def test_cpu_paths_at_every_channel_count_to_17(backend, channels_last, dtype, rng):
    """C = 1 .. 17 (up to a 16-lane vector and one past it) at N=1 over an odd 3x5 image and at N=2
    over 4x5: inference, training and its gradients of every instruction-set path against float64
    (low precision: within twice eager's error)."""
    for c in range(1, 18):
        for n, h, w in ((1, 3, 5), (2, 4, 5)):
            inputs = sample_inputs("cpu", dtype, rng, n=n, c=c, h=h, w=w, channels_last=channels_last,
                                   bn_dtype=torch.float32)
            x, weight, bias, rm, rv, res = inputs
            eager_args = (x, weight, bias, rm.clone(), rv.clone(), res)
            for relu6 in (True, False):
                out = OPS.batch_norm_act(*inputs, relu6, 1e-5)
                expected = reference(*inputs, relu6=relu6)
                _assert_out(out, expected, reference(*eager_args, relu6=relu6, dtype=dtype, bn_dtype=torch.float32),
                            dtype, f"C={c} N={n} inference")
            y, mean, invstd, _, _ = OPS.batch_norm_act_train(*inputs, True, 1e-5, 0.1)
            expected = reference(x, weight, bias, rm.double().clone(), rv.double().clone(), res, training=True)
            eager = reference(*eager_args, training=True, dtype=dtype, bn_dtype=torch.float32)
            _assert_out(y, expected, eager, dtype, f"C={c} N={n} training")
            grad_out = torch.randn(x.shape, generator=rng).to(dtype).contiguous(memory_format=memory_format(channels_last))
            grad_out = off_the_kinks(grad_out, inputs, training=True)
            grads = OPS.batch_norm_act_backward(grad_out, x, weight, bias, mean, invstd, True, True)
            exp, terms = float64_gradients(inputs, grad_out, training=True)
            if dtype == torch.float32:
                assert_grads_close_fp32(GRAD_NAMES, grads, exp, terms)
            else:
                eager_grads = eager_gradients(inputs, grad_out, dtype, training=True, bn_dtype=torch.float32)
                assert_within_twice_eager(grads[0], exp[0], eager_grads[0], f"C={c} N={n} grad x")
                assert_grads_close_fp32(GRAD_NAMES[1:], grads[1:], exp[1:], terms[1:])


# =============================================================================================
# Every backend: torch.library and torch.compile
# =============================================================================================


@pytest.mark.parametrize("backend, shape", cases([(4, 40, 6, 6), (2, 3, 6, 7)], [(2, 3, 6, 7)]))
def test_opcheck(backend, shape, rng):
    """Schema, fake kernel, autograd registration and AOT dispatch of the three ops."""
    n, c, h, w = shape
    device = device_of(backend)
    for channels_last in (False, True):
        inputs = sample_inputs(device, torch.float32, rng, n=n, c=c, h=h, w=w, channels_last=channels_last)
        x, weight, bias, rm, rv, res = inputs
        leaves = leaves_of(inputs)
        res_leaf = res.clone().requires_grad_()
        for relu6, residual in ((True, res_leaf), (False, None)):
            torch.library.opcheck(op(backend).default, (*leaves, rm, rv, residual, relu6, 1e-5))
            torch.library.opcheck(op(backend, "_train").default, (*leaves, rm, rv, residual, relu6, 1e-5, 0.1))
        out, mean, invstd, _, _ = op(backend, "_train")(*inputs, True, 1e-5, 0.1)
        grad = torch.randn(out.shape, generator=rng).to(device)
        for training, stats in ((False, (rm, torch.rsqrt(rv + 1e-5))), (True, (mean, invstd))):
            torch.library.opcheck(op(backend, "_backward").default, (grad, x, weight, bias, *stats, True, training))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_training_step(backend, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng, channels_last=True)
    leaves = leaves_of(inputs)
    rm, rv = inputs[3].clone(), inputs[4].clone()
    res = inputs[5].clone().requires_grad_()

    def step(x, w, b, r):
        y = fercuda.ops.batch_norm_act(x, w, b, rm, rv, r, training=True, backend=kernel_backend(backend))
        return fercuda.ops.batch_norm_act(y, w, b, rm, rv, relu6=False, training=True, backend=kernel_backend(backend)).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*leaves, res).backward()
    expected = leaves_of(inputs)
    eager_res = inputs[5].clone().requires_grad_()
    eager_rm, eager_rv = inputs[3].clone(), inputs[4].clone()
    y = fercuda.ops.batch_norm_act(*expected, eager_rm, eager_rv, eager_res, training=True, backend=kernel_backend(backend))
    fercuda.ops.batch_norm_act(y, *expected[1:], eager_rm, eager_rv, relu6=False, training=True,
                               backend=kernel_backend(backend)).square().sum().backward()
    for leaf, exp in zip(leaves + [res], expected + [eager_res]):
        torch.testing.assert_close(leaf.grad, exp.grad)
    torch.testing.assert_close(rm, eager_rm)
    torch.testing.assert_close(rv, eager_rv)


# =============================================================================================
# Every backend: bad input, refused with the argument named
# =============================================================================================


def _set(index, value):
    return lambda a: a.__setitem__(index, value(a) if callable(value) else value)


# (id, change of the inference op's positional arguments, message)
ARGUMENT_ERRORS = [
    ("x_dim", _set(0, lambda a: a[0][0]), r"'x' must be a 4-D \(N, C, H, W\) tensor, got a 3-D tensor of shape"),
    ("x_integer", _set(0, lambda a: a[0].long()), "'x' must be a Float, (Double, )?Half or BFloat16 tensor, got Long"),
    ("weight_channels", _set(1, lambda a: a[1][:2]), r"'weight' must have shape \(C,\) = \(3,\) for x of shape "
                                                     r"\(2, 3, 5, 7\), got \(2,\)"),
    ("bias_channels", _set(2, lambda a: torch.cat([a[2], a[2]])), r"'bias' must have shape \(C,\) = \(3,\)"),
    ("mean_2d", _set(3, lambda a: a[3][None]), r"'running_mean' must have shape \(C,\) = \(3,\).*got \(1, \d\)"),
    ("weight_dtype", _set(1, lambda a: a[1].half()), "'weight' must be a Float tensor like x, got Half"),
    ("var_integer", _set(4, lambda a: a[4].int()), "'running_var' must be a Float tensor like x, got Int"),
    ("residual_shape", _set(5, lambda a: a[5][:, :, :4]), r"'residual' must have the shape of x \(2, 3, 5, 7\), "
                                                         r"got \(2, 3, 4, 7\)"),
    ("residual_dtype", _set(5, lambda a: a[5].half()), "'residual' must be a Float tensor like x, got Half"),
]


@pytest.mark.parametrize("change, match", [pytest.param(c, m, id=i) for i, c, m in ARGUMENT_ERRORS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_names_argument(backend, change, match, rng):
    args = list(sample_inputs(device_of(backend), torch.float32, rng))
    change(args)
    for kind, extra in (("", (True, 1e-5)), ("_train", (True, 1e-5, 0.1))):
        with pytest.raises(RuntimeError, match=f"fercuda.batch_norm_act{kind}(_triton)?: argument {match}"):
            op(backend, kind)(*args, *extra)


BAD_EPS = [(math.nan, "nan"), (-1e-5, "-1e-05"), (0.0, "0"), (math.inf, "inf")]
BAD_MOMENTUM = [(math.nan, "nan"), (-0.1, "-0.1"), (1.5, "1.5")]


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("eps, printed", BAD_EPS, ids=[p for _, p in BAD_EPS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_eps(backend, eps, printed, training, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng)
    stats = [t.clone() for t in inputs[3:5]]
    with pytest.raises(ValueError, match=f"^fercuda.batch_norm_act: argument 'eps' must be a finite number > 0, "
                                         f"got {printed}$"):
        fercuda.ops.batch_norm_act(*inputs, eps=eps, training=training, backend=kernel_backend(backend))
    assert all(torch.equal(a, b) for a, b in zip(inputs[3:5], stats))


@pytest.mark.parametrize("momentum, printed", BAD_MOMENTUM, ids=[p for _, p in BAD_MOMENTUM])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_momentum(backend, momentum, printed, rng):
    inputs = sample_inputs(device_of(backend), torch.float32, rng)
    with pytest.raises(ValueError, match=r"^fercuda.batch_norm_act: argument 'momentum' must be a number in "
                                         rf"\[0, 1\], got {printed}$"):
        fercuda.ops.batch_norm_act(*inputs, momentum=momentum, training=True, backend=kernel_backend(backend))


@pytest.mark.parametrize("arg", ["x", "weight", "residual"])
def test_exception_numpy_arrays(arg, rng):
    inputs = dict(zip(("x", "weight", "bias", "running_mean", "running_var", "residual"),
                      sample_inputs("cpu", torch.float32, rng)))
    inputs[arg] = inputs[arg].numpy()
    with pytest.raises(TypeError, match=f"^fercuda.batch_norm_act: argument '{arg}' must be a torch.Tensor, "
                                        "got numpy.ndarray$"):
        fercuda.ops.batch_norm_act(**inputs)


# =============================================================================================
# The C++ CPU kernels only: float64, and the argument checks of the kernels against the fakes
# =============================================================================================


@pytest.mark.parametrize(**KINDS_TWO)
@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize(**LAYOUTS)
def test_gradcheck(training, channels_last, relu6, residual, rng):
    inputs = sample_inputs("cpu", torch.float64, rng, n=2, c=3, h=3, w=2, channels_last=channels_last,
                           residual=residual)
    rm, rv = inputs[3], inputs[4]
    leaves = leaves_of(inputs) + ([inputs[5].clone().requires_grad_()] if residual else [])

    def fn(x, w, b, *res):
        return fercuda.ops.batch_norm_act(x, w, b, rm.clone(), rv.clone(), *res, relu6=relu6, training=training)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-5)


def _raises_same(op, args, match, exc=RuntimeError):
    """The C++ kernel and the fake refuse alike (the same first line)."""
    with pytest.raises(exc, match=match) as real:
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(exc, match=match) as fake_err:
            op(*fake)
    assert str(fake_err.value).splitlines()[0] == str(real.value).splitlines()[0]


def _good():
    return list(sample_inputs("cpu", torch.float32, torch.Generator().manual_seed(5), n=2, c=4, h=5, w=5))


@pytest.mark.parametrize("change, match", [pytest.param(c, m, id=i) for i, c, m in ARGUMENT_ERRORS
                                           if i not in ("weight_channels", "residual_shape")])
def test_exception_fakes_match_the_kernels(change, match):
    args = _good()
    change(args)
    _raises_same(OPS.batch_norm_act, [*args, True, 1e-5], match.replace(r"\(3,\)", r"\(4,\)"))
    _raises_same(OPS.batch_norm_act_train, [*args, True, 1e-5, 0.1], match.replace(r"\(3,\)", r"\(4,\)"))


def test_exception_float64_statistics_with_half_input():
    args = _good()
    args[0], args[5] = args[0].half(), args[5].half()
    args[4] = args[4].double()
    _raises_same(OPS.batch_norm_act, [*args, True, 1e-5], "argument 'running_var' must be a Half or Float tensor "
                                                          "like x, got Double")


def test_exception_eps_momentum_in_the_ops():
    _raises_same(OPS.batch_norm_act, [*_good(), True, -1.0], "argument 'eps' must be a finite number > 0, got -1$",
                 ValueError)
    _raises_same(OPS.batch_norm_act_train, [*_good(), True, 1e-5, 2.0],
                 r"argument 'momentum' must be a number in \[0, 1\], got 2$", ValueError)


def test_exception_single_value_per_channel_in_the_train_op():
    args = list(sample_inputs("cpu", torch.float32, None, n=1, c=4, h=1, w=1))
    _raises_same(OPS.batch_norm_act_train, [*args, True, 1e-5, 0.1],
                 r"fercuda.batch_norm_act_train: Expected more than 1 value per channel when training, got input "
                 r"size \[1, 4, 1, 1\]", ValueError)


def test_exception_grad_out():
    x, w, b, rm, rv, _ = _good()
    _raises_same(OPS.batch_norm_act_backward, [torch.randn(2, 4, 5, 4), x, w, b, rm, rv, True, True],
                 r"argument 'grad_out' must have the shape of x \(2, 4, 5, 5\), got \(2, 4, 5, 4\)")
    _raises_same(OPS.batch_norm_act_backward, [torch.randn(2, 4, 5, 5).double(), x, w, b, rm, rv, True, True],
                 "argument 'grad_out' must be a Float tensor like x, got Double")


def test_exception_mixed_devices():
    args = _good()
    args[5] = args[5].to("meta")
    with pytest.raises(RuntimeError, match="arguments 'x' and 'residual' must be on the same device, got cpu and meta"):
        OPS.batch_norm_act(*args)


def test_cuda_build_registers_kernels():
    from fercuda import _build_info

    if not _build_info.WITH_CUDA:
        pytest.skip("fercuda._C was built without CUDA kernels (USE_CUDA=0 or no toolkit)")
    for name in ("batch_norm_act", "batch_norm_act_train", "batch_norm_act_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fercuda::{name}", "CUDA"), f"{name}: no CUDA kernel"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_exception_residual_on_another_device(backend, rng):
    inputs = list(sample_inputs("cuda", torch.float32, rng))
    inputs[5] = inputs[5].cpu()
    with pytest.raises(RuntimeError, match="arguments 'x' and 'residual' must be on the same device"):
        op(backend)(*inputs, True, 1e-5)


# =============================================================================================
# The module, fercuda.nn.ConvBNAct, and FERNet built on it
# =============================================================================================


@pytest.mark.parametrize(**KINDS_TWO)
@pytest.mark.parametrize(**LAYOUTS)
def test_module_matches_sequential_in_train_and_eval(channels_last, relu6, residual, rng):
    import copy

    import fercuda.nn as fnn

    fmt = memory_format(channels_last)
    module = fnn.ConvBNAct(5, 6, kernel_size=3, stride=2, relu6=relu6).to(memory_format=fmt)
    with torch.no_grad():
        module.bn.weight.uniform_(0.5, 2.0, generator=rng)
        module.bn.bias.normal_(2.0, 2.0, generator=rng)
    seq = copy.deepcopy(module).to_sequential()
    assert list(module.state_dict()) == list(seq.state_dict())
    x = torch.randn(3, 5, 9, 8, generator=rng).contiguous(memory_format=fmt)
    res = torch.randn(3, 6, 5, 4, generator=rng) if residual else None
    for training in (True, True, False):
        module.train(training), seq.train(training)
        x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = module(x_a, res)
        expected = seq(x_b) + (0 if res is None else res)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn(got.shape, generator=rng)
        got.backward(grad), expected.backward(grad)
        torch.testing.assert_close(x_a.grad, x_b.grad, rtol=1e-4, atol=1e-5)
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.grad, dict(seq.named_parameters())[name].grad, rtol=1e-4, atol=1e-4)
            p.grad = None
        seq.zero_grad()
        for name, buf in module.named_buffers():
            torch.testing.assert_close(buf, dict(seq.named_buffers())[name], rtol=1e-5, atol=1e-6)


def test_module_eval_fold_follows_parameter_changes(rng):
    """eval() reuses the folded weights between calls without gradients, and folds again after a
    buffer changes in place or a state_dict is loaded."""
    import fercuda.nn as fnn

    module = fnn.ConvBNAct(4, 4, relu6=False).eval()
    x = torch.randn(2, 4, 5, 5, generator=rng)
    with torch.no_grad():
        outputs = [module(x)]
        module.bn.running_var.mul_(4.0)
        outputs.append(module(x))
        torch.testing.assert_close(outputs[-1], module.to_sequential().eval()(x), rtol=1e-5, atol=1e-5)
        module.load_state_dict({k: v * 2 if v.is_floating_point() else v for k, v in module.state_dict().items()})
        outputs.append(module(x))
        torch.testing.assert_close(outputs[-1], module.to_sequential().eval()(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_fernet_fused_runs_batch_norm_act_in_training_and_no_batch_norm_in_eval(rng):
    from fercuda.models import FERNet

    model = FERNet(width_mult=0.25, fused=True)
    x = torch.randn(2, 3, 48, 48, generator=rng)
    with _OpNames() as ops:
        model.train()(x)
    assert "fercuda::batch_norm_act_train" in ops.names
    assert not any("batch_norm" in name and not name.startswith("fercuda::") for name in ops.names), ops.names
    with _OpNames() as ops, torch.no_grad():
        model.eval()(x)
    assert not any("batch_norm" in name for name in ops.names), ops.names
    assert "fercuda::dwconv_bn_relu6" in ops.names


# =============================================================================================
# The CUDA device code compiled for the CPU (tests/bn_act_cuda_emulated.cpp): the plans, the
# multi-block reductions and their merges, both layouts, float16 / bfloat16 storage. Every
# emulated CUDA thread is an OS thread and every barrier a rendezvous of 256 of them: small shapes.
# =============================================================================================

import ctypes  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

from cuda_emulation import build_emulation  # noqa: E402

EMU_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EMU_MOMENTUM = 0.3
H200_SMS = 132
_P, _F, _I, _L = ctypes.c_void_p, ctypes.c_double, ctypes.c_int, ctypes.c_int64
_SIZES = [_L, _L, _L, _I, _I]  # n, c, positions, channels_last, relu6
EMU_SIGNATURES = {
    "emu_bn_act_plan": [_L, _L, _L, _I, _I, _L, _P],
    "emu_bn_act_inference": [_I] + [_P] * 7 + _SIZES + [_F],
    "emu_bn_act_train": [_I] + [_P] * 9 + _SIZES + [_F, _F, _I, _L],
    "emu_bn_act_backward": [_I] + [_P] * 9 + _SIZES + [_I, _I, _L],
}


@pytest.fixture(scope="module")
def bn_act_emulation(tmp_path_factory):
    torch_include = Path(torch.__file__).parent / "include"
    dll = build_emulation(tmp_path_factory, "bn_act_cuda_emulated.cpp", opt="-O1", includes=[torch_include])
    for name, argtypes in EMU_SIGNATURES.items():
        getattr(dll, name).argtypes = argtypes
    dll.emu_last_error.restype = ctypes.c_char_p
    return dll


@pytest.fixture(params=["emulated"])
def emu(request, bn_act_emulation):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield bn_act_emulation
    torch.set_num_threads(threads)


class EmuCase(NamedTuple):
    shape: tuple
    channels_last: bool
    sm_count: int = H200_SMS
    min_chunk: int = 0  # the plan's least chunk (0: the op's)
    splits: int = 1

    @property
    def id(self):
        extra = f"-chunk{self.min_chunk}" if self.min_chunk else ""
        return f"{shape_id(self.shape)}-{'cl' if self.channels_last else 'nchw'}{extra}"


# One channel; channels_last with fewer channels than a block's 32 and with 37 (a full group and a
# partial one); chunks forced small so that the merge of several splits runs.
EMU_CASES = [
    EmuCase((2, 3, 5, 7), False),
    EmuCase((2, 1, 1, 1), False),
    EmuCase((2, 2, 9, 13), False, sm_count=1, min_chunk=50, splits=4),
    EmuCase((2, 3, 5, 7), True, splits=3),
    EmuCase((3, 37, 3, 4), True, min_chunk=7, splits=6),
    EmuCase((2, 5, 6, 7), True, min_chunk=3, splits=28),
]
EMU_IDS = [case.id for case in EMU_CASES]


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _emu_sizes(x, channels_last, relu6):
    n, c, h, w = x.shape
    return [n, c, h * w, int(channels_last), int(relu6)]


def _poisoned(shape, dtype, channels_last=False):
    return torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=memory_format(channels_last))


def _f32(t):
    return t.float().contiguous()


def emulated_inference(emu, inputs, channels_last, relu6):
    x, w, b, rm, rv, res = inputs
    y = _poisoned(x.shape, x.dtype, channels_last)
    fmt = memory_format(channels_last)
    xs = x.contiguous(memory_format=fmt)
    rs = None if res is None else res.contiguous(memory_format=fmt)
    args = [_f32(w), _f32(b), _f32(rm), _f32(rv)]
    rc = emu.emu_bn_act_inference(EMU_DTYPE_CODES[x.dtype], _ptr(xs), _ptr(rs), *map(_ptr, args), _ptr(y),
                                  *_emu_sizes(x, channels_last, relu6), 1e-5)
    assert rc == 0, emu.emu_last_error().decode()
    return y


def emulated_train(emu, inputs, case, relu6):
    x, w, b, rm, rv, res = inputs
    c = x.shape[1]
    fmt = memory_format(case.channels_last)
    xs = x.contiguous(memory_format=fmt)
    rs = None if res is None else res.contiguous(memory_format=fmt)
    y = _poisoned(x.shape, x.dtype, case.channels_last)
    save_mean, save_invstd = _poisoned((c,), torch.float32), _poisoned((c,), torch.float32)
    new_mean, new_var = rm.float().clone(), rv.float().clone()
    keep = [_f32(w), _f32(b)]
    rc = emu.emu_bn_act_train(EMU_DTYPE_CODES[x.dtype], _ptr(xs), _ptr(rs), *map(_ptr, keep), _ptr(new_mean),
                              _ptr(new_var), _ptr(y), _ptr(save_mean), _ptr(save_invstd),
                              *_emu_sizes(x, case.channels_last, relu6), 1e-5, EMU_MOMENTUM, case.sm_count,
                              case.min_chunk)
    assert rc == 0, emu.emu_last_error().decode()
    return y, save_mean, save_invstd, new_mean, new_var


def emulated_backward(emu, grad_out, inputs, mean, invstd, case, relu6, training):
    x, w, b = inputs[:3]
    c = x.shape[1]
    fmt = memory_format(case.channels_last)
    gx = _poisoned(x.shape, x.dtype, case.channels_last)
    gw, gb = _poisoned((c,), torch.float32), _poisoned((c,), torch.float32)
    keep = [grad_out.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), _f32(w), _f32(b), _f32(mean),
            _f32(invstd)]
    rc = emu.emu_bn_act_backward(EMU_DTYPE_CODES[x.dtype], *map(_ptr, keep), _ptr(gx), _ptr(gw), _ptr(gb),
                                 *_emu_sizes(x, case.channels_last, relu6), int(training), case.sm_count,
                                 case.min_chunk)
    assert rc == 0, emu.emu_last_error().decode()
    return gx, gw, gb


def emu_plan(emu, case):
    n, c, h, w = case.shape
    out = torch.zeros(3, dtype=torch.int64)
    emu.emu_bn_act_plan(n, c, h * w, int(case.channels_last), case.sm_count, case.min_chunk, _ptr(out))
    return out.tolist()


def _emu_inputs(rng, case, dtype=torch.float32, residual=True):
    n, c, h, w = case.shape
    return sample_inputs("cpu", dtype, rng, n=n, c=c, h=h, w=w, channels_last=case.channels_last, residual=residual,
                         bn_dtype=torch.float32 if dtype != torch.float32 else None)


@pytest.mark.parametrize(**KINDS_TWO)
@pytest.mark.parametrize("case", EMU_CASES, ids=EMU_IDS)
def test_emulated_training_forward_and_inference(emu, rng, case, relu6, residual):
    assert emu_plan(emu, case)[1] == case.splits
    inputs = _emu_inputs(rng, case, residual=residual)
    x, w, b, rm, rv, res = inputs
    assert_close_fp32(emulated_inference(emu, inputs, case.channels_last, relu6), reference(*inputs, relu6=relu6))
    y, save_mean, save_invstd, new_mean, new_var = emulated_train(emu, inputs, case, relu6)
    ref_mean, ref_var = rm.double().clone(), rv.double().clone()
    assert_close_fp32(y, reference(x, w, b, ref_mean, ref_var, res, relu6=relu6, training=True,
                                   momentum=EMU_MOMENTUM))
    x64 = x.double()
    assert_close_fp32(save_mean, x64.mean((0, 2, 3)), scale=float(x64.abs().max()))
    assert_close_fp32(save_invstd, torch.rsqrt(x64.var((0, 2, 3), unbiased=False) + 1e-5))
    assert_close_fp32(new_mean, ref_mean)
    assert_close_fp32(new_var, ref_var)


@pytest.mark.parametrize(**ACTS)
@pytest.mark.parametrize("training", (True, False), ids=("batch_stats", "frozen_bn"))
@pytest.mark.parametrize("case", EMU_CASES, ids=EMU_IDS)
def test_emulated_backward(emu, rng, case, training, relu6):
    inputs = _emu_inputs(rng, case, residual=False)
    x, w, b, rm, rv, _ = inputs
    if training:
        x64 = x.double()
        mean, invstd = x64.mean((0, 2, 3)), torch.rsqrt(x64.var((0, 2, 3), unbiased=False) + 1e-5)
    else:
        mean, invstd = rm, torch.rsqrt(rv.double() + 1e-5)
    grad_out = torch.randn(x.shape, generator=rng)
    grad_out = off_the_kinks(grad_out, inputs, training=training) if relu6 else grad_out
    grads = emulated_backward(emu, grad_out, inputs, mean, invstd, case, relu6, training)
    expected, terms = float64_gradients(inputs, grad_out, relu6=relu6, training=training)
    assert_grads_close_fp32(GRAD_NAMES, grads, expected, terms)


@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_emulated_low_precision(emu, rng, dtype, channels_last):
    """float16 and bfloat16 storage: x, residual and the outputs in the dtype, float32 inside."""
    case = EmuCase((2, 5, 6, 7), channels_last)
    inputs = _emu_inputs(rng, case, dtype)
    x, w, b, rm, rv, res = inputs
    eager_args = (x, w, b, rm.clone(), rv.clone(), res)
    assert_within_twice_eager(emulated_inference(emu, inputs, channels_last, True), reference(*inputs),
                              reference(*eager_args, dtype=dtype, bn_dtype=torch.float32), "inference")
    y, save_mean, save_invstd, _, _ = emulated_train(emu, inputs, case, True)
    expected = reference(x, w, b, rm.double().clone(), rv.double().clone(), res, training=True, momentum=EMU_MOMENTUM)
    eager = reference(x, w, b, rm.clone(), rv.clone(), res, training=True, momentum=EMU_MOMENTUM, dtype=dtype,
                      bn_dtype=torch.float32)
    assert_within_twice_eager(y, expected, eager, "training")
    grad_out = off_the_kinks(torch.randn(x.shape, generator=rng).to(dtype), inputs, training=True)
    gx, gw, gb = emulated_backward(emu, grad_out, inputs, save_mean, save_invstd, case, True, True)
    exp, terms = float64_gradients(inputs, grad_out, training=True)
    eager_grads = eager_gradients(inputs, grad_out, dtype, training=True, bn_dtype=torch.float32)
    assert_within_twice_eager(gx, exp[0], eager_grads[0], "x")
    assert_grads_close_fp32(GRAD_NAMES[1:], [gw, gb], exp[1:], terms[1:])


def test_emulated_network_plan(emu):
    """FERNet's first pointwise output on an H200: enough blocks to fill it several times."""
    groups, splits, chunk = emu_plan(emu, EmuCase((64, 128, 48, 48), True))
    assert groups == 4 and groups * splits >= 8 * H200_SMS and chunk * splits >= 64 * 48 * 48
    groups, splits, chunk = emu_plan(emu, EmuCase((64, 768, 6, 6), False))
    assert groups == 768 and splits == 2 and chunk * splits >= 64 * 36
