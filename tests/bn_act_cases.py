"""Inputs, the float64 eager reference and tolerances of the BatchNorm + ReLU6 + residual add tests
(tests/test_bn_act.py): their one home.

The reference is plain PyTorch, F.batch_norm then F.hardtanh(0, 6) then +, sharing no code with
the fused kernels.

The C++ CPU kernels on one instruction-set path are test backend "cpu_<path>" (isa_cases,
isa_backends; fercuda.set_cpu_isa, set by the autouse fixture of tests/test_bn_act.py): every path
this CPU can run, the others skipped with the reason. "cpu" takes the widest path.
"""

import pytest
import torch
import torch.nn.functional as F

import fercuda

CPU_ISAS = ("baseline", "avx2", "avx512", "avx512_bf16")

# (N, C, H, W) at the CPU kernels' vector edges, run on every path: N=1, 17 channels (a 16-lane
# vector and one more) over 15 positions (a plane shorter than a vector; channels_last, kernel rows
# of 8 image rows and a rest of 7); 19 channels over 12x13 (odd planes of whole vectors and an
# overlapping last one; kernel rows of 7 image rows, 133 lanes); 131 channels (channels_last, rows
# of 8 vectors and an overlapping ninth); 3 channels over 61x139 (planes of two parts; channels_last,
# four parts, the last with a rest).
ISA_SHAPES = [(1, 17, 5, 3), (2, 19, 12, 13), (2, 131, 3, 5), (1, 3, 61, 139)]


def _isa_skip(isa):
    supported = fercuda.supported_cpu_isas()
    return pytest.mark.skipif(isa not in supported, reason=f"this CPU cannot run the {isa} path (it runs {supported})")


def isa_cases(shapes):
    """(backend, shape) parameters of the C++ CPU kernels on every instruction-set path."""
    return [pytest.param(f"cpu_{isa}", shape, id=f"cpu_{isa}-{'x'.join(map(str, shape))}", marks=_isa_skip(isa))
            for isa in CPU_ISAS for shape in shapes]


def isa_backends():
    """backend parameters of the C++ CPU kernels on every instruction-set path."""
    return [pytest.param(f"cpu_{isa}", id=f"cpu_{isa}", marks=_isa_skip(isa)) for isa in CPU_ISAS]


def kernel_backend(backend):
    """fercuda.ops' backend= of a test backend ("cpu_avx2" -> "cpu")."""
    return backend.split("_")[0]


def sample_inputs(device, dtype, generator, *, n=2, c=3, h=5, w=7, channels_last=False, residual=True,
                  bn_dtype=None):
    """(x, weight, bias, running_mean, running_var, residual): x with a mean and scale per channel,
    as conv outputs have, whose BatchNorm outputs land on both sides of ReLU6's clamps as well as
    between them; residual None unless asked for."""
    bn_dtype = bn_dtype or dtype

    def randn(*shape, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset).to(device, dt)

    def rand(*shape, low, high, dt):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * (high - low) + low).to(device, dt)

    center = torch.randn(1, c, 1, 1, generator=generator, dtype=torch.float64)
    spread = torch.rand(1, c, 1, 1, generator=generator, dtype=torch.float64) * 2 + 0.25
    x = (torch.randn(n, c, h, w, generator=generator, dtype=torch.float64) * spread + center).to(device, dtype)
    res = randn(n, c, h, w) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        res = None if res is None else res.contiguous(memory_format=torch.channels_last)
    weight = rand(c, low=0.5, high=2.0, dt=bn_dtype)
    bias = randn(c, scale=2.0, offset=2.0, dt=bn_dtype)
    running_mean = randn(c, scale=0.3, dt=bn_dtype)
    running_var = rand(c, low=0.5, high=1.5, dt=bn_dtype)
    return x, weight, bias, running_mean, running_var, res


def reference(x, weight, bias, running_mean, running_var, residual=None, *, relu6=True, training=False,
              momentum=0.1, eps=1e-5, dtype=torch.float64, bn_dtype=None):
    """Eager PyTorch in `dtype`, the BatchNorm tensors in `bn_dtype` (default `dtype`); running_mean /
    running_var (when already in that dtype) are updated in place when training."""
    bn_dtype = bn_dtype or dtype

    def cast(t, dt):
        return None if t is None else t.to(dt)

    y = F.batch_norm(cast(x, dtype), cast(running_mean, bn_dtype), cast(running_var, bn_dtype),
                     cast(weight, bn_dtype), cast(bias, bn_dtype), training, momentum, eps)
    if relu6:
        y = F.hardtanh(y, 0.0, 6.0)
    return y if residual is None else y + residual.to(dtype)


def float64_gradients(inputs, grad_out, *, relu6=True, training, eps=1e-5):
    """Gradients of (x, weight, bias) by float64 autograd of the reference, and for each the
    float64 magnitude of the terms it is made of, per element: a float32 result's error scales with
    its terms, not with its (possibly cancelling) value."""
    x, weight, bias, running_mean, running_var, _ = inputs
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    x64, w64, b64 = leaves
    normed = F.batch_norm(x64, running_mean.double().clone(), running_var.double().clone(), w64, b64, training, 0.1,
                          eps)
    normed.retain_grad()
    (F.hardtanh(normed, 0.0, 6.0) if relu6 else normed).backward(grad_out.double())
    ga = normed.grad
    if training:
        mean = x64.detach().mean((0, 2, 3), keepdim=True)
        invstd = torch.rsqrt(x64.detach().var((0, 2, 3), unbiased=False, keepdim=True) + eps)
    else:
        mean = running_mean.double()[None, :, None, None]
        invstd = torch.rsqrt(running_var.double()[None, :, None, None] + eps)
    xhat = (x64.detach() - mean) * invstd
    k = (w64.detach()[None, :, None, None] * invstd).abs()
    if training:
        x_terms = k * (ga.abs() + ga.mean((0, 2, 3), keepdim=True).abs()
                       + xhat.abs() * (ga * xhat).mean((0, 2, 3), keepdim=True).abs())
    else:
        x_terms = k * ga.abs()
    terms = [x_terms, (ga * xhat).abs().sum((0, 2, 3)), ga.abs().sum((0, 2, 3))]
    return [t.grad for t in leaves], terms


def assert_grads_close_fp32(names, grads, expected, terms, rtol=1e-5):
    """float32 gradients within rtol of float64, relative to their value plus their terms, plus an
    absolute floor: rtol times the largest grad_x term where grad_x is among them (its cancellations),
    else rtol."""
    floor = rtol * float(terms[0].max()) if names[0] == "x" else rtol
    for name, got, exp, term in zip(names, grads, expected, terms):
        got = got.double().reshape(exp.shape)
        bound = rtol * (exp.abs() + term) + floor
        excess = (got - exp).abs() - bound
        worst = int(excess.argmax())
        assert float(excess.max()) <= 0, (
            f"{name}: |{got.flatten()[worst]:.8g} - {exp.flatten()[worst]:.8g}| exceeds {bound.flatten()[worst]:.3g}")


def eager_gradients(inputs, grad_out, dtype, *, relu6=True, training, bn_dtype=None):
    """Gradients of (x, weight, bias) by autograd of eager PyTorch in `dtype` (BatchNorm tensors in
    bn_dtype): the error eager PyTorch makes in that precision."""
    bn_dtype = bn_dtype or dtype
    x, weight, bias, running_mean, running_var, residual = inputs
    leaves = [x.detach().to(dtype).requires_grad_(), weight.detach().to(bn_dtype).requires_grad_(),
              bias.detach().to(bn_dtype).requires_grad_()]
    out = reference(leaves[0], leaves[1], leaves[2], running_mean.to(bn_dtype).clone(), running_var.to(bn_dtype).clone(),
                    None if residual is None else residual.to(dtype), relu6=relu6, training=training, dtype=dtype,
                    bn_dtype=bn_dtype)
    out.backward(grad_out.to(dtype))
    return [t.grad for t in leaves]


def off_the_kinks(grad_out, inputs, *, training, eps=1e-5, margin=1e-4):
    """grad_out with zeros where the float64 BatchNorm output lies within `margin` of ReLU6's kinks,
    where float32 rounding may put the kernel's value on the other side of the clamp."""
    x, weight, bias, running_mean, running_var, _ = inputs
    x64 = x.double()
    normed = F.batch_norm(x64, running_mean.double().clone(), running_var.double().clone(), weight.double(),
                          bias.double(), training, 0.1, eps)
    near = ((normed.abs() < margin) | ((normed - 6).abs() < margin)).to(grad_out.device)
    return grad_out.masked_fill(near, 0.0)
