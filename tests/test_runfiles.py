"""Files fercuda writes through a temporary file get the mode a plain open() gives: 0666 less the umask."""

import os
import stat

import cv2
import numpy as np
import pytest
import torch

from fercuda import cli
from fercuda.data import load_faces
from fercuda.models import FERNet
from fercuda.runfiles import atomic_write, save_checkpoint, write_json, write_metrics

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


@pytest.fixture(params=[0o027, 0o002], ids=["umask027", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_run_folder_files_and_checkpoints_get_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    write_json(tmp_path / "a.json", {"x": 1})
    write_metrics(tmp_path, [{"epoch": 1, "loss": 0.5}])
    save_checkpoint(tmp_path / "last.pt", {"w": torch.zeros(2)})
    atomic_write(tmp_path / "clip.avi", lambda tmp: open(tmp, "wb").close(), keep_suffix=True)
    for name in ("a.json", "metrics.json", "metrics.csv", "last.pt", "clip.avi"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)), oct(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "clip.avi", "last.pt", "metrics.csv",
                                                          "metrics.json"]


def test_annotated_image_and_data_cache_get_the_umask(tmp_path, umask):
    model = FERNet(num_classes=7, width_mult=0.125, fused=False)
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config(), "classes": FER_CLASSES}, ckpt)
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8))
    out = tmp_path / "out" / "face.png"
    cli.main(["predict", str(ckpt), str(face), "--out", str(out), "--json", str(tmp_path / "f.json"),
              "--device", "cpu", "--engine", "torch"])
    assert _mode(out) == 0o666 & ~umask and _mode(tmp_path / "f.json") == 0o666 & ~umask
    root = tmp_path / "data"
    (root / "train" / "happy").mkdir(parents=True)
    cv2.imwrite(str(root / "train" / "happy" / "Training_1.png"), np.full((48, 48), 9, np.uint8))
    load_faces(root, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.suffix == ".npz" and _mode(cached) == 0o666 & ~umask
