"""Fused depthwise 3x3 conv + BatchNorm + ReLU6 in Triton, registered as torch ops.

Ops (schemas mirror the C++ family in csrc/ops.cpp):
  fercuda::dwconv_bn_relu6_triton           inference, one pass (BatchNorm folded into the conv)
  fercuda::dwconv_bn_relu6_train_triton     training forward, two passes; returns the updated running
                                            statistics (functional, as the C++ op)
  fercuda::dwconv_bn_relu6_backward_triton  backward, three passes

Passes, as in the CUDA kernels: the training forward computes per-channel statistics of the
conv output in pass 1 without storing it and recomputes the conv in pass 2 to normalize; the
backward reduces sum(gy), sum(gy * xhat) in pass 1, stores gz = d loss / d conv output and
reduces grad_weight / grad_bias in pass 2, and runs the transposed conv over gz in pass 3 (each
grad_x element needs gz at up to 9 positions: storing gz once beats recomputing it 9 times).
Per-channel reductions are deterministic: every program writes its partial result to its own
slot and the slots are summed in a fixed order.

The kernels run on CUDA tensors and, with TRITON_INTERPRET=1 set before import, on CPU tensors.
This module launches kernels only; fercuda.ops.dwconv_bn_relu6(..., backend="triton") is the entry
point.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fercuda import _autograd, _checks, _meta

_OP = "dwconv_bn_relu6"


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _block_nchw_index(total, C, H, W, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's BLOCK flat indices into an (N, C, H, W) tensor stored NCHW or channels_last,
    split into (n, c, h, w), and the mask of those inside it."""
    if INDEX_64:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if CHANNELS_LAST:
        c = i % C
        t = i // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
    else:
        w = i % W
        t = i // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
    return i, i < total, n, c, h, w


@triton.jit
def _load_taps(x_ptr, n, c, ho, wo, mask, H, W, sxn, sxc, sxh, sxw, STRIDE: tl.constexpr, PAD: tl.constexpr):
    """The 3x3 input window of each output position in a 2-D tile, as [P, C, 16] float32
    (taps 9..15 and out-of-image taps are zero)."""
    tap = tl.arange(0, 16)[None, None, :]
    hi = (ho * STRIDE - PAD)[:, :, None] + tap // 3
    wi = (wo * STRIDE - PAD)[:, :, None] + tap % 3
    ok = mask[:, :, None] & (tap < 9) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    base = (n * sxn + c * sxc)[:, :, None]
    return tl.load(x_ptr + base + hi * sxh + wi * sxw, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _dwconv_bn_relu6_apply_kernel(
    y_ptr, x_ptr, w_ptr, b_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, eps, total,
    C, H, W, HO, WO, sxn, sxc, sxh, sxw,
    HAS_BIAS: tl.constexpr, FROM_RUNNING: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
):
    """y = relu6(conv(x) * scale + shift) over BLOCK outputs in the output's memory order.
    FROM_RUNNING: scale/shift folded here from (bn_weight, bn_bias, running_mean, running_var,
    bias); otherwise p0/p1 hold them (training pass 2). INDEX_64: offsets may pass 2**31."""
    i, mask, n, c, ho, wo = _block_nchw_index(total, C, HO, WO, CHANNELS_LAST, BLOCK, INDEX_64)
    base = n * sxn + c * sxc
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for kh in tl.static_range(3):
        hi = ho * STRIDE - PAD + kh
        row_ok = mask & (hi >= 0) & (hi < H)
        for kw in tl.static_range(3):
            wi = wo * STRIDE - PAD + kw
            ok = row_ok & (wi >= 0) & (wi < W)
            xv = tl.load(x_ptr + base + hi * sxh + wi * sxw, mask=ok, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + c * 9 + (kh * 3 + kw), mask=mask, other=0.0).to(tl.float32)
            acc += xv * wv
    if FROM_RUNNING:
        gamma = tl.load(p0_ptr + c, mask=mask, other=0.0).to(tl.float32)
        beta = tl.load(p1_ptr + c, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(p2_ptr + c, mask=mask, other=0.0).to(tl.float32)
        var = tl.load(p3_ptr + c, mask=mask, other=1.0).to(tl.float32)
        scale = gamma / tl.sqrt_rn(var + eps)
        if HAS_BIAS:
            mean = mean - tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        shift = beta - mean * scale
    else:
        scale = tl.load(p0_ptr + c, mask=mask, other=0.0)
        shift = tl.load(p1_ptr + c, mask=mask, other=0.0)
    y = tl.minimum(tl.maximum(acc * scale + shift, 0.0), 6.0)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_reduce_kernel(
    slots_ptr, slots_w_ptr, gz_ptr, x_ptr, w_ptr, b_ptr, g_ptr, bnw_ptr, bnb_ptr, mean_ptr, invstd_ptr, coef_ptr,
    C, H, W, HO, WO, positions, chunk,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-channel partial reductions over one split of the N*Ho*Wo positions.
    KIND 0 (training pass 1): (count, mean, M2) of the conv output without bias, from sums
        shifted by the conv at the split's first position (a sample keeps them well-conditioned).
    KIND 1 (backward pass 1): sum(gy), sum(gy * xhat), gy = grad_out masked by ReLU6.
    KIND 2 (backward pass 2): stores gz; sum(gz) and sum(gz * x_tap) for the 9 taps."""
    c1 = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1).to(tl.int64)
    cmask1 = c1 < C
    c = c1[None, :]
    cmask = cmask1[None, :]
    tap = tl.arange(0, 16)
    w_taps = tl.load(w_ptr + c1[:, None] * 9 + tap[None, :], mask=cmask1[:, None] & (tap[None, :] < 9),
                     other=0.0).to(tl.float32)[None, :, :]
    p_begin = split * chunk
    p_end = tl.minimum(p_begin + chunk, positions)
    hwo = HO * WO

    if KIND == 0:
        n0 = p_begin // hwo
        r0 = p_begin % hwo
        zero = tl.zeros([1, BLOCK_C], dtype=tl.int64)
        first = _load_taps(x_ptr, zero + n0, c, zero + r0 // WO, zero + r0 % WO, cmask, H, W, sxn, sxc, sxh, sxw,
                           STRIDE, PAD)
        shift = tl.sum(first * w_taps, axis=2)
    else:
        conv_bias = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            conv_bias = tl.load(b_ptr + c1, mask=cmask1, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + c1, mask=cmask1, other=0.0)[None, :]
        invstd = tl.load(invstd_ptr + c1, mask=cmask1, other=0.0)[None, :]
        gamma = tl.load(bnw_ptr + c1, mask=cmask1, other=0.0)[None, :]
        beta = tl.load(bnb_ptr + c1, mask=cmask1, other=0.0)[None, :]
        conv_bias = conv_bias[None, :]
        if KIND == 2:
            k = tl.load(coef_ptr + c1 * 3 + 0, mask=cmask1, other=0.0)[None, :]
            mean_gy = tl.load(coef_ptr + c1 * 3 + 1, mask=cmask1, other=0.0)[None, :]
            mean_gyx = tl.load(coef_ptr + c1 * 3 + 2, mask=cmask1, other=0.0)[None, :]

    acc0 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_P, BLOCK_C, 16], dtype=tl.float32)
    for start in range(p_begin, p_end, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P).to(tl.int64)[:, None]
        m = (p < p_end) & cmask
        n = p // hwo
        r = p % hwo
        ho = r // WO
        wo = r % WO
        taps = _load_taps(x_ptr, n + 0 * c, c + 0 * n, ho + 0 * c, wo + 0 * c, m, H, W, sxn, sxc, sxh, sxw,
                          STRIDE, PAD)
        conv = tl.sum(taps * w_taps, axis=2)
        if KIND == 0:
            d = tl.where(m, conv - shift, 0.0)
            acc0 += d
            acc1 += d * d
        else:
            y_off = n * syn + c * syc + ho * syh + wo * syw
            xhat = (conv + conv_bias - mean) * invstd
            pre = xhat * gamma + beta
            gy = tl.load(g_ptr + y_off, mask=m & (pre > 0.0) & (pre < 6.0), other=0.0).to(tl.float32)
            if KIND == 1:
                acc0 += gy
                acc1 += gy * xhat
            else:
                gz = tl.where(m, k * (gy - mean_gy - xhat * mean_gyx), 0.0)
                tl.store(gz_ptr + y_off, gz, mask=m)
                acc0 += gz
                acc_w += gz[:, :, None] * taps

    if KIND == 0:
        count = (p_end - p_begin).to(tl.float32)
        s = tl.sum(acc0, axis=0)
        ss = tl.sum(acc1, axis=0)
        shift1 = tl.sum(shift, axis=0)
        slot = (split * C + c1) * 3
        tl.store(slots_ptr + slot + 0, tl.zeros([BLOCK_C], dtype=tl.float32) + count, mask=cmask1)
        tl.store(slots_ptr + slot + 1, shift1 + s / count, mask=cmask1)
        tl.store(slots_ptr + slot + 2, tl.maximum(ss - s * (s / count), 0.0), mask=cmask1)
    elif KIND == 1:
        slot = (split * C + c1) * 2
        tl.store(slots_ptr + slot + 0, tl.sum(acc0, axis=0), mask=cmask1)
        tl.store(slots_ptr + slot + 1, tl.sum(acc1, axis=0), mask=cmask1)
    else:
        tl.store(slots_ptr + split * C + c1, tl.sum(acc0, axis=0), mask=cmask1)
        w_slot = (split * C + c1)[:, None] * 16 + tap[None, :]
        tl.store(slots_w_ptr + w_slot, tl.sum(acc_w, axis=0), mask=cmask1[:, None])


@triton.jit
def _dwconv_grad_input_kernel(
    gx_ptr, gz_ptr, w_ptr, total, C, H, W, HO, WO, syn, syc, syh, syw,
    CHANNELS_LAST: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """grad_x = transposed depthwise conv of gz, BLOCK input elements in x's memory order."""
    i, mask, n, c, hi, wi = _block_nchw_index(total, C, H, W, CHANNELS_LAST, BLOCK, INDEX_64)
    base = n * syn + c * syc
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for kh in tl.static_range(3):
        # Output row ho reads input row ho * STRIDE - PAD + kh.
        th = hi + PAD - kh
        ho = th // STRIDE
        row_ok = mask & (th >= 0) & (th % STRIDE == 0) & (ho < HO)
        for kw in tl.static_range(3):
            tw = wi + PAD - kw
            wo = tw // STRIDE
            ok = row_ok & (tw >= 0) & (tw % STRIDE == 0) & (wo < WO)
            g = tl.load(gz_ptr + base + ho * syh + wo * syw, mask=ok, other=0.0)
            wv = tl.load(w_ptr + c * 9 + (kh * 3 + kw), mask=mask, other=0.0).to(tl.float32)
            acc += g * wv
    tl.store(gx_ptr + i, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side


def _check_args(op, x, weight, bias, bn_weight, bn_bias, stat_a, stat_a_name, stat_b, stat_b_name, stride, padding):
    """The C++ ops' checks (fercuda._checks); float64 is not among the Triton kernels' dtypes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fercuda.{op}: argument 'x' must be a Tensor, got {type(x).__name__}")
    return _checks.dwconv_out_shape(op, x, weight, bias, bn_weight, bn_bias, stat_a, stat_b, stride, padding,
                                    stat_a_name, stat_b_name, allow_double=False)


def _layout(x):
    """(memory format, channels_last?, x contiguous in it) — channels_last where x's strides say so."""
    channels_last = _checks.dwconv_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return fmt, channels_last, x.contiguous(memory_format=fmt)


def _strides(t):
    """Element strides (n, c, h, w) of a 4-D tensor in either memory format."""
    return tuple(int(s) for s in t.stride())


# Launch parameters, on a GPU and under the interpreter (where each program costs milliseconds):
# elements per program of the elementwise kernels, (positions, channels) tile of the reductions
# by layout (channels_last or not). fercuda.triton.resources compiles the GPU ones.
# The grad_input kernel's GPU block halves with 64-bit indices (_grad_input_block): at 1024
# elements, 8 a thread, the 64-bit index arithmetic of its 9 taps needs more than 255 registers
# in channels_last at stride 2, which then spills (48-56 B with Triton 3.6 on sm_90). The apply
# kernel keeps 1024: at 512 ptxas spills it instead (up to 104 B, Triton 3.8).
_BLOCK = {"gpu": 1024, "interpreter": 256}
_REDUCE_TILE = {"gpu": {False: (256, 1), True: (8, 32)}, "interpreter": {False: (32, 1), True: (8, 4)}}
_NUM_WARPS = 4


def _where(t):
    return "gpu" if t.is_cuda else "interpreter"


def _grad_input_block(where, index_64):
    """Elements per program of the grad_input kernel."""
    return _BLOCK[where] // 2 if index_64 and where == "gpu" else _BLOCK[where]


def _reduce_plan(x, channels, positions, channels_last):
    """Tile sizes and the splits of the positions: enough programs to fill a GPU several times,
    few under the interpreter, but more than one split whenever the positions allow, so the
    merge of partial results is exercised everywhere."""
    block_p, block_c = _REDUCE_TILE[_where(x)][channels_last]
    if x.is_cuda:
        target = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4
    groups = triton.cdiv(channels, block_c)
    splits = max(1, triton.cdiv(target, groups))
    splits = min(splits, max(1, triton.cdiv(positions, block_p)), 65535)
    chunk = triton.cdiv(positions, splits)
    return block_p, block_c, groups, triton.cdiv(positions, chunk), chunk


def _needs_int64(*tensors):
    """Whether element offsets (plus a block of slack) may overflow int32; 32-bit index
    arithmetic is several times cheaper on a GPU."""
    return max(t.numel() for t in tensors) >= 2**31 - 4096


def _apply(x_c, channels_last, weight, bias, p, from_running, eps, stride, padding, out):
    n, c, h, w = x_c.shape
    ho, wo = out.shape[2], out.shape[3]
    total = out.numel()
    index_64 = _needs_int64(x_c, out)
    block = _BLOCK[_where(x_c)]
    dummy = p[0]
    _dwconv_bn_relu6_apply_kernel[(triton.cdiv(total, block),)](
        out, x_c, weight, bias if bias is not None else dummy, p[0], p[1],
        p[2] if from_running else dummy, p[3] if from_running else dummy, float(eps), total,
        c, h, w, ho, wo, *_strides(x_c),
        HAS_BIAS=bias is not None, FROM_RUNNING=from_running, CHANNELS_LAST=channels_last,
        STRIDE=stride, PAD=padding, BLOCK=block, INDEX_64=index_64, num_warps=_NUM_WARPS,
    )


def _reduce(kind, x_c, channels_last, weight, bias, ho, wo, stride, padding, *, g=None, bn=None, coef=None,
            gz=None):
    n, c, h, w = x_c.shape
    positions = n * ho * wo
    block_p, block_c, groups, splits, chunk = _reduce_plan(x_c, c, positions, channels_last)
    f32 = dict(device=x_c.device, dtype=torch.float32)
    width = {0: 3, 1: 2, 2: 1}[kind]
    slots = torch.empty((splits, c, width), **f32)
    slots_w = torch.empty((splits, c, 16), **f32) if kind == 2 else slots
    dummy = slots
    bn_weight, bn_bias, mean, invstd = bn if bn is not None else (dummy,) * 4
    y_strides = _strides(gz) if gz is not None else (_strides(g) if g is not None else (0, 0, 0, 0))
    _dwconv_reduce_kernel[(groups, splits)](
        slots, slots_w, gz if gz is not None else dummy, x_c, weight, bias if bias is not None else dummy,
        g if g is not None else dummy, bn_weight, bn_bias, mean, invstd, coef if coef is not None else dummy,
        c, h, w, ho, wo, positions, chunk, *_strides(x_c), *y_strides,
        KIND=kind, HAS_BIAS=bias is not None, STRIDE=stride, PAD=padding, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=_NUM_WARPS,
    )
    return slots, slots_w


def _float(t):
    return t.to(torch.float32).contiguous()


@torch.library.custom_op("fercuda::dwconv_bn_relu6_triton", mutates_args=())
def dwconv_bn_relu6_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: torch.Tensor,
    bn_bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, stride: int = 1,
    padding: int = 1, eps: float = 1e-5,
) -> torch.Tensor:
    op = "dwconv_bn_relu6_triton"
    _check_args(op, x, weight, bias, bn_weight, bn_bias, running_mean, "running_mean", running_var, "running_var",
                stride, padding)
    _checks.check_dwconv_eps(op, eps)
    fmt, channels_last, x_c = _layout(x)
    n, c, h, w = x.shape
    out = torch.empty((n, c, _checks.dwconv_out_size(h, stride, padding), _checks.dwconv_out_size(w, stride, padding)), device=x.device,
                      dtype=x.dtype, memory_format=fmt)
    if out.numel() == 0:
        return out
    params = (_float(bn_weight), _float(bn_bias), _float(running_mean), _float(running_var))
    _apply(x_c, channels_last, weight.contiguous(), None if bias is None else bias.contiguous(), params, True, eps,
           stride, padding, out)
    return out


@torch.library.custom_op("fercuda::dwconv_bn_relu6_train_triton", mutates_args=())
def dwconv_bn_relu6_train_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: torch.Tensor,
    bn_bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, stride: int = 1,
    padding: int = 1, eps: float = 1e-5, momentum: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fercuda::dwconv_bn_relu6_train: (out, save_mean, save_invstd, new_running_mean,
    new_running_var, save_z), the running statistics left as they are; save_z empty (the
    backward computes the conv again)."""
    op = "dwconv_bn_relu6_train_triton"
    _check_args(op, x, weight, bias, bn_weight, bn_bias, running_mean, "running_mean", running_var, "running_var",
                stride, padding)
    _checks.check_dwconv_eps(op, eps)
    _checks.check_dwconv_momentum(op, momentum)
    fmt, channels_last, x_c = _layout(x)
    n, c, h, w = x.shape
    ho, wo = _checks.dwconv_out_size(h, stride, padding), _checks.dwconv_out_size(w, stride, padding)
    out = torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype, memory_format=fmt)
    if out.numel() == 0:
        # nn.BatchNorm2d leaves the running statistics alone on an empty batch.
        stats = dict(device=x.device, dtype=torch.float32)
        return (out, torch.zeros((c,), **stats), torch.ones((c,), **stats), running_mean.clone(), running_var.clone(),
                torch.empty((0,), **stats))
    _checks.check_dwconv_batch_stats(op, n, c, ho, wo)
    weight_c = weight.contiguous()
    slots, _ = _reduce(0, x_c, channels_last, weight_c, None, ho, wo, stride, padding)
    # Chan's merge of the per-split (count, mean, M2), in float64 and a fixed order.
    count, split_mean, split_m2 = slots.double().unbind(-1)
    total = count.sum(0)
    mean = (count * split_mean).sum(0) / total
    m2 = split_m2.sum(0) + (count * (split_mean - mean) ** 2).sum(0)
    invstd = torch.rsqrt(m2 / total + eps)
    mean_z = mean + (bias.double() if bias is not None else 0.0)
    # nn.BatchNorm2d's update, with the unbiased variance, in float64 as the C++ kernels do.
    new_mean = (running_mean.double() * (1.0 - momentum) + mean_z * momentum).to(running_mean.dtype)
    new_var = (running_var.double() * (1.0 - momentum) + m2 / (total - 1) * momentum).to(running_var.dtype)
    scale = bn_weight.double() * invstd
    shift = bn_bias.double() - mean * scale
    _apply(x_c, channels_last, weight_c, None, (scale.float(), shift.float()), False, eps, stride, padding, out)
    return out, mean_z.float(), invstd.float(), new_mean, new_var, mean_z.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("fercuda::dwconv_bn_relu6_backward_triton", mutates_args=())
def dwconv_bn_relu6_backward_triton(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, stride: int,
    padding: int, training: bool, z: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "dwconv_bn_relu6_backward_triton"
    _check_args(op, x, weight, bias, bn_weight, bn_bias, mean, "mean", invstd, "invstd", stride, padding)
    n, c, h, w = x.shape
    ho, wo = _checks.dwconv_out_size(h, stride, padding), _checks.dwconv_out_size(w, stride, padding)
    _checks.check_dwconv_grad_out(op, grad_out, x, (n, c, ho, wo))
    _checks.check_dwconv_saved_z(op, z, x, (n, c, ho, wo))  # checked, not read: the conv is computed again
    fmt, channels_last, x_c = _layout(x)
    positions = n * ho * wo
    grad_x = torch.empty_like(x_c, memory_format=fmt)
    if x.numel() == 0 or positions == 0:
        return (grad_x.zero_(), torch.zeros_like(weight), torch.zeros((c,), device=x.device, dtype=weight.dtype),
                torch.zeros_like(bn_weight), torch.zeros_like(bn_bias))
    g = grad_out.contiguous(memory_format=fmt)
    weight_c = weight.contiguous()
    bias_c = None if bias is None else bias.contiguous()
    bn_weight_f, invstd_f = _float(bn_weight), _float(invstd)
    bn = (bn_weight_f, _float(bn_bias), _float(mean), invstd_f)
    slots, _ = _reduce(1, x_c, channels_last, weight_c, bias_c, ho, wo, stride, padding, g=g, bn=bn)
    sums = slots.double().sum(0)
    sum_gy, sum_gyx = sums[:, 0], sums[:, 1]
    coef = torch.zeros((c, 3), device=x.device, dtype=torch.float64)
    coef[:, 0] = bn_weight_f.double() * invstd_f.double()
    if training:
        coef[:, 1] = sum_gy / positions
        coef[:, 2] = sum_gyx / positions
    gz = torch.empty((n, c, ho, wo), device=x.device, dtype=torch.float32, memory_format=fmt)
    slots_b, slots_w = _reduce(2, x_c, channels_last, weight_c, bias_c, ho, wo, stride, padding, g=g, bn=bn,
                               coef=coef.float().contiguous(), gz=gz)
    grad_bias = slots_b.double().sum(0)[:, 0].to(weight.dtype)
    grad_weight = slots_w.double().sum(0)[:, :9].reshape(c, 1, 3, 3).to(weight.dtype)
    total = grad_x.numel()
    index_64 = _needs_int64(grad_x, gz)
    block = _grad_input_block(_where(x), index_64)
    _dwconv_grad_input_kernel[(triton.cdiv(total, block),)](
        grad_x, gz, weight_c, total, c, h, w, ho, wo, *_strides(gz),
        CHANNELS_LAST=channels_last, STRIDE=stride, PAD=padding, BLOCK=block, INDEX_64=index_64,
        num_warps=_NUM_WARPS,
    )
    return grad_x, grad_weight, grad_bias, sum_gyx.to(bn_weight.dtype), sum_gy.to(bn_bias.dtype)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd: the C++ ops', which the Triton ops' contract is.

_meta.register_dwconv_fakes("_triton", allow_double=False, saves_z=False)
_autograd.register_dwconv_autograd("_triton")

