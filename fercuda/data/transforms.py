"""Device-side preprocessing: augmentation of raw uint8 faces, then the paper's M = [canny(x), x, x]."""

from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn.functional as F

import fercuda.ops

# Canny thresholds of the paper, section 2, step 4.
CANNY_LOW = 50
CANNY_HIGH = 150


def _check_faces(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 1:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a uint8 tensor (N, 1, H, W), got {got}")


def fer_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 faces (N, 1, H, W) -> float32 (N, 3, H, W): Canny edges and the face twice, each
    scaled from 0..255 to -1..1. One fercuda.ops.canny call for the whole batch."""
    _check_faces(batch, "fer_input(batch)")
    edges = fercuda.ops.canny(batch, CANNY_LOW, CANNY_HIGH)
    m = torch.cat([edges, batch, batch], dim=1).float()
    return m.mul_(2.0 / 255.0).sub_(1.0)


def augment(
    batch: torch.Tensor,
    generator: torch.Generator | None = None,
    max_shift: float = 4.0,
    max_degrees: float = 10.0,
    flip: bool = True,
) -> torch.Tensor:
    """Random shift (a crop of the padded face), horizontal flip and small rotation of uint8
    faces, on the device the batch lives on; bilinear resampling rounded back to uint8, so the
    Canny edges are computed on the image the network sees."""
    _check_faces(batch, "augment(batch)")
    n, _, h, w = batch.shape
    if n == 0:
        return batch
    dev = batch.device
    r = torch.rand(n, 4, generator=generator, device=dev)
    angle = (r[:, 0] * 2 - 1) * math.radians(max_degrees)
    # affine_grid works in normalised coordinates (-1..1), so a shift of s pixels is 2s/size.
    tx = (r[:, 1] * 2 - 1) * (2 * max_shift / w)
    ty = (r[:, 2] * 2 - 1) * (2 * max_shift / h)
    sx = torch.where(r[:, 3] < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_erasing(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> torch.Tensor:
    """Random erasing of network inputs (N, C, H, W), in place: each image, with probability p,
    gets one rectangle of `area` (a fraction of the image) and `aspect` (height / width, drawn
    log-uniform) set to `value` in every channel; 0 is mid-grey and half an edge in fer_input's
    -1..1 scale. One call for the whole batch, on its device."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"random_erasing(x): expected a floating tensor (N, C, H, W), got {got}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_erasing(p): expected a probability in [0, 1], got {p}")
    n, _, h, w = x.shape
    if n == 0 or p == 0.0:
        return x
    r = torch.rand(n, 5, generator=generator, device=x.device, dtype=torch.float64)
    frac = area[0] + (area[1] - area[0]) * r[:, 0]
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * r[:, 1])
    eh = (frac * h * w * ratio).sqrt().round().clamp(1, h).long()
    ew = (frac * h * w / ratio).sqrt().round().clamp(1, w).long()
    top = (r[:, 2] * (h - eh + 1)).floor().long()
    left = (r[:, 3] * (w - ew + 1)).floor().long()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)))
    box &= (r[:, 4] < p).view(-1, 1, 1)
    return x.masked_fill_(box.unsqueeze(1), value)


def mix_batch(
    x: torch.Tensor, rng: np.random.Generator, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Mixup or CutMix of a batch of network inputs with the batch reversed (image i with image
    N-1-i): returns the mixed batch and lam, the weight of each image's own label (the loss is
    lam * loss(y) + (1 - lam) * loss(y.flip(0))). Mixup blends whole images with lam ~ Beta(a, a);
    CutMix pastes a box of area 1 - lam, lam then being the area left. With both alphas above 0,
    each batch takes one of the two at even odds. `rng` (numpy) draws lam and the box."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mix_batch: alphas must be >= 0, got mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}")
    if x.shape[0] < 2 or (mixup_alpha == 0 and cutmix_alpha == 0):
        return x, 1.0
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    other = x.flip(0)
    if not use_cutmix:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        return torch.lerp(other, x, lam), lam
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    bh, bw = int(round(h * cut)), int(round(w * cut))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
