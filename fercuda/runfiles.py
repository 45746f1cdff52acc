"""Run-folder files: atomic writes, JSON, checkpoints, metrics tables, and the RNG state a
checkpoint carries so that a resumed run continues exactly where it stopped."""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write, keep_suffix: bool = False) -> None:
    """Write through a temporary file in the same folder and os.replace it: a crash leaves the
    old file or the new one, never half of one. write(tmp) gets the temporary path (a str); with
    keep_suffix it ends in path's suffix (writers such as cv2.VideoWriter choose the format by
    it). The file gets the mode a plain open() would give it (0666 less the umask), not
    mkstemp's 0600."""
    path = Path(path)
    if keep_suffix:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, w)


def save_checkpoint(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_metrics(unit_dir: Path, history: list[dict]) -> None:
    write_json(unit_dir / "metrics.json", history)
    fields = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))

    def w(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(unit_dir / "metrics.csv", w)


def rng_state(aug_generator: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        # As plain lists, so checkpoints load with torch.load(weights_only=True).
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "augment": aug_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, aug_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    aug_generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
