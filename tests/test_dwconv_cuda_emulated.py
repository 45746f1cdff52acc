"""The CUDA device code of the fused depthwise conv + BatchNorm + ReLU6 (csrc/cuda/dwconv_kernels.cuh)
compiled for the CPU, against eager PyTorch in float64.

tests/cuda_emulation.h stands in for the CUDA built-ins (threads, barriers, dynamic shared memory),
and tests/dwconv_cuda_emulated.cpp launches the kernels with the plans dwconv_cuda.cu launches them
with (the plan_* functions of dwconv_kernels.cuh: grids, blocks, shared memory, scratch sizes and
index width), so the one-pass kernels, the multi-block reductions and their merges, the backward
passes and the 64-bit index path are checked on machines without a GPU. The op glue of
dwconv_cuda.cu (argument checks, dtype dispatch, allocation, empty inputs) and real GPU scheduling
are covered by tests/test_dwconv_cuda.py on a GPU.

Every emulated CUDA thread is an OS thread and every barrier a rendezvous of 256 of them, so the
shapes are small and the reductions' block counts bounded (the SM count the plan sees is a
parameter, as on a smaller GPU).
"""

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from dwconv_cases import (
    LOW_PRECISION,
    assert_close_fp32,
    assert_grad_close_fp32,
    assert_within_twice_eager,
    float64_gradients,
    reference,
    sample_inputs,
)

REPO = Path(__file__).resolve().parents[1]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
H200_SMS = 132
EPS = 1e-5
MOMENTUM = 0.3
GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias")

_P, _F, _I, _L = ctypes.c_void_p, ctypes.c_double, ctypes.c_int, ctypes.c_int64
_SIZES = [_L, _L, _L, _L, _I, _I, _I]  # n, c, h, w, stride, padding, channels_last
SIGNATURES = {
    "emu_dwconv_inference": [_I] + [_P] * 8 + _SIZES + [_F, _I],
    "emu_dwconv_train": [_I] + [_P] * 10 + _SIZES + [_F, _F, _I, _L, _I],
    "emu_dwconv_backward": [_I] + [_P] * 13 + _SIZES + [_I, _I, _L, _I],
    "emu_dwconv_plans": _SIZES + [_I, _L, _I, _P],
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The references run on tiny tensors, where waking torch's thread pool costs more than the
    work, and it would compete with the emulated threads for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    lib = tmp_path_factory.mktemp("emu") / "dwconv_emulated.so"
    torch_include = Path(torch.__file__).parent / "include"  # c10::Half, c10::BFloat16, as the GPU build uses
    cmd = [cxx, "-std=c++20", "-O0", "-pthread", "-shared", "-fPIC", f"-I{REPO / 'csrc' / 'include'}",
           f"-I{REPO / 'csrc' / 'cuda'}", f"-I{torch_include}", str(REPO / "tests" / "dwconv_cuda_emulated.cpp"),
           "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True)
    dll = ctypes.CDLL(str(lib))
    for name, argtypes in SIGNATURES.items():
        getattr(dll, name).argtypes = argtypes
    dll.emu_last_error.restype = ctypes.c_char_p
    return dll


class Config(NamedTuple):
    """How the emulated op is launched: the SM count plan_reduce sizes the reductions for, the
    reductions' least split (0: the op's), and whether the 64-bit index path is forced."""

    sm_count: int = H200_SMS
    min_chunk: int = 0
    int64: bool = False


AS_THE_OP = Config()


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _poisoned(shape, dtype, channels_last=False):
    return torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=_fmt(channels_last))


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


def inference(emu, inputs, stride, channels_last, config=AS_THE_OP):
    x, w, b, bn_w, bn_b, rm, rv = inputs
    y = _poisoned(_out_shape(x, stride), x.dtype, channels_last)
    _call(emu, "emu_dwconv_inference", DTYPE_CODES[x.dtype], x.contiguous(memory_format=_fmt(channels_last)),
          w.contiguous(), None if b is None else b.contiguous(), *[_as_f32(t) for t in (bn_w, bn_b, rm, rv)], y,
          *_sizes(x, stride, channels_last), EPS, int(config.int64))
    return y


def train(emu, inputs, stride, channels_last, config=AS_THE_OP):
    """(y, save_mean, save_invstd, new running_mean, new running_var), the last two in float32."""
    x, w, b, bn_w, bn_b, rm, rv = inputs
    c = x.shape[1]
    y = _poisoned(_out_shape(x, stride), x.dtype, channels_last)
    save_mean, save_invstd = _poisoned((c,), torch.float32), _poisoned((c,), torch.float32)
    new_mean, new_var = rm.float().clone(), rv.float().clone()
    _call(emu, "emu_dwconv_train", DTYPE_CODES[x.dtype], x.contiguous(memory_format=_fmt(channels_last)),
          w.contiguous(), _as_f32(b), _as_f32(bn_w), _as_f32(bn_b), new_mean, new_var, y, save_mean, save_invstd,
          *_sizes(x, stride, channels_last), EPS, MOMENTUM, config.sm_count, config.min_chunk, int(config.int64))
    return y, save_mean, save_invstd, new_mean, new_var


def backward(emu, grad_out, inputs, mean, invstd, stride, channels_last, training, config=AS_THE_OP):
    """(grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias); grad_bias as when bias is given."""
    x, w, b, bn_w, bn_b = inputs[:5]
    c = x.shape[1]
    grad_x = _poisoned(x.shape, x.dtype, channels_last)
    grad_w = _poisoned(w.shape, w.dtype)
    grad_b = _poisoned((c,), w.dtype)
    grad_bn_w, grad_bn_b = _poisoned((c,), torch.float32), _poisoned((c,), torch.float32)
    fmt = _fmt(channels_last)
    _call(emu, "emu_dwconv_backward", DTYPE_CODES[x.dtype], grad_out.contiguous(memory_format=fmt),
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


# ---- Cases --------------------------------------------------------------------------------

class Case(NamedTuple):
    shape: tuple
    stride: int
    channels_last: bool
    config: Config = AS_THE_OP
    splits: int = 1  # of each channel group's positions in the reductions, for the config

    @property
    def id(self):
        n, c, h, w = self.shape
        layout = "cl" if self.channels_last else "nchw"
        extra = "" if self.config == AS_THE_OP else f"-sm{self.config.sm_count}-chunk{self.config.min_chunk}"
        return f"{n}x{c}x{h}x{w}-s{self.stride}-{layout}{extra}"


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


def _inputs(rng, case, dtype=torch.float32, bn_dtype=None):
    n, c, h, w = case.shape
    return sample_inputs("cpu", dtype, rng, n=n, c=c, h=h, w=w, channels_last=case.channels_last,
                         bias=c % 2 == 1, bn_dtype=bn_dtype)


def _conv64(inputs, stride):
    x, w, b = inputs[:3]
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, 1, 1, x.shape[1])


def _batch_stats(z):
    return z.mean(dim=(0, 2, 3)), torch.rsqrt(z.var(dim=(0, 2, 3), unbiased=False) + EPS)


def _expected_gradients(inputs, grad_out, stride, training):
    """float64_gradients, with a zero bias where there is none: the op returns grad_bias = sum(gz)
    whether or not the conv has a bias."""
    if inputs[2] is None:
        inputs = [*inputs[:2], torch.zeros(inputs[0].shape[1], dtype=inputs[1].dtype), *inputs[3:]]
    return float64_gradients(inputs, grad_out, stride=stride, training=training)


def _assert_gradients(grads, inputs, grad_out, stride, training):
    expected, term_sums = _expected_gradients(inputs, grad_out, stride, training)
    grad_x_scale = float(expected[0].abs().max())
    for name, got, exp, term_sum in zip(GRAD_NAMES, grads, expected, term_sums):
        assert_grad_close_fp32(name, got, exp, term_sum, grad_x_scale)


# ---- Inference ----------------------------------------------------------------------------


@pytest.mark.parametrize("index", ("int32", "int64"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 37, 9, 11), (2, 1, 1, 1), (1, 2, 4, 17)], ids=str)
def test_inference(emu, rng, shape, stride, channels_last, index):
    case = Case(shape, stride, channels_last)
    inputs = _inputs(rng, case)
    out = inference(emu, inputs, stride, channels_last, Config(int64=index == "int64"))
    assert_close_fp32(out, reference(*inputs, stride=stride))


# ---- Training forward: batch statistics, their multi-block merge, running statistics --------


@pytest.mark.parametrize("case", REDUCE_CASES, ids=REDUCE_IDS)
def test_training_forward(emu, rng, case):
    assert plans(emu, case.shape, case.stride, case.channels_last, case.config).reduce_splits == case.splits
    inputs = _inputs(rng, case)
    y, save_mean, save_invstd, new_mean, new_var = train(emu, inputs, case.stride, case.channels_last, case.config)
    running_mean, running_var = inputs[5].double().clone(), inputs[6].double().clone()
    expected = reference(*inputs[:5], running_mean, running_var, stride=case.stride, training=True,
                         momentum=MOMENTUM)
    assert_close_fp32(y, expected)
    z = _conv64(inputs, case.stride)
    mean, invstd = _batch_stats(z)
    assert_close_fp32(save_mean, mean, scale=float(z.abs().max()))
    assert_close_fp32(save_invstd, invstd)
    assert_close_fp32(new_mean, running_mean)
    assert_close_fp32(new_var, running_var)


# ---- Backward: grad_x, grad_weight, grad_bias, grad of the BatchNorm parameters ------------


@pytest.mark.parametrize("training", (True, False), ids=("batch_stats", "frozen_bn"))
@pytest.mark.parametrize("case", REDUCE_CASES, ids=REDUCE_IDS)
def test_backward(emu, rng, case, training):
    inputs = _inputs(rng, case)
    if training:
        mean, invstd = _batch_stats(_conv64(inputs, case.stride))
    else:
        mean, invstd = inputs[5], torch.rsqrt(inputs[6].double() + EPS)
    x = inputs[0]
    grad_out = torch.randn(_out_shape(x, case.stride), generator=rng).to(x.dtype)
    grads = backward(emu, grad_out, inputs, mean, invstd, case.stride, case.channels_last, training, case.config)
    _assert_gradients(grads, inputs, grad_out, case.stride, training)


# ---- The 64-bit index path, forced: no test tensor reaches 2^31 elements -------------------


FORCED_SPLIT_CASES = [case for case in REDUCE_CASES if case.config.min_chunk]


@pytest.mark.parametrize("case", FORCED_SPLIT_CASES, ids=[case.id for case in FORCED_SPLIT_CASES])
def test_int64_index_training_and_backward(emu, rng, case):
    config = case.config._replace(int64=True)
    chosen = plans(emu, case.shape, case.stride, case.channels_last, config)
    assert chosen.apply_int64 and chosen.reduce_int64 and chosen.grad_x_int64
    inputs = _inputs(rng, case)
    y, save_mean, save_invstd, _, _ = train(emu, inputs, case.stride, case.channels_last, config)
    assert_close_fp32(y, reference(*inputs[:5], inputs[5].clone(), inputs[6].clone(), stride=case.stride,
                                   training=True, momentum=MOMENTUM))
    grad_out = torch.randn(y.shape, generator=rng)
    grads = backward(emu, grad_out, inputs, save_mean, save_invstd, case.stride, case.channels_last, True, config)
    _assert_gradients(grads, inputs, grad_out, case.stride, True)


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


# ---- float16 and bfloat16: x, weight, bias and the outputs in the dtype, float32 inside -----


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision(emu, rng, dtype, channels_last):
    case = Case((2, 5, 6, 7), 1, channels_last)
    inputs = _inputs(rng, case, dtype, bn_dtype=torch.float32)
    stats_dtype = [inputs[5].to(dtype), inputs[6].to(dtype)]

    out = inference(emu, inputs, 1, channels_last)
    assert out.dtype == dtype
    assert_within_twice_eager(out, reference(*inputs), reference(*inputs[:5], *stats_dtype, dtype=dtype), "inference")

    y, save_mean, save_invstd, new_mean, new_var = train(emu, inputs, 1, channels_last, case.config)
    running_mean, running_var = inputs[5].double().clone(), inputs[6].double().clone()
    expected = reference(*inputs[:5], running_mean, running_var, training=True, momentum=MOMENTUM)
    eager = reference(*inputs[:5], *[t.clone() for t in stats_dtype], training=True, momentum=MOMENTUM, dtype=dtype)
    assert_within_twice_eager(y, expected, eager, "training")
    # The statistics are float32 sums of exactly widened values: float32 accuracy.
    z = _conv64(inputs, 1)
    mean, invstd = _batch_stats(z)
    assert_close_fp32(save_mean, mean, scale=float(z.abs().max()))
    assert_close_fp32(save_invstd, invstd)
    assert_close_fp32(new_mean, running_mean)
    assert_close_fp32(new_var, running_var)

    grad_out = torch.randn(y.shape, generator=rng).to(dtype)
    grads = backward(emu, grad_out, inputs, save_mean, save_invstd, 1, channels_last, True, case.config)
    expected, _ = float64_gradients(inputs, grad_out, training=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    reference(*leaves, *[t.clone() for t in stats_dtype], training=True, dtype=dtype).backward(grad_out)
    for name, got, exp, leaf in zip(GRAD_NAMES, grads, expected, leaves):
        if name != "bias":  # ~0 in training: both sides are rounding noise
            assert_within_twice_eager(got, exp, leaf.grad, name)
