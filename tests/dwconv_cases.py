"""Inputs, the float64 eager reference and tolerances of the fused depthwise conv + BatchNorm +
ReLU6 tests (tests/test_dwconv.py): their one home.

The reference is plain PyTorch, F.relu6(F.batch_norm(F.conv2d(..., groups=C))), sharing no
code with the fused kernels.
"""

import contextlib

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)


def sample_inputs(device, dtype, generator, *, n=2, c=3, h=5, w=7, channels_last=False, bias=True, bn_dtype=None):
    """(x, weight, bias, bn_weight, bn_bias, running_mean, running_var), fresh random values whose
    BatchNorm outputs land on both sides of ReLU6's clamps as well as between them."""
    bn_dtype = bn_dtype or dtype

    def randn(*shape, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset).to(device, dt)

    def rand(*shape, low, high, dt):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * (high - low) + low).to(device, dt)

    x = randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = randn(c, 1, 3, 3, scale=0.5)
    conv_bias = randn(c, scale=0.5) if bias else None
    bn_weight = rand(c, low=0.5, high=2.0, dt=bn_dtype)
    bn_bias = randn(c, scale=2.0, offset=2.0, dt=bn_dtype)
    running_mean = randn(c, scale=0.3, dt=bn_dtype)
    running_var = rand(c, low=0.5, high=1.5, dt=bn_dtype)
    return x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var


def reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=1, eps=1e-5,
              training=False, momentum=0.1, dtype=torch.float64, bn_dtype=None):
    """Eager PyTorch in `dtype`, the BatchNorm tensors in `bn_dtype` (default `dtype`);
    running_mean / running_var (when already in that dtype) are updated in place when training."""
    bn_dtype = bn_dtype or dtype

    def cast(t, dt=dtype):
        return None if t is None else t.to(dt)

    z = F.conv2d(cast(x), cast(weight), cast(bias), stride, padding, 1, x.shape[1])
    return F.relu6(F.batch_norm(z, cast(running_mean, bn_dtype), cast(running_var, bn_dtype), cast(bn_weight, bn_dtype),
                                cast(bn_bias, bn_dtype), training, momentum, eps))


def conv64(inputs, stride=1, padding=1):
    """The depthwise conv of (x, weight, bias, ...) in float64: what BatchNorm normalizes."""
    x, w, b = inputs[:3]
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, 1, x.shape[1])


def batch_stats(z, eps=1e-5):
    """(mean, invstd) of z per channel, the biased variance, as BatchNorm normalizes in training."""
    return z.mean(dim=(0, 2, 3)), torch.rsqrt(z.var(dim=(0, 2, 3), unbiased=False) + eps)


def eager_gradients(inputs, grad_out, dtype, *, stride=1, padding=1, eps=1e-5, training):
    """Gradients of (x, weight, bias, bn_weight, bn_bias) by autograd of the reference in `dtype`
    (None for an absent bias): the error eager PyTorch makes in that dtype."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs[:5]]
    stats = [t.detach().to(dtype).clone() for t in inputs[5:7]]
    out = reference(*leaves, *stats, stride=stride, padding=padding, eps=eps, training=training, dtype=dtype)
    out.backward(grad_out.to(dtype))
    return [None if t is None else t.grad for t in leaves]


def assert_close_fp32(actual, expected, *, rtol=1e-5, scale=None):
    """float32 results within rtol of the float64 reference, relative to the tensor's magnitude
    (an absolute floor: sums that cancel to ~0 carry the rounding of their terms)."""
    scale = float(expected.abs().max()) if scale is None else scale
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * max(1.0, scale))


def assert_within_twice_eager(actual, expected, eager, what=""):
    """Low precision: at most twice the error of eager PyTorch computed in the same dtype."""
    err = (actual.double() - expected).abs().max().item()
    eager_err = (eager.double() - expected).abs().max().item()
    # The floor covers tensors that eager happens to round exactly (eager_err == 0).
    floor = torch.finfo(actual.dtype).eps * max(1.0, expected.abs().max().item())
    assert err <= 2 * eager_err + floor, f"{what}: max error {err:.3g} > 2 x eager's {eager_err:.3g} (+{floor:.3g})"


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_max_error(actual, expected, *, eager=None, floor=None, what=""):
    """The largest error against the float64 `expected`: float32 (eager None) within 1e-5 of the
    largest magnitude (at least 1); low precision at most twice the largest error of `eager` (the
    same computed by eager PyTorch in that dtype), floored at `floor` (default one eps of the
    largest magnitude)."""
    err = max_error(actual, expected)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if eager is None:
        bound = 1e-5 * max(1.0, scale)
    else:
        floor = torch.finfo(actual.dtype).eps * scale if floor is None else floor
        bound = 2.0 * max(max_error(eager, expected), floor)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def stats_tolerance(dtype):
    """Batch and running statistics of an x in `dtype` (float32 sums of its widened values; running
    statistics in that dtype for float16 / bfloat16 BatchNorm tensors)."""
    return 1e-5 if dtype == torch.float32 else 2e-2


# Running statistics kept in float32 for a float16 / bfloat16 input.
HALF_INPUT_FLOAT32_STATS_TOL = 1e-2


def assert_stats_close(actual, expected, tol, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=what or None)


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty inside fills floats with NaN, so elements a kernel fails to write show."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def off_the_kinks(grad_out, inputs, *, stride=1, padding=1, eps=1e-5, training, margin=1e-4):
    """grad_out with zeros where the float64 BatchNorm output lies within `margin` of ReLU6's kinks
    (0 and 6). There float32 rounding may put the kernel's pre-activation on the other side of
    the clamp than float64's, so the two pass or stop that position's gradient differently: at
    millions of positions (the network's shapes) some land that close. Zero gradient there makes
    the result the same on both sides."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = inputs
    z = conv64(inputs, stride, padding)
    if training:
        mean, invstd = batch_stats(z, eps)
    else:
        mean, invstd = running_mean.double(), torch.rsqrt(running_var.double() + eps)
    normed = ((z - mean[None, :, None, None]) * invstd[None, :, None, None] * bn_weight.double()[None, :, None, None]
              + bn_bias.double()[None, :, None, None])
    near = ((normed.abs() < margin) | ((normed - 6).abs() < margin)).to(grad_out.device)
    return grad_out.masked_fill(near, 0.0)


def float64_gradients(inputs, grad_out, *, stride=1, padding=1, eps=1e-5, training):
    """Gradients of (x, weight, bias, bn_weight, bn_bias) by float64 autograd of the reference, and
    for each the float64 sum of |terms| its reduction adds up: a float32 sum's error scales with
    that, not with the (possibly cancelling) result. Without a conv bias, the bias gradient is that
    of a zero bias, sum(grad_z): what the backward ops return whether or not there is a bias."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = inputs
    channels = x.shape[1]
    if bias is None:
        bias = torch.zeros(channels, dtype=torch.float64, device=x.device)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, bn_weight, bn_bias)]
    x64, w64, b64, bnw64, bnb64 = leaves
    z = F.conv2d(x64, w64, b64, stride, padding, 1, channels)
    z.retain_grad()
    normed = F.batch_norm(z, running_mean.double().clone(), running_var.double().clone(), bnw64, bnb64, training,
                          0.1, eps)
    normed.retain_grad()
    F.relu6(normed).backward(grad_out.double())
    grads = [t.grad for t in leaves]
    gz, gy = z.grad.abs(), normed.grad.abs()
    xhat = (normed.detach() - bnb64.detach()[None, :, None, None]) / bnw64.detach()[None, :, None, None]
    if training:
        # With batch statistics grad_z = bn_weight * invstd * (gy - mean(gy) - xhat * mean(gy * xhat)):
        # itself a cancelling sum (exactly 0 for two values per channel but for eps), whose float32
        # error scales with its terms, not its value.
        signed_gy = normed.grad
        _, invstd = batch_stats(z.detach(), eps)
        scale = (bnw64.detach() * invstd).abs()[None, :, None, None]
        gz = scale * (gy + signed_gy.mean((0, 2, 3), keepdim=True).abs()
                      + xhat.abs() * (signed_gy * xhat).mean((0, 2, 3), keepdim=True).abs())
    # grad_x is the transposed conv of grad_z: with batch statistics its terms are those of grad_z
    # (with only a few values a channel, grad_x is small where the terms are not).
    x_terms = (torch.nn.grad.conv2d_input(tuple(x.shape), w64.detach().abs(), gz, stride, padding, 1, channels)
               if training else None)
    term_sums = [
        x_terms,
        torch.nn.grad.conv2d_weight(x64.detach().abs(), tuple(weight.shape), gz, stride, padding, 1, channels),
        gz.sum((0, 2, 3)),
        (gy * xhat.abs()).sum((0, 2, 3)),
        gy.sum((0, 2, 3)),
    ]
    return grads, term_sums


def assert_grad_close_fp32(name, actual, expected, term_sum, grad_x_scale, rtol=1e-5):
    """float32 gradient within rtol of float64: relative to its value plus, for reductions, the
    sum of |terms| per element; grad_x relative to its largest magnitude (plus its terms, where
    given: with batch statistics)."""
    actual = actual.double().reshape(expected.shape)
    if term_sum is None:
        bound = rtol * (expected.abs() + max(1.0, grad_x_scale))
    elif name == "x":
        bound = rtol * (expected.abs() + max(1.0, grad_x_scale) + term_sum.reshape(expected.shape))
    else:
        bound = rtol * (expected.abs() + term_sum.reshape(expected.shape) + 1.0)
    excess = (actual - expected).abs() - bound
    worst = int(excess.argmax())
    assert float(excess.max()) <= 0, (
        f"{name}: |{actual.flatten()[worst]:.8g} - {expected.flatten()[worst]:.8g}| exceeds {bound.flatten()[worst]:.3g}")
