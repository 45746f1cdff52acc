"""fercuda.engines: PyTorch, ONNX Runtime and OpenVINO give the same probabilities, and `auto` follows its rule."""

import importlib.util
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from fercuda import cli, engines
from fercuda.data import fer_input
from fercuda.models import pretrained
from fercuda.recognition import FER

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def _need(name):
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install 'fercuda[engines]')")


@pytest.fixture(scope="module")
def faces(fer2013_dir):
    paths = [p for c in FER_CLASSES for p in sorted((fer2013_dir / "test" / c).glob("PrivateTest_*"))[:6]]
    return np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths])


@pytest.fixture(scope="module")
def reference_logits(faces):
    with torch.no_grad():
        return pretrained(fused=False)(fer_input(torch.from_numpy(faces).unsqueeze(1))).numpy()


@pytest.mark.parametrize("name, options, rtol", [
    ("torch", {}, 1e-5),
    ("onnxruntime", {}, 1e-4),
    ("openvino", {"precision": "f32"}, 1e-4),
], ids=["torch", "onnxruntime", "openvino-f32"])
def test_engine_logits_equal_pytorch(name, options, rtol, faces, reference_logits):
    if name != "torch":
        _need(name)
        _need("onnx")
    engine = engines.make_engine(name, pretrained(), "cpu", **options)
    assert engine.name == name
    got = engine(fer_input(torch.from_numpy(faces).unsqueeze(1))).numpy()
    scale = np.abs(reference_logits).max()
    np.testing.assert_allclose(got, reference_logits, rtol=rtol, atol=rtol * scale)


def test_openvino_default_precision_agrees(faces, reference_logits):
    _need("openvino")
    _need("onnx")
    fer = FER(engine="openvino", detector="whole", tta="none", device="cpu")
    probs = np.array([list(f[0]["emotions"].values()) for f in fer.detect_emotions(list(faces))])
    ref = torch.softmax(torch.from_numpy(reference_logits).double(), 1).numpy()
    # bfloat16 on CPUs with native bfloat16 (8 bits of mantissa): probabilities within 0.05.
    assert np.abs(probs - ref).max() < 0.05
    assert (probs.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_auto_picks_the_first_installed_of_its_order(monkeypatch):
    expected = next(e for e in engines.AUTO_ORDER if engines.installed(e))
    assert engines.resolve_engine("auto", "cpu") == expected
    assert engines.resolve_engine("auto", "cuda") == "torch"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n in ("openvino", "onnxruntime") else real(n, *a))
    assert engines.resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(engines.EngineUnavailable, match="engine 'onnxruntime' is not installed"):
        engines.resolve_engine("onnxruntime", "cpu")


def test_eval_in_every_engine_reports_single_view_and_tta(fer2013_dir, tmp_path, capsys):
    root = tmp_path / "data"
    for c in FER_CLASSES:
        for p in sorted((fer2013_dir / "test" / c).glob("PrivateTest_*"))[:5]:
            (root / "test" / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / "test" / c / p.name)
    accuracy = {}
    for name in ("torch", "onnxruntime"):
        if name != "torch" and importlib.util.find_spec(name) is None:
            continue
        out = tmp_path / name
        cli.main(["eval", "--data", str(root), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                  "--engine", name, "--tta", "flip", "--out", str(out)])
        report = json.loads((out / "eval.json").read_text())
        assert report["engine"] == name and report["tta"] == "flip"
        accuracy[name] = (report["accuracy"], report["single_view_accuracy"])
    assert "single view: accuracy" in capsys.readouterr().out
    # The single-view figure is the network's own argmax on the faces.
    images = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for c in FER_CLASSES
                       for p in sorted((root / "test" / c).iterdir())])
    labels = np.repeat(np.arange(7), 5)
    with torch.no_grad():
        pred = pretrained(fused=False)(fer_input(torch.from_numpy(images).unsqueeze(1))).argmax(1).numpy()
    assert accuracy["torch"][1] == pytest.approx((pred == labels).mean())
    assert len(set(accuracy.values())) == 1, accuracy
