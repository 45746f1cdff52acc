"""The FERNet shipped inside the package, and the errors of the checkpoint reader."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from fercuda import cli
from fercuda.evaluation import predict_logits
from fercuda.models import FERNet
from fercuda.models import PRETRAINED_FILE, CheckpointError, pretrained, pretrained_metadata, read_checkpoint
from fercuda.models.checkpoint import model_from_checkpoint

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def test_pretrained_ships_with_its_metadata():
    assert PRETRAINED_FILE.is_file(), f"{PRETRAINED_FILE} is missing from the package"
    meta = pretrained_metadata()
    assert meta["classes"] == FER_CLASSES
    assert meta["input_size"] == 48 and meta["width_mult"] == meta["model_config"]["width_mult"]
    assert meta["private_test_images"] == 3589 and meta["public_test_images"] == 3589
    assert meta["private_test_accuracy"] == meta["private_test_correct"] / 3589
    assert meta["training_command"].startswith("fercuda train")
    model = pretrained()
    assert not model.training and model.metadata == meta
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 7)
    assert all(v.dtype == torch.float32 for v in read_checkpoint(PRETRAINED_FILE)["model"].values()
               if v.is_floating_point())


def test_pretrained_as_the_readme_calls_it():
    # A fresh interpreter, so that nothing imported before makes the name resolve.
    code = ("import fercuda.models; m = fercuda.models.pretrained(); "
            "print(type(m).__name__, m.metadata['classes'][3], m.training)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["FERNet", "happy", "False"]


@pytest.fixture(scope="module")
def fer_private_test(fer2013_dir, tmp_path_factory):
    from fercuda.data import load_faces

    data = load_faces(fer2013_dir, cache_dir=tmp_path_factory.mktemp("cache"))
    idx = data.indices("PrivateTest")
    return data.images[idx], data.labels[idx]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_pretrained_accuracy_on_private_test_equals_its_metadata(fer_private_test, fused):
    images, labels = fer_private_test
    assert len(labels) == 3589
    model = pretrained(fused=fused)
    pred = predict_logits(model, images, torch.device("cpu")).argmax(1)
    assert int((pred == labels).sum()) == model.metadata["private_test_correct"]


def test_predict_and_eval_use_the_pretrained_model_by_default(fer2013_dir, tmp_path, capsys):
    face_file = sorted((fer2013_dir / "test" / "happy").glob("PrivateTest_*"))[0]
    cli.main(["predict", str(face_file), "--out", str(tmp_path / "face.png"), "--json", str(tmp_path / "f.json"),
              "--device", "cpu"])
    found = json.loads((tmp_path / "f.json").read_text())[0]["faces"]
    assert len(found) == 1 and found[0]["dominant_emotion"] in FER_CLASSES
    assert cv2.imread(str(tmp_path / "face.png")) is not None


def _small_checkpoint(path, width=0.125, classes=FER_CLASSES):
    model = FERNet(num_classes=len(classes), width_mult=width, fused=False)
    torch.save({"model": model.state_dict(), "model_config": model.config(), "classes": list(classes)}, path)
    return path


def test_exception_truncated_or_foreign_checkpoint(tmp_path):
    good = _small_checkpoint(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: cannot be read as a fercuda checkpoint"):
        read_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt: cannot be read"):
        read_checkpoint(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign.pt: not a fercuda checkpoint: expected the keys"):
        read_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_exception_checkpoint_of_another_width_or_class_list(tmp_path):
    ckpt = read_checkpoint(_small_checkpoint(tmp_path / "w.pt"))
    ckpt["model_config"] = {**ckpt["model_config"], "width_mult": 0.25}  # weights of 0.125, config of 0.25
    with pytest.raises(CheckpointError, match=r"w.pt: its weights do not fit FERNet"):
        model_from_checkpoint(ckpt, tmp_path / "w.pt")
    ckpt = read_checkpoint(_small_checkpoint(tmp_path / "c.pt"))
    ckpt["classes"] = FER_CLASSES[:5]
    with pytest.raises(CheckpointError, match=r"c.pt: 5 class names"):
        model_from_checkpoint(ckpt, tmp_path / "c.pt")


def test_exception_eval_on_data_with_other_classes(tmp_path):
    ckpt = _small_checkpoint(tmp_path / "ck.pt", classes=["a", "b", "c", "d", "e", "f", "g"])
    root = tmp_path / "data"
    for split, prefix in (("train", "Training"), ("test", "PrivateTest")):
        (root / split / "happy").mkdir(parents=True)
        cv2.imwrite(str(root / split / "happy" / f"{prefix}_1.png"), np.full((48, 48), 99, np.uint8))
    with pytest.raises(ValueError, match="differ from the checkpoint's"):
        cli.main(["eval", str(ckpt), "--data", str(root), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])


def test_exception_predict_leaves_no_partial_output(tmp_path, capsys):
    ckpt = _small_checkpoint(tmp_path / "ck.pt")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="broken.mp4"):
        cli.main(["predict", str(ckpt), str(broken), "--out", str(out), "--device", "cpu"])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # An existing output is left as it was when the input cannot be decoded.
    out_png = tmp_path / "out.png"
    out_png.write_bytes(b"keep")
    bad_image = tmp_path / "bad.jpg"
    bad_image.write_bytes(b"no image here")
    with pytest.raises(ValueError, match="bad.jpg cannot be decoded"):
        cli.main(["predict", str(ckpt), str(bad_image), "--out", str(out_png), "--device", "cpu"])
    assert out_png.read_bytes() == b"keep"
    with pytest.raises(ValueError, match="the same file as the input"):
        cli.main(["predict", str(ckpt), str(out_png), "--out", str(out_png), "--device", "cpu"])


def test_predict_says_when_no_face_is_found(tmp_path, capsys):
    ckpt = _small_checkpoint(tmp_path / "ck.pt")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((240, 320), 128, np.uint8))
    detector, _ = cli.face_detector()
    if detector is not None:
        with pytest.raises(ValueError, match="blank.png: no face found.*--whole-image"):
            cli.main(["predict", str(ckpt), str(blank), "--out", str(tmp_path / "o.png"), "--device", "cpu"])
        assert not (tmp_path / "o.png").exists()
    cli.main(["predict", str(ckpt), str(blank), "--out", str(tmp_path / "o.png"), "--device", "cpu",
              "--whole-image", "--json", str(tmp_path / "o.json")])
    assert json.loads((tmp_path / "o.json").read_text())[0]["faces"][0]["box"] == [0, 0, 320, 240]
