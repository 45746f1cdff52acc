"""fercuda.recognition (the Python API) and `fercuda predict` on real FER2013 faces and generated videos."""

import csv
import json
import os
import stat

import cv2
import numpy as np
import pytest
import torch

from fercuda import cli
from fercuda.compare.video import synthetic_video
from fercuda.data import fer_input
from fercuda.engines import EngineUnavailable
from fercuda.models import CheckpointError, FERNet, pretrained
from fercuda.recognition import FER, NoFaceError, tta_views

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


@pytest.fixture(scope="module")
def private_faces(fer2013_dir):
    """Four PrivateTest faces of each class: (paths, uint8 images (N, 48, 48), labels)."""
    paths = [p for c in FER_CLASSES for p in sorted((fer2013_dir / "test" / c).glob("PrivateTest_*"))[:4]]
    images = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths])
    return paths, images


@pytest.fixture(scope="module")
def fer_torch():
    return FER(engine="torch", tta="none", device="cpu")


def _reference_probabilities(faces: np.ndarray) -> np.ndarray:
    """The shipped network applied directly, in float64 softmax, to 48x48 faces."""
    model = pretrained(fused=False)
    with torch.no_grad():
        logits = model(fer_input(torch.from_numpy(faces).unsqueeze(1))).double()
    return torch.softmax(logits, 1).numpy()


def test_detect_emotions_on_face_images_in_every_form(private_faces, fer_torch):
    paths, images = private_faces
    expected = _reference_probabilities(images)
    by_list = fer_torch.detect_emotions(list(paths))  # a list: one batch
    assert len(by_list) == len(paths)
    for i, (path, faces) in enumerate(zip(paths, by_list)):
        assert len(faces) == 1, path
        face = faces[0]
        assert face["box"] == (0, 0, 48, 48)  # a 48x48 face crop is taken whole
        assert list(face["emotions"]) == FER_CLASSES
        probs = np.array(list(face["emotions"].values()))
        np.testing.assert_allclose(probs, expected[i], atol=1e-5)
        assert face["dominant_emotion"] == FER_CLASSES[int(expected[i].argmax())]
    # A path, a grayscale array and a BGR array of one image give the same face.
    gray = images[5]
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    one = [fer_torch.detect_emotions(x)[0] for x in (str(paths[5]), gray, bgr)]
    for face in one[1:]:
        assert face["box"] == one[0]["box"] and face["dominant_emotion"] == one[0]["dominant_emotion"]
        np.testing.assert_allclose(list(face["emotions"].values()), list(one[0]["emotions"].values()), atol=1e-6)


def _scene(faces, size=(640, 480), face_px=140):
    """A grey BGR scene with faces pasted at known places; their boxes."""
    w, h = size
    scene = np.full((h, w), 110, np.uint8)
    boxes = []
    for i, face in enumerate(faces):
        x, y = 40 + i * (face_px + 60), 60 + 80 * (i % 2)
        scene[y:y + face_px, x:x + face_px] = cv2.resize(face, (face_px, face_px), interpolation=cv2.INTER_CUBIC)
        boxes.append((x, y, face_px, face_px))
    return cv2.cvtColor(scene, cv2.COLOR_GRAY2BGR), boxes


def test_detector_finds_pasted_faces_and_caller_boxes_are_used(private_faces, fer_torch):
    _, images = private_faces
    scene, placed = _scene([images[12], images[13], images[20]])
    if fer_torch.detector is None:
        pytest.skip(f"no Haar cascade: {fer_torch.detector_problem}")
    found = fer_torch.detect_emotions(scene)
    assert len(found) >= 2
    for face in found:
        x, y, w, h = face["box"]
        cx, cy = x + w / 2, y + h / 2
        assert any(px <= cx <= px + pw and py <= cy <= py + ph for px, py, pw, ph in placed), face["box"]
    # The caller's boxes: one face per box, scored on the crop of that box.
    given = fer_torch.detect_emotions(scene, boxes=placed)
    assert [f["box"] for f in given] == placed
    crops = np.stack([cv2.resize(cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)[y:y + h, x:x + w], (48, 48),
                                 interpolation=cv2.INTER_AREA) for x, y, w, h in placed])
    expected = _reference_probabilities(crops)
    np.testing.assert_allclose([list(f["emotions"].values()) for f in given], expected, atol=1e-5)
    # detector="whole": the image is one face.
    whole = FER(engine="torch", detector="whole", tta="none", device="cpu").detect_emotions(scene)
    assert [f["box"] for f in whole] == [(0, 0, 640, 480)]
    assert fer_torch.detect_emotions(np.full((240, 320), 128, np.uint8)) == []  # no face: no entry


def test_tta_views_and_their_average(private_faces):
    _, images = private_faces
    faces = torch.from_numpy(images[:3]).unsqueeze(1)
    views = tta_views(faces, "flip+shift")
    assert views.shape == (30, 1, 48, 48)
    assert torch.equal(views[:3], faces) and torch.equal(views[3:6], faces.flip(-1))
    # The first shift moves the face right by 2: column c shows column c - 2, the first two repeat column 0.
    assert torch.equal(views[6:9][..., 2:], faces[..., :46]) and torch.equal(views[6:9][..., 1], faces[..., 0])
    # The second moves it left; the third down, the fourth up.
    assert torch.equal(views[9:12][..., :46], faces[..., 2:]) and torch.equal(views[9:12][..., 47], faces[..., 47])
    assert torch.equal(views[12:15][..., 2:, :], faces[..., :46, :])
    assert torch.equal(views[15:18][..., :46, :], faces[..., 2:, :])
    assert torch.equal(views[18:21][..., 2:], faces.flip(-1)[..., :46])
    flip = FER(engine="torch", tta="flip", device="cpu", detector="whole").detect_emotions(images[0])[0]
    p = _reference_probabilities(np.stack([images[0], images[0][:, ::-1]]))
    np.testing.assert_allclose(list(flip["emotions"].values()), p.mean(0), atol=1e-5)


def test_video_iterator_and_predict_writes_video_json_csv(private_faces, tmp_path, capsys):
    _, images = private_faces
    video = tmp_path / "clip.avi"
    placed = synthetic_video(video, [images[12], images[20]], size=(320, 240), frames=12, fps=10, n_faces=2,
                             face_px=96)
    fer = FER(engine="torch", tta="none", device="cpu")
    if fer.detector is None:
        pytest.skip(f"no Haar cascade: {fer.detector_problem}")
    results = list(fer.video(video))
    assert [r["frame"] for r in results] == list(range(12))
    assert [r["time"] for r in results] == pytest.approx([i / 10 for i in range(12)])
    assert sum(len(r["faces"]) for r in results) >= 12  # at least one face a frame on average
    for r, boxes in zip(results, placed):
        for face in r["faces"]:
            x, y, w, h = face["box"]
            assert any(px <= x + w / 2 <= px + pw and py <= y + h / 2 <= py + ph for px, py, pw, ph in boxes)
    out = tmp_path / "out" / "clip_annotated.avi"
    cli.main(["predict", str(video), "--out", str(out), "--engine", "torch", "--tta", "none", "--device", "cpu",
              "--progress"])
    assert "frame" in capsys.readouterr().err  # the progress bar
    frames = json.loads(out.with_suffix(".json").read_text())
    assert [f["frame"] for f in frames] == list(range(12))
    assert [[f["box"] for f in fr["faces"]] for fr in frames] == [[list(f["box"]) for f in r["faces"]] for r in results]
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r["faces"]) for r in results)
    assert list(rows[0])[:7] == ["frame", "time", "x", "y", "w", "h", "dominant_emotion"] and list(rows[0])[7:] == FER_CLASSES
    umask = os.umask(0)
    os.umask(umask)
    for written in (out, out.with_suffix(".json"), out.with_suffix(".csv")):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written
    capture = cv2.VideoCapture(str(out))
    n = 0
    while capture.read()[0]:
        n += 1
    capture.release()
    assert n == 12


def test_exceptions_name_the_thing_and_leave_no_output(tmp_path, fer_torch):
    out = tmp_path / "o.png"
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        fer_torch.detect_emotions(str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no image here")
    with pytest.raises(ValueError, match="bad.jpg cannot be decoded"):
        fer_torch.detect_emotions(bad)
    with pytest.raises(TypeError, match="argument 'img' must be an image path or a uint8 numpy array"):
        fer_torch.detect_emotions(torch.zeros(48, 48))
    with pytest.raises(ValueError, match=r"argument 'img\[1\]' must be a uint8 array"):
        fer_torch.detect_emotions([np.zeros((48, 48), np.uint8), np.zeros((48, 48), np.float32)])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(ValueError, match="broken.mp4"):
        list(fer_torch.video(broken))
    with pytest.raises(FileNotFoundError, match="nothere.mp4 does not exist"):
        fer_torch.video(tmp_path / "nothere.mp4")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((240, 320), 128, np.uint8))
    if fer_torch.detector is not None:
        with pytest.raises(NoFaceError, match="blank.png: no face found"):
            cli.main(["predict", str(blank), "--out", str(out), "--engine", "torch", "--device", "cpu"])
        assert not out.exists()
    with pytest.raises(ValueError, match="argument 'detector' must be one of"):
        FER(detector="mtcnn")
    # A checkpoint of another width than its configuration says.
    model = FERNet(num_classes=7, width_mult=0.125, fused=False)
    ckpt = tmp_path / "w.pt"
    torch.save({"model": model.state_dict(), "model_config": {**model.config(), "width_mult": 0.25},
                "classes": FER_CLASSES}, ckpt)
    with pytest.raises(CheckpointError, match=r"w.pt: its weights do not fit FERNet"):
        FER(ckpt, engine="torch")
    with pytest.raises(CheckpointError, match=r"w.pt: its weights do not fit FERNet"):
        cli.main(["predict", str(ckpt), str(blank), "--out", str(out), "--engine", "torch", "--whole-image"])
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_exception_engine_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(EngineUnavailable, match="engine 'openvino' is not installed: pip install openvino"):
        FER(engine="openvino")
    with pytest.raises(ValueError, match="engine must be one of"):
        FER(engine="tensorrt")
