"""Inference over a set of faces, and the accuracy / per-class report of its predictions."""

from __future__ import annotations

import numpy as np
import torch

from fercuda.data import fer_input
from fercuda.runtime import AUTOCAST_DTYPES

@torch.no_grad()
def predict_logits(model, images: torch.Tensor, device, batch_size: int | None = None, precision: str = "fp32",
                   channels_last: bool = False) -> torch.Tensor:
    """Logits of uint8 faces (N, 1, 48, 48) in eval mode, no augmentation. Batches of 256 on a
    GPU; of 32 on a CPU, where activations that stay in cache make inference about 1.7x faster."""
    if batch_size is None:
        batch_size = 256 if torch.device(device).type == "cuda" else 32
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = fer_input(images[i:i + batch_size].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32"):
            out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def classification_report(pred: np.ndarray, true: np.ndarray, classes) -> dict:
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp, predicted, actual = cm[i, i], cm[:, i].sum(), cm[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(actual)}
    accuracy = float((pred == true).mean()) if len(true) else 0.0
    return {"accuracy": accuracy, "per_class": per_class, "confusion_matrix": cm.tolist(), "classes": list(classes)}


def format_report(report: dict, title: str) -> str:
    lines = [f"{title}: accuracy {100 * report['accuracy']:.2f}% on {sum(r['support'] for r in report['per_class'].values())} images",
             f"{'class':>10} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>7}"]
    for name, r in report["per_class"].items():
        lines.append(f"{name:>10} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:7d}")
    return "\n".join(lines)
