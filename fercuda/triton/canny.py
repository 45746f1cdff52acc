"""Canny in Triton, equal to cv2.Canny(cv2.GaussianBlur(img, (k, k), 0), ...) bit for bit.

Images up to 64 x 64 pixels run one program per image:
blur, gradient, non-maximum suppression and hysteresis to convergence, with scratch buffers
in global memory between the stages. Larger images run per-tile kernels; their hysteresis
repeats a tile kernel until no tile changes, which reads one flag on the host per round
(the only host synchronization).

The integer arithmetic mirrors csrc/include/fercuda/canny_math.h (OpenCV's fixed point).
Under TRITON_INTERPRET=1 the kernels also run on CPU tensors.
"""

import math
import numbers
import os

import torch
import triton
import triton.language as tl

from fercuda import _checks

# Images up to 64 x 64 run one program per image, on a square block of one of these sides, so
# that each option set compiles at most two kernels whatever the image sizes. 8 pixels per
# thread: at 16 the kernel needs all 255 registers and spills a 1.3 KB stack frame. At 8 (16
# warps for 64 x 64, so at most 128 registers a thread) the blur runs on row halves, and 4 of
# the 64 option sets still spill 8 to 16 bytes a thread on sm_90 (none on sm_80): the NMS keeps
# the gradient and magnitude of its 8 pixels live, and the hysteresis the labels of all 8, which
# fill the 128 registers. Fewer pixels a thread would need more than 1024 threads (the most a
# block may have) or a block of less than the image. tests/test_triton_compile.py bounds it.
_IMAGE_BLOCKS = (32, 64)
_IMAGE_PIXELS_PER_THREAD = 8
# Larger images run per-tile kernels on tiles of _TILE x _TILE pixels.
_TILE = 32
_TILE_WARPS = 4


def image_block(h, w):
    """(block side, num_warps) of the one-program path for an h x w image; None where the image
    takes the tiled path."""
    for side in _IMAGE_BLOCKS:
        if h <= side and w <= side:
            return side, max(4, side * side // (32 * _IMAGE_PIXELS_PER_THREAD))
    return None



# ---- Per-pixel arithmetic (as canny_math.h) -------------------------------------------


@triton.jit
def _reflect101(i, n):
    period = tl.maximum(2 * n - 2, 1)
    m = i % period
    m = tl.where(m < 0, m + period, m)
    m = tl.where(m < n, m, period - m)
    return tl.where(n == 1, 0, m)


@triton.jit
def _replicate(i, n):
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _load_px(ptr, r, c, W, valid):
    return tl.load(ptr + r * W + c, mask=valid, other=0).to(tl.int32)


@triton.jit
def _tap(ptr, r, c, d, H, W, valid, VERTICAL: tl.constexpr):
    """src[r + d, c] (VERTICAL) or src[r, c + d], reflect-101 at the border."""
    if VERTICAL:
        return _load_px(ptr, _reflect101(r + d, H), c, W, valid)
    else:
        return _load_px(ptr, r, _reflect101(c + d, W), W, valid)


@triton.jit
def _gauss_1d(ptr, r, c, H, W, valid, KSIZE: tl.constexpr, VERTICAL: tl.constexpr):
    """One pass of cv2's 8-bit Gaussian, its integer taps (1 2 1), (1 4 6 4 1), (2 7 14 18 14 7 2)
    along columns or rows; int32, not rounded."""
    if KSIZE == 3:
        s = (_tap(ptr, r, c, -1, H, W, valid, VERTICAL) + 2 * _tap(ptr, r, c, 0, H, W, valid, VERTICAL)
             + _tap(ptr, r, c, 1, H, W, valid, VERTICAL))
    elif KSIZE == 5:
        s = (_tap(ptr, r, c, -2, H, W, valid, VERTICAL) + 4 * _tap(ptr, r, c, -1, H, W, valid, VERTICAL)
             + 6 * _tap(ptr, r, c, 0, H, W, valid, VERTICAL) + 4 * _tap(ptr, r, c, 1, H, W, valid, VERTICAL)
             + _tap(ptr, r, c, 2, H, W, valid, VERTICAL))
    else:
        s = (2 * _tap(ptr, r, c, -3, H, W, valid, VERTICAL) + 7 * _tap(ptr, r, c, -2, H, W, valid, VERTICAL)
             + 14 * _tap(ptr, r, c, -1, H, W, valid, VERTICAL) + 18 * _tap(ptr, r, c, 0, H, W, valid, VERTICAL)
             + 14 * _tap(ptr, r, c, 1, H, W, valid, VERTICAL) + 7 * _tap(ptr, r, c, 2, H, W, valid, VERTICAL)
             + 2 * _tap(ptr, r, c, 3, H, W, valid, VERTICAL))
    return s


@triton.jit
def _blur_rows(img_ptr, r, c, H, W, valid, KSIZE: tl.constexpr):
    """Horizontal pass of the blur at (r, c): the integer row sum, kept exact in int32."""
    return _gauss_1d(img_ptr, r, c, H, W, valid, KSIZE, False)


@triton.jit
def _blur_cols(rows_ptr, r, c, H, W, valid, KSIZE: tl.constexpr):
    """Vertical pass over the row sums: the integer 2-D sum of cv2.GaussianBlur's fixed point,
    rounded once, as the one-pass sum would be (the passes are exact in int32)."""
    acc = _gauss_1d(rows_ptr, r, c, H, W, valid, KSIZE, True)
    if KSIZE == 3:
        return (acc + 8) >> 4
    elif KSIZE == 5:
        return (acc + 128) >> 8
    else:
        return (acc + 2048) >> 12


@triton.jit
def _gradient_at(blur_ptr, r, c, H, W, valid, PAPER: tl.constexpr):
    """(dx, dy): Sobel with a replicate border, or the paper's (2P, -2Q)."""
    rp = _replicate(r + 1, H)
    cp = _replicate(c + 1, W)
    if PAPER:
        f00 = _load_px(blur_ptr, r, c, W, valid)
        f01 = _load_px(blur_ptr, r, cp, W, valid)
        f10 = _load_px(blur_ptr, rp, c, W, valid)
        f11 = _load_px(blur_ptr, rp, cp, W, valid)
        gx = (f01 - f00) + (f11 - f10)
        gy = (f10 - f00) + (f11 - f01)
    else:
        rm = _replicate(r - 1, H)
        cm = _replicate(c - 1, W)
        a00 = _load_px(blur_ptr, rm, cm, W, valid)
        a01 = _load_px(blur_ptr, rm, c, W, valid)
        a02 = _load_px(blur_ptr, rm, cp, W, valid)
        a10 = _load_px(blur_ptr, r, cm, W, valid)
        a12 = _load_px(blur_ptr, r, cp, W, valid)
        a20 = _load_px(blur_ptr, rp, cm, W, valid)
        a21 = _load_px(blur_ptr, rp, c, W, valid)
        a22 = _load_px(blur_ptr, rp, cp, W, valid)
        gx = (a02 - a00) + 2 * (a12 - a10) + (a22 - a20)
        gy = (a20 - a00) + 2 * (a21 - a01) + (a22 - a02)
    return gx, gy


@triton.jit
def _magnitude(gx, gy, L2: tl.constexpr):
    if L2:
        return gx * gx + gy * gy
    else:
        return tl.abs(gx) + tl.abs(gy)


@triton.jit
def _nms_label(mag_ptr, r, c, H, W, valid, gx, gy, m, low, high):
    """0 not an edge, 1 weak, 2 strong, by cv2's fixed-point sector test (TG22 = 13573)."""
    ax = tl.abs(gx)
    y = tl.abs(gy) << 15
    tg22x = ax * 13573
    tg67x = tg22x + (ax << 16)
    horizontal = y < tg22x
    vertical = y > tg67x
    step = tl.where((gx ^ gy) < 0, -1, 1)
    dr = tl.where(horizontal, 0, -1)
    dc = tl.where(horizontal, -1, tl.where(vertical, 0, -step))
    rb = r + dr
    cb = c + dc
    ra = r - dr
    ca = c - dc
    # Magnitudes outside the image count as 0.
    before = tl.load(mag_ptr + rb * W + cb, mask=valid & (rb >= 0) & (rb < H) & (cb >= 0) & (cb < W), other=0)
    after = tl.load(mag_ptr + ra * W + ca, mask=valid & (ra >= 0) & (ra < H) & (ca >= 0) & (ca < W), other=0)
    diagonal = (~horizontal) & (~vertical)
    keep = (m > before) & tl.where(diagonal, m > after, m >= after)
    return tl.where((m > low) & keep, tl.where(m > high, 2, 1), 0)


@triton.jit
def _strong_neighbour(state_ptr, r, c, H, W, valid):
    """Whether any of the 8 neighbours is strong (state 2)."""
    found = tl.zeros(r.shape, tl.int1) | tl.zeros(c.shape, tl.int1)
    for dr in tl.static_range(-1, 2):
        for dc in tl.static_range(-1, 2):
            if dr != 0 or dc != 0:
                rr = r + dr
                cc = c + dc
                ok = valid & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
                found = found | (tl.load(state_ptr + rr * W + cc, mask=ok, other=0) == 2)
    return found


@triton.jit
def _propagate(state_ptr, r, c, H, W, valid, label):
    """Grows strong pixels into 8-connected weak ones until nothing changes; returns
    (strong mask, number of pixels that became strong)."""
    cand = valid & (label > 0)
    strong = cand & (label == 2)
    grown = tl.sum(strong.to(tl.int32), axis=None) * 0
    changed = grown + 1
    while changed > 0:
        tl.debug_barrier()
        tl.store(state_ptr + r * W + c, tl.where(strong, 2, tl.where(cand, 1, 0)).to(tl.uint8), mask=valid)
        tl.debug_barrier()
        new = cand & (strong | _strong_neighbour(state_ptr, r, c, H, W, valid))
        changed = tl.sum((new & ~strong).to(tl.int32), axis=None)
        grown += changed
        strong = new
    return strong, grown


# ---- Kernels ---------------------------------------------------------------------------


@triton.jit
def _canny_image_kernel(img_ptr, out_ptr, blur_ptr, mag_ptr, state_ptr, H, W, low, high,
                        KSIZE: tl.constexpr, PAPER: tl.constexpr, L2: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The whole pipeline for one image per program; scratch buffers hold each stage between
    barriers because a stage reads its neighbours' results. The blur runs as two passes (the
    row sums in mag's buffer): the 2-D sum in one pass keeps KSIZE**2 loads per pixel live and
    spills registers."""
    base = tl.program_id(0).to(tl.int64) * H * W
    r = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_W)[None, :]
    valid = (r < H) & (c < W)
    offs = r * W + c
    img = img_ptr + base
    mag = mag_ptr + base
    if KSIZE == 0:
        src = img
    else:
        # Each blur pass runs on the block's two row halves in turn: on the whole 64 x 64 block
        # at once, the KSIZE taps per pixel of the column pass spill registers.
        src = blur_ptr + base
        for half in tl.static_range(2):
            rh = half * (BLOCK_H // 2) + tl.arange(0, BLOCK_H // 2)[:, None]
            vh = (rh < H) & (c < W)
            tl.store(mag + rh * W + c, _blur_rows(img, rh, c, H, W, vh, KSIZE), mask=vh)
        tl.debug_barrier()
        for half in tl.static_range(2):
            rh = half * (BLOCK_H // 2) + tl.arange(0, BLOCK_H // 2)[:, None]
            vh = (rh < H) & (c < W)
            tl.store(src + rh * W + c, _blur_cols(mag, rh, c, H, W, vh, KSIZE).to(tl.uint8), mask=vh)
        tl.debug_barrier()
    gx, gy = _gradient_at(src, r, c, H, W, valid, PAPER)
    m = _magnitude(gx, gy, L2)
    tl.store(mag + offs, m, mask=valid)
    tl.debug_barrier()
    label = _nms_label(mag, r, c, H, W, valid, gx, gy, m, low, high)
    strong, grown = _propagate(state_ptr + base, r, c, H, W, valid, label)
    tl.store(out_ptr + base + offs, tl.where(strong, 255, 0).to(tl.uint8), mask=valid)


@triton.jit
def _tile_coords(H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    # One flat grid over (image, tile): grid dimensions y and z stop at 65535.
    tiles_w = tl.cdiv(W, TILE_W)
    tiles = tl.cdiv(H, TILE_H) * tiles_w
    pid = tl.program_id(0).to(tl.int64)
    image = pid // tiles
    t = (pid - image * tiles).to(tl.int32)
    base = image * H * W
    r = (t // tiles_w) * TILE_H + tl.arange(0, TILE_H)[:, None]
    c = (t % tiles_w) * TILE_W + tl.arange(0, TILE_W)[None, :]
    return base, r, c, (r < H) & (c < W)


@triton.jit
def _blur_rows_tile_kernel(img_ptr, rows_ptr, H, W, KSIZE: tl.constexpr, TILE_H: tl.constexpr,
                           TILE_W: tl.constexpr):
    base, r, c, valid = _tile_coords(H, W, TILE_H, TILE_W)
    tl.store(rows_ptr + base + r * W + c, _blur_rows(img_ptr + base, r, c, H, W, valid, KSIZE), mask=valid)


@triton.jit
def _blur_cols_tile_kernel(rows_ptr, blur_ptr, H, W, KSIZE: tl.constexpr, TILE_H: tl.constexpr,
                           TILE_W: tl.constexpr):
    base, r, c, valid = _tile_coords(H, W, TILE_H, TILE_W)
    b = _blur_cols(rows_ptr + base, r, c, H, W, valid, KSIZE)
    tl.store(blur_ptr + base + r * W + c, b.to(tl.uint8), mask=valid)


@triton.jit
def _magnitude_tile_kernel(blur_ptr, mag_ptr, H, W, PAPER: tl.constexpr, L2: tl.constexpr,
                           TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    base, r, c, valid = _tile_coords(H, W, TILE_H, TILE_W)
    gx, gy = _gradient_at(blur_ptr + base, r, c, H, W, valid, PAPER)
    tl.store(mag_ptr + base + r * W + c, _magnitude(gx, gy, L2), mask=valid)


@triton.jit
def _nms_tile_kernel(blur_ptr, mag_ptr, state_ptr, H, W, low, high, PAPER: tl.constexpr, L2: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    base, r, c, valid = _tile_coords(H, W, TILE_H, TILE_W)
    gx, gy = _gradient_at(blur_ptr + base, r, c, H, W, valid, PAPER)
    m = _magnitude(gx, gy, L2)
    label = _nms_label(mag_ptr + base, r, c, H, W, valid, gx, gy, m, low, high)
    tl.store(state_ptr + base + r * W + c, label.to(tl.uint8), mask=valid)


@triton.jit
def _hysteresis_tile_kernel(state_ptr, changed_ptr, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """One round: grows strong pixels inside the tile to convergence, reading the
    neighbouring tiles' current state; flags the round if anything grew."""
    base, r, c, valid = _tile_coords(H, W, TILE_H, TILE_W)
    label = tl.load(state_ptr + base + r * W + c, mask=valid, other=0).to(tl.int32)
    strong, grown = _propagate(state_ptr + base, r, c, H, W, valid, label)
    tl.atomic_max(changed_ptr, tl.minimum(grown, 1))


@triton.jit
def _edges_tile_kernel(state_ptr, out_ptr, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    base, r, c, valid = _tile_coords(H, W, TILE_H, TILE_W)
    s = tl.load(state_ptr + base + r * W + c, mask=valid, other=0)
    tl.store(out_ptr + base + r * W + c, tl.where(s == 2, 255, 0).to(tl.uint8), mask=valid)


# ---- Validation and host code ----------------------------------------------------------


def check_canny_args(img, low, high, ksize, l2_gradient, gradient, op="canny"):
    """The checks of the C++ Canny ops (fercuda._checks), plus the Triton backend's device rule."""
    prefix = f"fercuda.{op}: argument"
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{prefix} 'img' must be a Tensor, got {type(img).__name__}")
    _checks.check_image(img, torch.uint8, op, "img")
    _checks.check_ksize(ksize, op, allow_zero=True)
    for name, value in (("low", low), ("high", high)):
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{prefix} '{name}' must be a number >= 0, got {type(value).__name__}")
        _checks.check_threshold(value, op, name)
    if not isinstance(l2_gradient, bool):
        raise TypeError(f"{prefix} 'l2_gradient' must be a bool, got {type(l2_gradient).__name__}")
    _checks.check_gradient_kind(gradient, op)
    if img.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{prefix} 'img' must be a CUDA tensor for the Triton backend (CPU tensors run only "
            "under TRITON_INTERPRET=1), got device cpu"
        )


def _cv_floor(v):
    # cvFloor on x86 (cvtsd2si) gives INT_MIN for values >= 2^31, +inf included.
    return -(1 << 31) if v >= 2.0**31 else int(math.floor(v))


def canny_thresholds(low, high, l2_gradient):
    """cv2.Canny's conventions, as canny_thresholds() in canny_math.h: swap if low > high;
    for L2 clamp to 32767 and square as a float; then floor as cvFloor does."""
    if low > high:
        low, high = high, low
    if l2_gradient:
        low = min(low, 32767.0) ** 2
        high = min(high, 32767.0) ** 2
    return _cv_floor(low), _cv_floor(high)


def _canny_batch(batch, out, low, high, ksize, l2_gradient, paper, tile=None):
    """batch, out: contiguous (N, H, W) uint8; tile forces the tiled path (tile x tile)."""
    n, h, w = batch.shape
    mag = torch.empty(batch.shape, dtype=torch.int32, device=batch.device)
    state = torch.empty_like(batch)
    block = image_block(h, w) if tile is None else None
    if block is not None:
        side, num_warps = block
        blur = torch.empty_like(batch) if ksize else batch
        _canny_image_kernel[(n,)](
            batch, out, blur, mag, state, h, w, low, high,
            KSIZE=ksize, PAPER=paper, L2=l2_gradient, BLOCK_H=side, BLOCK_W=side, num_warps=num_warps,
        )
        return
    t = tile or _TILE
    grid = (n * triton.cdiv(h, t) * triton.cdiv(w, t),)
    launch = dict(TILE_H=t, TILE_W=t, num_warps=_TILE_WARPS)
    src = batch
    if ksize:
        # The row sums share mag's buffer: the magnitudes are written after the blur has read them.
        _blur_rows_tile_kernel[grid](batch, mag, h, w, KSIZE=ksize, **launch)
        src = torch.empty_like(batch)
        _blur_cols_tile_kernel[grid](mag, src, h, w, KSIZE=ksize, **launch)
    _magnitude_tile_kernel[grid](src, mag, h, w, PAPER=paper, L2=l2_gradient, **launch)
    _nms_tile_kernel[grid](src, mag, state, h, w, low, high, PAPER=paper, L2=l2_gradient, **launch)
    changed = torch.zeros(1, dtype=torch.int32, device=batch.device)
    while True:
        changed.zero_()
        _hysteresis_tile_kernel[grid](state, changed, h, w, **launch)
        if int(changed.item()) == 0:  # the one host synchronization per round
            break
    _edges_tile_kernel[grid](state, out, h, w, **launch)


@torch.library.custom_op("fercuda::canny_triton", mutates_args=())
def canny_triton(img: torch.Tensor, low: float, high: float, ksize: int, l2_gradient: bool,
                 gradient: str) -> torch.Tensor:
    """fercuda::canny computed by the Triton kernels of this module."""
    check_canny_args(img, low, high, ksize, l2_gradient, gradient)
    out = torch.empty(img.shape, dtype=torch.uint8, device=img.device)
    if img.numel() == 0:
        return out
    h, w = img.shape[-2], img.shape[-1]
    batch = img.reshape(-1, h, w).contiguous()
    paper = gradient == "paper"
    # The paper's gradient is computed times two (2P, -2Q), so the thresholds double too.
    lo, hi = canny_thresholds(2.0 * low if paper else float(low), 2.0 * high if paper else float(high), l2_gradient)
    _canny_batch(batch, out.view(-1, h, w), lo, hi, ksize, l2_gradient, paper)
    return out


@canny_triton.register_fake
def _canny_triton_fake(img, low, high, ksize, l2_gradient, gradient):
    return torch.empty(img.shape, dtype=torch.uint8, device=img.device)


def canny(img, low=50, high=150, *, ksize=5, l2_gradient=False, gradient="sobel"):
    """Canny edges (uint8 0/255, the shape of img) by the Triton kernels; equals
    cv2.Canny(cv2.GaussianBlur(img, (ksize, ksize), 0), low, high, L2gradient=l2_gradient)."""
    check_canny_args(img, low, high, ksize, l2_gradient, gradient)
    return canny_triton(img, float(low), float(high), int(ksize), bool(l2_gradient), str(gradient))
