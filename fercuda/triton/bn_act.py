"""BatchNorm + ReLU6 (or identity) + residual add in Triton, registered as torch ops.

Ops (schemas mirror the C++ family in csrc/ops.cpp, the same fakes and autograd):
  fercuda::batch_norm_act_triton           inference, one pass
  fercuda::batch_norm_act_train_triton     training forward, two passes (statistics; apply); returns
                                           the updated running statistics (functional, as the C++ op)
  fercuda::batch_norm_act_backward_triton  backward, two passes (reductions; grad_x)

Reductions are deterministic: each program reduces a (channel block, position chunk) tile pair to
its own slot (a chunk's mean and M2, or its gradient sums), and the slots are merged in float64 in a
fixed order. The kernels run on CUDA tensors and, with TRITON_INTERPRET=1 set before import, on
CPU tensors. This module launches kernels only; fercuda.ops.batch_norm_act is the entry point.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fercuda import _autograd, _checks, _meta

# ---------------------------------------------------------------------------------------------
# Kernels
#
# x is addressed as (N, C, P) with P = H * W positions: element (n, c, p) at n * s_n + c * s_c +
# p * s_p (NCHW: s_c = P, s_p = 1; channels_last: s_c = 1, s_p = C). Flat positions q = n * P + p.


@triton.jit
def _tile_offsets(q, c, P, s_n, s_c, s_p):
    return (q // P)[:, None].to(tl.int64) * s_n + (q % P)[:, None].to(tl.int64) * s_p + c[None, :].to(tl.int64) * s_c


@triton.jit
def _bn_act_reduce_kernel(
    part_ptr, x_ptr, g_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    C, P, positions, chunk, s_n, s_c, s_p,
    KIND: tl.constexpr, RELU6: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """KIND 0: the chunk's count, mean and M2 of x per channel (two sweeps: the sum, then the
    deviations from the chunk's mean). KIND 1: the chunk's sum(ga) and sum(ga * xhat), ga = g where
    the activation passes it. Slot (split, c) of part_ptr holds 3 values."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    split = tl.program_id(1)
    start = split * chunk
    end = tl.minimum(start + chunk, positions)
    acc0 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    if KIND == 0:
        for q0 in range(start, end, BLOCK_P):
            q = q0 + tl.arange(0, BLOCK_P)
            ok = (q < end)[:, None] & c_ok[None, :]
            acc0 += tl.load(x_ptr + _tile_offsets(q, c, P, s_n, s_c, s_p), mask=ok, other=0.0).to(tl.float32)
        count = (end - start).to(tl.float32)
        mean = tl.sum(acc0, axis=0) / count
        for q0 in range(start, end, BLOCK_P):
            q = q0 + tl.arange(0, BLOCK_P)
            ok = (q < end)[:, None] & c_ok[None, :]
            v = tl.load(x_ptr + _tile_offsets(q, c, P, s_n, s_c, s_p), mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, v - mean[None, :], 0.0)
            acc1 += d * d
        tl.store(part_ptr + (split * C + c) * 3, count + tl.zeros_like(mean), mask=c_ok)
        tl.store(part_ptr + (split * C + c) * 3 + 1, mean, mask=c_ok)
        tl.store(part_ptr + (split * C + c) * 3 + 2, tl.sum(acc1, axis=0), mask=c_ok)
    else:
        mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :]
        inv = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)[None, :]
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
        for q0 in range(start, end, BLOCK_P):
            q = q0 + tl.arange(0, BLOCK_P)
            ok = (q < end)[:, None] & c_ok[None, :]
            offs = _tile_offsets(q, c, P, s_n, s_c, s_p)
            v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if RELU6:
                a = v * scale + shift
                g = tl.where((a > 0.0) & (a < 6.0), g, 0.0)
            acc0 += g
            acc1 += g * ((v - mu) * inv)
        tl.store(part_ptr + (split * C + c) * 3, tl.sum(acc0, axis=0), mask=c_ok)
        tl.store(part_ptr + (split * C + c) * 3 + 1, tl.sum(acc1, axis=0), mask=c_ok)


@triton.jit
def _channel_of(i, C, P, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return i % C
    else:
        return (i // P) % C


@triton.jit
def _bn_act_apply_kernel(
    y_ptr, x_ptr, r_ptr, scale_ptr, shift_ptr, total, C, P,
    CHANNELS_LAST: tl.constexpr, RELU6: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = act(x * scale + shift) (+ r), x, r and y contiguous in one layout."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    c = _channel_of(i, C, P, CHANNELS_LAST)
    a = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32) * tl.load(scale_ptr + c, mask=ok, other=0.0) \
        + tl.load(shift_ptr + c, mask=ok, other=0.0)
    if RELU6:
        a = tl.where(a < 0.0, 0.0, tl.where(a > 6.0, 6.0, a))  # NaN propagates, as F.relu6
    if HAS_RESIDUAL:
        a += tl.load(r_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, a.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bn_act_grad_x_kernel(
    gx_ptr, g_ptr, x_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, k_ptr, total, C, P,
    CHANNELS_LAST: tl.constexpr, RELU6: tl.constexpr, BLOCK: tl.constexpr,
):
    """gx = k_ga * ga + k_xhat * xhat + k_one (k_ptr: (C, 3))."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    c = _channel_of(i, C, P, CHANNELS_LAST)
    v = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    if RELU6:
        a = v * tl.load(scale_ptr + c, mask=ok, other=0.0) + tl.load(shift_ptr + c, mask=ok, other=0.0)
        g = tl.where((a > 0.0) & (a < 6.0), g, 0.0)
    xhat = (v - tl.load(mean_ptr + c, mask=ok, other=0.0)) * tl.load(invstd_ptr + c, mask=ok, other=0.0)
    gx = tl.load(k_ptr + c * 3, mask=ok, other=0.0) * g + tl.load(k_ptr + c * 3 + 1, mask=ok, other=0.0) * xhat \
        + tl.load(k_ptr + c * 3 + 2, mask=ok, other=0.0)
    tl.store(gx_ptr + i, gx.to(gx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Host side

# Launch parameters, on a GPU and under the interpreter (where each program costs milliseconds):
# elements per program of the elementwise kernels; (positions, channels) tile of the reductions by
# layout (channels_last or not). fercuda.triton.resources compiles the GPU ones.
_BLOCK = {"gpu": 1024, "interpreter": 256}
_REDUCE_TILE = {"gpu": {False: (256, 1), True: (16, 32)}, "interpreter": {False: (32, 1), True: (8, 4)}}
_NUM_WARPS = 4


def _where(t):
    return "gpu" if t.is_cuda else "interpreter"


def _layout(x):
    """(memory format, channels_last?, x contiguous in it), by the fused block's rule."""
    channels_last = _checks.dwconv_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return fmt, channels_last, x.contiguous(memory_format=fmt)


def _reduce_plan(x, channels, positions, channels_last):
    """Tile sizes and the splits of the positions: enough programs to fill a GPU several times, few
    under the interpreter, but more than one split whenever the positions allow, so the merge of
    the parts is exercised everywhere."""
    block_p, block_c = _REDUCE_TILE[_where(x)][channels_last]
    target = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    groups = triton.cdiv(channels, block_c)
    splits = max(1, triton.cdiv(target, groups))
    splits = min(splits, max(1, triton.cdiv(positions, block_p)), 65535)
    chunk = triton.cdiv(positions, splits)
    return block_p, block_c, groups, triton.cdiv(positions, chunk), chunk


def _reduce(kind, x_c, channels_last, relu6=False, g=None, stats=None):
    n, c, h, w = x_c.shape
    positions = n * h * w
    block_p, block_c, groups, splits, chunk = _reduce_plan(x_c, c, positions, channels_last)
    parts = torch.empty((splits, c, 3), device=x_c.device, dtype=torch.float32)
    mean, invstd, scale, shift = stats if stats is not None else (parts,) * 4
    s_n, s_c, s_p = (h * w * c, 1, c) if channels_last else (c * h * w, h * w, 1)
    _bn_act_reduce_kernel[(groups, splits)](
        parts, x_c, g if g is not None else x_c, mean, invstd, scale, shift,
        c, h * w, positions, chunk, s_n, s_c, s_p,
        KIND=kind, RELU6=relu6, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return parts.double()


def _elementwise_grid(total, x):
    return (triton.cdiv(total, _BLOCK[_where(x)]),)


def _apply(x_c, channels_last, residual, scale, shift, relu6, out):
    n, c, h, w = x_c.shape
    total = out.numel()
    _bn_act_apply_kernel[_elementwise_grid(total, x_c)](
        out, x_c, residual if residual is not None else x_c, scale, shift, total, c, h * w,
        CHANNELS_LAST=channels_last, RELU6=relu6, HAS_RESIDUAL=residual is not None, BLOCK=_BLOCK[_where(x_c)],
        num_warps=_NUM_WARPS,
    )


def _affine(weight, bias, mean, invstd):
    """(scale, shift) float32 from float64 arithmetic: a = x * scale + shift."""
    scale = weight.double() * invstd.double()
    return scale.float().contiguous(), (bias.double() - mean.double() * scale).float().contiguous()


def _check_args(op, x, weight, bias, mean, var, residual, mean_arg="running_mean", var_arg="running_var"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fercuda.{op}: argument 'x' must be a Tensor, got {type(x).__name__}")
    _checks.check_bn_act_args(op, x, weight, bias, mean, var, residual, False, mean_arg, var_arg)


@torch.library.custom_op("fercuda::batch_norm_act_triton", mutates_args=())
def batch_norm_act_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, residual: Optional[torch.Tensor] = None, relu6: bool = True, eps: float = 1e-5,
) -> torch.Tensor:
    op = "batch_norm_act_triton"
    _check_args(op, x, weight, bias, running_mean, running_var, residual)
    _checks.check_dwconv_eps(op, eps)
    fmt, channels_last, x_c = _layout(x)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    if out.numel() == 0:
        return out
    scale, shift = _affine(weight, bias, running_mean, torch.rsqrt(running_var.double() + eps))
    res = None if residual is None else residual.contiguous(memory_format=fmt)
    _apply(x_c, channels_last, res, scale, shift, relu6, out)
    return out


@torch.library.custom_op("fercuda::batch_norm_act_train_triton", mutates_args=())
def batch_norm_act_train_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, residual: Optional[torch.Tensor] = None, relu6: bool = True, eps: float = 1e-5,
    momentum: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fercuda::batch_norm_act_train: (out, save_mean, save_invstd, new_running_mean,
    new_running_var), the running statistics left as they are."""
    op = "batch_norm_act_train_triton"
    _check_args(op, x, weight, bias, running_mean, running_var, residual)
    _checks.check_dwconv_eps(op, eps)
    _checks.check_dwconv_momentum(op, momentum)
    fmt, channels_last, x_c = _layout(x)
    n, c, h, w = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    if out.numel() == 0:
        # nn.BatchNorm2d leaves the running statistics alone on an empty batch.
        stats = dict(device=x.device, dtype=torch.float32)
        return out, torch.zeros((c,), **stats), torch.ones((c,), **stats), running_mean.clone(), running_var.clone()
    _checks.check_bn_act_batch_stats(op, n, c, h, w)
    count, part_mean, part_m2 = _reduce(0, x_c, channels_last).unbind(-1)
    # Chan's merge of the parts' (count, mean, M2), in float64 and a fixed order.
    total = count.sum(0)
    mean = (count * part_mean).sum(0) / total
    m2 = part_m2.sum(0) + (count * (part_mean - mean) ** 2).sum(0)
    invstd = torch.rsqrt(m2 / total + eps)
    new_mean = (running_mean.double() * (1.0 - momentum) + mean * momentum).to(running_mean.dtype)
    new_var = (running_var.double() * (1.0 - momentum) + m2 / (total - 1) * momentum).to(running_var.dtype)
    scale, shift = _affine(weight, bias, mean, invstd)
    res = None if residual is None else residual.contiguous(memory_format=fmt)
    _apply(x_c, channels_last, res, scale, shift, relu6, out)
    return out, mean.float(), invstd.float(), new_mean, new_var


@torch.library.custom_op("fercuda::batch_norm_act_backward_triton", mutates_args=())
def batch_norm_act_backward_triton(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
    invstd: torch.Tensor, relu6: bool, training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "batch_norm_act_backward_triton"
    _check_args(op, x, weight, bias, mean, invstd, None, "mean", "invstd")
    _checks.check_bn_act_grad_out(op, grad_out, x)
    fmt, channels_last, x_c = _layout(x)
    n, c, h, w = x.shape
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    if x.numel() == 0:
        return grad_x, torch.zeros((c,), device=x.device, dtype=weight.dtype), \
            torch.zeros((c,), device=x.device, dtype=bias.dtype)
    g = grad_out.contiguous(memory_format=fmt)
    scale, shift = _affine(weight, bias, mean, invstd)
    mean_f, invstd_f = mean.float().contiguous(), invstd.float().contiguous()
    sums = _reduce(1, x_c, channels_last, relu6, g, (mean_f, invstd_f, scale, shift)).sum(0)
    sum_ga, sum_ga_xhat = sums[:, 0], sums[:, 1]
    k = torch.zeros((c, 3), device=x.device, dtype=torch.float64)
    k[:, 0] = weight.double() * invstd_f.double()
    if training:
        positions = n * h * w
        k[:, 1] = -k[:, 0] * sum_ga_xhat / positions
        k[:, 2] = -k[:, 0] * sum_ga / positions
    total = x.numel()
    _bn_act_grad_x_kernel[_elementwise_grid(total, x_c)](
        grad_x, g, x_c, mean_f, invstd_f, scale, shift, k.float().contiguous(), total, c, h * w,
        CHANNELS_LAST=channels_last, RELU6=relu6, BLOCK=_BLOCK[_where(x_c)], num_warps=_NUM_WARPS,
    )
    return grad_x, sum_ga_xhat.to(weight.dtype), sum_ga.to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd: the C++ ops', which the Triton ops' contract is.

_meta.register_bn_act_fakes("_triton", allow_double=False)
_autograd.register_bn_act_autograd("_triton")
