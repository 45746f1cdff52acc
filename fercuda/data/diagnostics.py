"""Checks of a data set's copy that catch problems no loader error would: splits that do not
look alike."""

from __future__ import annotations

import torch


def sharpness(images: torch.Tensor, sample: int = 2000) -> float:
    """Mean |Laplacian| of up to `sample` uint8 faces (N, 1, H, W), evenly spaced."""
    if len(images) == 0:
        return float("nan")
    pick = images[torch.linspace(0, len(images) - 1, min(sample, len(images))).long()].float()
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(pick, kernel).abs().mean().item()


def splits_differ_warning(data, train_idx, eval_idx, eval_name: str) -> str | None:
    """A warning when the training and evaluation images of one data set do not look alike. A
    copy whose training images were blurred (or re-encoded far more coarsely) than its test
    images trains a network for a different input than it is scored on, and its Canny channel
    changes most of all. None when they look alike."""
    a = sharpness(data.images[torch.as_tensor(train_idx)])
    b = sharpness(data.images[torch.as_tensor(eval_idx)])
    if a > 0 and b > 0 and max(a / b, b / a) > 3:
        return (f"warning: the Training images are {'blurrier' if a < b else 'sharper'} than the {eval_name} "
                f"images (mean |Laplacian| {a:.1f} against {b:.1f}); accuracy on {eval_name} will suffer "
                "from the difference, not only from the model. Check the data set's copy.")
    return None
