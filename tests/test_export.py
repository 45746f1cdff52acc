"""`fercuda export`: the ONNX graph, its metadata, and ONNX Runtime against PyTorch on FER2013."""

import numpy as np
import pytest
import torch

from fercuda import cli
from fercuda.data import fer_input
from fercuda.models import CheckpointError, FERNet, pretrained

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fercuda[engines]')")

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


@pytest.fixture(scope="module")
def private_test(fer2013_dir, tmp_path_factory):
    from fercuda.data import load_faces

    data = load_faces(fer2013_dir, cache_dir=tmp_path_factory.mktemp("cache"))
    idx = data.indices("PrivateTest")
    return data.images[idx], data.labels[idx]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "fernet.onnx"
    cli.main(["export", str(path)])
    return path


def test_exported_graph_and_metadata(exported):
    from fercuda.export import read_metadata

    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and {"Conv", "Clip", "MaxPool", "Add"} <= ops
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input" and dims == ["N", 3, 48, 48]
    assert out.name == "logits" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 7]
    meta = read_metadata(exported)
    assert meta["classes"] == FER_CLASSES and meta["opset"] == 17
    assert "cv2.Canny(cv2.GaussianBlur(x, (5, 5), 0), 50, 150)" in meta["input_contract"]
    assert meta["private_test_accuracy"] == pretrained().metadata["private_test_accuracy"]


def test_numpy_input_equals_fercuda_input(private_test):
    from fercuda.export import fer_input_numpy

    images, _ = private_test
    faces = images[:500]
    assert np.array_equal(fer_input_numpy(faces.numpy()), fer_input(faces).numpy())
    assert np.array_equal(fer_input_numpy(faces[:, 0].numpy()), fer_input(faces).numpy())


def test_onnxruntime_gives_the_pytorch_logits_and_accuracy(exported, private_test):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fercuda[engines]')")
    from fercuda.export import fer_input_numpy

    images, labels = private_test
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    x = fer_input_numpy(images.numpy())
    got = np.concatenate([session.run(None, {"input": x[i:i + 512]})[0] for i in range(0, len(x), 512)])
    # The PyTorch logits of the plain network, on a sample (the whole split is slow on 2 cores).
    model = pretrained(fused=False)
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:384])).numpy()
    # Folding BatchNorm reorders float32 operations: differences of a few float32 ulps of the
    # logits' magnitude, far below any difference between classes.
    np.testing.assert_allclose(got[:384], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert (got[:384].argmax(1) == ref.argmax(1)).all()
    # The accuracy stored with the shipped model (measured by PyTorch when it was exported).
    assert int((got.argmax(1) == labels.numpy()).sum()) == model.metadata["private_test_correct"]


def test_export_errors_leave_no_file(tmp_path):
    with pytest.raises(ValueError, match="model.txt must end in .onnx"):
        cli.main(["export", str(tmp_path / "model.txt")])
    model = FERNet(num_classes=7, width_mult=0.125, fused=False)
    ckpt = tmp_path / "w.pt"
    torch.save({"model": model.state_dict(), "model_config": {**model.config(), "width_mult": 0.5},
                "classes": FER_CLASSES}, ckpt)
    with pytest.raises(CheckpointError, match="w.pt: its weights do not fit FERNet"):
        cli.main(["export", str(ckpt), str(tmp_path / "m.onnx")])
    with pytest.raises(FileNotFoundError, match="nothing.pt does not exist"):
        cli.main(["export", str(tmp_path / "nothing.pt"), str(tmp_path / "m.onnx")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
