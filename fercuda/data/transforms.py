"""Device-side preprocessing: augmentation of raw uint8 faces, then the paper's M = [canny(x), x, x]."""

from __future__ import annotations

import math

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
