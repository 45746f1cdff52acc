"""fercuda.ops.dwconv_bn_relu6 and fercuda.nn.DWConvBNReLU6 against eager PyTorch in float64."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fercuda
import fercuda.nn as fnn
from fercuda.ops import dwconv_bn_relu6

OPS = torch.ops.fercuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W): odd sizes, one channel, 1x1 images, widths that leave vector tails.
SHAPES = [(3, 5, 7, 9), (2, 1, 6, 5), (4, 3, 1, 1), (2, 19, 12, 13)]


def sample_inputs(shape, dtype=torch.float32, *, bias=True, channels_last=False, bn_dtype=None, gen=None,
                  requires_grad=False):
    """x, weight, bias, bn_weight, bn_bias, running_mean, running_var with values that keep
    every ReLU6 region (0, between, 6) populated."""
    n, c, h, w = shape
    bn_dtype = bn_dtype or dtype

    def rand(*size, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + offset).to(dt)

    x = rand(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = [
        x,
        rand(c, 1, 3, 3, scale=0.5),
        rand(c, scale=0.3) if bias else None,
        rand(c, scale=0.3, offset=1.5, dt=bn_dtype),
        rand(c, scale=0.5, offset=1.5, dt=bn_dtype),
        rand(c, scale=0.2, dt=bn_dtype),
        (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(bn_dtype),
    ]
    if requires_grad:
        for t in tensors[:5]:
            if t is not None:
                t.requires_grad_()
    return tensors


def eager(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, training, momentum=0.1,
          eps=1e-5, dtype=None):
    """relu6(batch_norm(conv2d)) computed by PyTorch in dtype (default float64); returns the
    output, the pre-activation and the updated running statistics."""
    dtype = dtype or torch.float64

    def cast(t, dt=dtype):
        return None if t is None else t.detach().to(dt)

    bn_dt = torch.float32 if dtype in (torch.float16, torch.bfloat16) and bn_weight.dtype == torch.float32 else dtype
    rm, rv = cast(running_mean, bn_dt).clone(), cast(running_var, bn_dt).clone()
    z = F.conv2d(cast(x), cast(weight), cast(bias), stride, 1, groups=x.shape[1])
    a = F.batch_norm(z, rm, rv, cast(bn_weight, bn_dt), cast(bn_bias, bn_dt), training, momentum, eps)
    return F.relu6(a), a, rm, rv


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def tolerance(dtype, a_ref, eager_err):
    """float32: 1e-5 relative to the pre-activation's magnitude; half precision: twice the
    error of eager PyTorch in that dtype (with one ulp of the output range as a floor)."""
    scale = max(1.0, a_ref.abs().max().item())
    if dtype == torch.float32:
        return 1e-5 * scale
    return 2.0 * max(eager_err, torch.finfo(dtype).eps * 6.0)


def assert_layout(y, x):
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


# ---- Forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference_matches_reference(shape, stride, channels_last, dtype, rng):
    args = sample_inputs(shape, dtype, bias=shape[1] % 2 == 1, channels_last=channels_last, gen=rng)
    y = dwconv_bn_relu6(*args, stride=stride)
    ref, a_ref, _, _ = eager(*args, stride, training=False)
    assert y.shape == ref.shape and y.dtype == dtype
    assert_layout(y, args[0])
    eager_err = 0.0 if dtype == torch.float32 else max_err(eager(*args, stride, False, dtype=dtype)[0], ref)
    assert max_err(y, ref) <= tolerance(dtype, a_ref, eager_err)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_matches_reference(shape, stride, channels_last, dtype, rng):
    args = sample_inputs(shape, dtype, bias=shape[1] % 2 == 1, channels_last=channels_last, gen=rng)
    rm, rv = args[5].clone(), args[6].clone()
    y, save_mean, save_invstd, new_mean, new_var = OPS.dwconv_bn_relu6_train(*args[:5], rm, rv, stride, 1, 1e-5, 0.3)
    ref, a_ref, ref_mean, ref_var = eager(*args, stride, training=True, momentum=0.3)
    assert torch.equal(rm, args[5]) and torch.equal(rv, args[6])  # the op is functional
    assert_layout(y, args[0])
    eager_err = 0.0 if dtype == torch.float32 else max_err(eager(*args, stride, True, 0.3, dtype=dtype)[0], ref)
    assert max_err(y, ref) <= tolerance(dtype, a_ref, eager_err)
    # Batch statistics of the conv output, float32 whatever x's dtype.
    z = F.conv2d(args[0].double(), args[1].double(), None if args[2] is None else args[2].double(), stride, 1,
                 groups=shape[1])
    var = z.var(dim=(0, 2, 3), unbiased=False)
    assert save_mean.dtype == save_invstd.dtype == torch.float32
    stat_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(save_mean.double(), z.mean(dim=(0, 2, 3)), rtol=stat_tol, atol=stat_tol)
    torch.testing.assert_close(save_invstd.double(), torch.rsqrt(var + 1e-5), rtol=stat_tol, atol=stat_tol)
    assert new_mean.dtype == args[5].dtype and new_var.dtype == args[6].dtype
    torch.testing.assert_close(new_mean.double(), ref_mean, rtol=stat_tol, atol=stat_tol)
    torch.testing.assert_close(new_var.double(), ref_var, rtol=stat_tol, atol=stat_tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_float32_batchnorm(dtype, rng):
    args = sample_inputs((2, 6, 9, 8), dtype, bn_dtype=torch.float32, gen=rng)
    for training in (False, True):
        rm, rv = args[5].clone(), args[6].clone()
        y = dwconv_bn_relu6(*args[:5], rm, rv, training=training)
        ref, a_ref, ref_mean, ref_var = eager(*args, 1, training)
        eager_err = max_err(eager(*args, 1, training, dtype=dtype)[0], ref)
        assert y.dtype == dtype and rm.dtype == torch.float32
        assert max_err(y, ref) <= tolerance(dtype, a_ref, eager_err)
        torch.testing.assert_close(rm.double(), ref_mean, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(rv.double(), ref_var, rtol=1e-2, atol=1e-2)


def test_noncontiguous_input(rng):
    args = sample_inputs((2, 4, 10, 14), gen=rng)
    args[0] = args[0][:, :, ::2, 1::2]  # neither NCHW- nor channels_last-contiguous
    y = dwconv_bn_relu6(*args)
    ref, a_ref, _, _ = eager(*args, 1, False)
    assert max_err(y, ref) <= tolerance(torch.float32, a_ref, 0.0)


# ---- Running statistics as nn.BatchNorm2d keeps them ----------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_running_stats_match_batchnorm(momentum, channels_last, rng):
    c = 7
    fused = fnn.DWConvBNReLU6(c, stride=2, bias=True, momentum=momentum).double()
    seq = copy.deepcopy(fused.to_sequential())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _ in range(4):
        x = torch.randn(3, c, 9, 8, generator=rng, dtype=torch.float64).contiguous(memory_format=fmt)
        y = fused(x)
        ref = seq(x)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for key, ref_value in seq.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], ref_value, rtol=1e-12, atol=1e-12, msg=key)
    assert int(fused.bn.num_batches_tracked) == 4


# ---- Gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck(training, stride, channels_last, rng):
    args = sample_inputs((2, 3, 5, 6), torch.float64, bias=stride == 1, channels_last=channels_last, gen=rng,
                         requires_grad=True)
    rm, rv = args[5], args[6]

    def fn(x, w, b, bw, bb):
        return dwconv_bn_relu6(x, w, b, bw, bb, rm.clone(), rv.clone(), stride=stride, training=training)

    assert torch.autograd.gradcheck(fn, tuple(args[:5]), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Channel counts below, at and past the vector blocks of the channels_last kernels (32 floats).
@pytest.mark.parametrize("shape,stride", [((3, 5, 11, 10), 2), ((2, 37, 9, 8), 1), ((2, 70, 6, 6), 1),
                                          ((2, 33, 7, 9), 2)], ids=str)
def test_backward_matches_reference(training, channels_last, dtype, shape, stride, rng):
    n, c, h, w = shape
    args = sample_inputs(shape, dtype, channels_last=channels_last, gen=rng, requires_grad=True)
    grad = torch.randn(n, c, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=rng, dtype=torch.float64)
    y = dwconv_bn_relu6(*args[:5], args[5].clone(), args[6].clone(), stride=stride, training=training)
    grads = torch.autograd.grad(y, [args[i] for i in range(5)], grad.to(dtype))
    assert_layout(grads[0], args[0])

    def reference_grads(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in args[:5]]
        bn = [t.to(dt) for t in args[5:]]
        out = F.relu6(F.batch_norm(F.conv2d(leaves[0], leaves[1], leaves[2], stride, 1, groups=c), bn[0].clone(),
                                   bn[1].clone(), leaves[3], leaves[4], training, 0.1, 1e-5))
        return torch.autograd.grad(out, leaves, grad.to(dt))

    ref = reference_grads(torch.float64)
    low = reference_grads(dtype) if dtype != torch.float32 else None
    for i, (g, r) in enumerate(zip(grads, ref)):
        assert g.dtype == args[i].dtype
        err = max_err(g, r)
        if low is None:
            assert err <= 1e-5 * max(1.0, r.abs().max().item()), (i, err)
        else:
            assert err <= 2.0 * max(max_err(low[i], r), torch.finfo(dtype).eps * r.abs().max().item()), (i, err)


# ---- torch.library and torch.compile ---------------------------------------------------


def test_opcheck(rng):
    for channels_last in (False, True):
        args = sample_inputs((2, 3, 6, 7), channels_last=channels_last, gen=rng, requires_grad=True)
        torch.library.opcheck(OPS.dwconv_bn_relu6.default, (*args, 2, 1, 1e-5))
        torch.library.opcheck(OPS.dwconv_bn_relu6_train.default, (*args, 1, 1, 1e-5, 0.1))
        x, w, b, bw, bb, rm, rv = (None if t is None else t.detach() for t in args)
        grad = torch.randn(2, 3, 6, 7, generator=rng)
        mean, invstd = rm.clone(), torch.rsqrt(rv + 1e-5)
        for training in (False, True):
            torch.library.opcheck(OPS.dwconv_bn_relu6_backward.default,
                                  (grad, x, w, b, bw, bb, mean, invstd, 1, 1, training))


def test_compile_fullgraph_forward_backward(rng):
    torch._dynamo.reset()
    fused = fnn.DWConvBNReLU6(4, stride=1, bias=True)
    reference = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    for training in (True, False):
        fused.train(training)
        reference.train(training)
        x = torch.randn(2, 4, 7, 6, generator=rng)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = compiled(x1)
        y.square().sum().backward()
        y_ref = reference(x2)
        y_ref.square().sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x1.grad, x2.grad)
        for p, p_ref in zip(fused.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad)
        torch.testing.assert_close(fused.bn.running_var, reference.bn.running_var)


# ---- Module ---------------------------------------------------------------------------------


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
    assert max_err(y, ref) <= 2.0 * max(max_err(y_ref, ref), torch.finfo(torch.bfloat16).eps * 6)


# ---- Bad input: one test each, the kernel and the fake saying the same ---------------


def _raises_same(args, match, op=None, exc=RuntimeError):
    op = op or OPS.dwconv_bn_relu6
    with pytest.raises(exc, match=match) as real:
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(exc, match=match) as fake_err:
            op(*fake)
    assert str(fake_err.value).splitlines()[0] == str(real.value).splitlines()[0]


def _good():
    return [*sample_inputs((2, 4, 5, 5)), 1, 1, 1e-5]


def test_bad_weight_shape():
    args = _good()
    args[1] = torch.randn(4, 1, 5, 5)
    _raises_same(args, r"argument 'weight' must have shape \(C, 1, 3, 3\) = \(4, 1, 3, 3\).*got \(4, 1, 5, 5\)")


def test_bad_channel_count():
    args = _good()
    args[3] = torch.randn(3)
    _raises_same(args, r"argument 'bn_weight' must have shape \(C,\) = \(4,\).*got \(3,\)")


def test_bad_bias_channel_count():
    args = _good()
    args[2] = torch.randn(5)
    _raises_same(args, r"argument 'bias' must have shape \(C,\) = \(4,\)")


def test_bad_stride():
    args = _good()
    args[7] = 3
    _raises_same(args, "argument 'stride' must be 1 or 2, got 3")


def test_bad_mixed_dtypes():
    args = _good()
    args[1] = args[1].double()
    _raises_same(args, "argument 'weight' must be a Float tensor like x, got Double")


def test_bad_float64_batchnorm_with_half_input():
    args = _good()
    args[0] = args[0].half()
    args[1] = args[1].half()
    args[2] = args[2].half()
    args[6] = args[6].double()
    _raises_same(args, "argument 'running_var' must be a Half or Float tensor like x, got Double")


def test_bad_mixed_devices():
    args = _good()
    args[4] = args[4].to("meta")
    with pytest.raises(RuntimeError, match="arguments 'x' and 'bn_bias' must be on the same device, got cpu and meta"):
        OPS.dwconv_bn_relu6(*args)


def test_bad_integer_input():
    args = _good()
    args[0] = torch.randint(0, 9, (2, 4, 5, 5))
    _raises_same(args, "argument 'x' must be a Float, Double, Half or BFloat16 tensor, got Long")


def test_bad_3d_input():
    args = _good()
    args[0] = args[0][0]
    _raises_same(args, r"argument 'x' must be a 4-D \(N, C, H, W\) tensor, got a 3-D tensor of shape \(4, 5, 5\)")


def test_bad_too_small_for_padding():
    args = _good()
    args[0] = torch.randn(2, 4, 2, 2)
    args[8] = 0
    _raises_same(args, "the padded input must be at least 3x3")


def test_bad_batch_of_one_1x1_in_training():
    args = [*sample_inputs((1, 4, 1, 1)), 1, 1, 1e-5, 0.1]
    _raises_same(args, "Expected more than 1 value per channel when training", OPS.dwconv_bn_relu6_train)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))


def test_bad_grad_out_shape():
    x, w, b, bw, bb, rm, rv = sample_inputs((2, 4, 5, 5))
    args = [torch.randn(2, 4, 4, 4), x, w, b, bw, bb, rm, rv, 1, 1, False]
    _raises_same(args, r"argument 'grad_out' must have the output's shape \(2, 4, 5, 5\)",
                 OPS.dwconv_bn_relu6_backward)


BAD_EPS = [(math.nan, "nan"), (-1e-5, "-1e-05"), (0.0, "0"), (math.inf, "inf"), (-math.inf, "-inf")]
BAD_MOMENTUM = [(math.nan, "nan"), (-0.1, "-0.1"), (1.5, "1.5"), (math.inf, "inf")]


@pytest.mark.parametrize("eps, printed", BAD_EPS, ids=[p for _, p in BAD_EPS])
def test_bad_eps_in_the_ops(eps, printed):
    # The C++ kernels and the fakes, called directly: the same ValueError.
    match = f"argument 'eps' must be a finite number > 0, got {printed}$"
    _raises_same([*_good()[:-1], eps], "fercuda.dwconv_bn_relu6: " + match, exc=ValueError)
    args = [*sample_inputs((2, 4, 5, 5)), 1, 1, eps, 0.1]
    _raises_same(args, "fercuda.dwconv_bn_relu6_train: " + match, OPS.dwconv_bn_relu6_train, exc=ValueError)


@pytest.mark.parametrize("momentum, printed", BAD_MOMENTUM, ids=[p for _, p in BAD_MOMENTUM])
def test_bad_momentum_in_the_train_op(momentum, printed):
    args = [*sample_inputs((2, 4, 5, 5)), 1, 1, 1e-5, momentum]
    _raises_same(args, f"fercuda.dwconv_bn_relu6_train: argument 'momentum' must be a number in \\[0, 1\\], got {printed}$",
                 OPS.dwconv_bn_relu6_train, exc=ValueError)


def _backends():
    return [None, "cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("eps, printed", BAD_EPS, ids=[p for _, p in BAD_EPS])
def test_bad_eps(eps, printed, training):
    args = sample_inputs((2, 4, 5, 5))
    stats = [t.clone() for t in args[5:]]
    for backend in _backends():
        with pytest.raises(ValueError, match=f"^fercuda.dwconv_bn_relu6: argument 'eps' must be a finite number > 0, "
                                             f"got {printed}$"):
            dwconv_bn_relu6(*args, eps=eps, training=training, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(args[5:], stats))  # refused before any update


@pytest.mark.parametrize("training", [False, True], ids=["frozen_bn", "batch_stats"])
@pytest.mark.parametrize("momentum, printed", BAD_MOMENTUM, ids=[p for _, p in BAD_MOMENTUM])
def test_bad_momentum(momentum, printed, training):
    args = sample_inputs((2, 4, 5, 5))
    stats = [t.clone() for t in args[5:]]
    for backend in _backends():
        with pytest.raises(ValueError, match=r"^fercuda.dwconv_bn_relu6: argument 'momentum' must be a number in "
                                             rf"\[0, 1\], got {printed}$"):
            dwconv_bn_relu6(*args, momentum=momentum, training=training, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(args[5:], stats))


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps="1e-5"), "argument 'eps' must be a finite number > 0, got str"),
    (dict(eps=None), "argument 'eps' must be a finite number > 0, got NoneType"),
    (dict(eps=True), "argument 'eps' must be a finite number > 0, got bool"),
    (dict(momentum="0.1", training=True), r"argument 'momentum' must be a number in \[0, 1\], got str"),
    (dict(momentum=True, training=True), r"argument 'momentum' must be a number in \[0, 1\], got bool"),
    (dict(momentum=None, training=True), r"argument 'momentum' must be a number in \[0, 1\] when training, got None"),
], ids=["eps_str", "eps_none", "eps_bool", "momentum_str", "momentum_bool", "momentum_none_training"])
def test_bad_eps_momentum_types(kwargs, message):
    with pytest.raises(TypeError, match="^fercuda.dwconv_bn_relu6: " + message):
        dwconv_bn_relu6(*sample_inputs((2, 4, 5, 5)), **kwargs)


def test_momentum_bounds_and_none_when_frozen(rng):
    # momentum 0 and 1 are BatchNorm's own bounds; None is accepted where it is unused (training=False).
    args = sample_inputs((2, 4, 5, 5), gen=rng)
    frozen = dwconv_bn_relu6(*args)
    assert torch.equal(dwconv_bn_relu6(*args, momentum=None), frozen)
    for momentum in (0.0, 1.0):
        rm, rv = args[5].clone(), args[6].clone()
        dwconv_bn_relu6(*args[:5], rm, rv, momentum=momentum, training=True)
        _, _, ref_rm, ref_rv = eager(*args, 1, True, momentum=momentum)
        torch.testing.assert_close(rm.double(), ref_rm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv.double(), ref_rv, rtol=1e-6, atol=1e-6)


def test_empty_batch():
    x, w, b, bw, bb, rm, rv = sample_inputs((0, 4, 5, 5), requires_grad=True)
    y = dwconv_bn_relu6(x, w, b, bw, bb, rm, rv)
    assert y.shape == (0, 4, 5, 5)
    rm0, rv0 = rm.clone(), rv.clone()
    y = dwconv_bn_relu6(x, w, b, bw, bb, rm, rv, stride=2, training=True)
    assert y.shape == (0, 4, 3, 3)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_other_paddings(padding, stride, rng):
    args = sample_inputs((2, 3, 7, 8), torch.float64, gen=rng, requires_grad=True)
    for training in (False, True):
        y = OPS.dwconv_bn_relu6_train(*args, stride, padding, 1e-5, 0.1)[0] if training else \
            OPS.dwconv_bn_relu6(*args, stride, padding, 1e-5)
        rm, rv = args[5].clone(), args[6].clone()
        ref = F.relu6(F.batch_norm(F.conv2d(args[0], args[1], args[2], stride, padding, groups=3), rm, rv, args[3],
                                   args[4], training, 0.1, 1e-5))
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
        got = torch.autograd.grad(y, args[:5], grad)
        expected = torch.autograd.grad(ref, args[:5], grad)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
