"""FERNet as an ONNX graph, for ONNX Runtime, OpenVINO and other ONNX consumers.

    fercuda export model.onnx                      # the shipped FERNet
    fercuda export runs/fer2013 model.onnx         # a run folder's best model, or a .pt file

The graph is the plain network (torch.nn layers only, no fercuda op) with every BatchNorm folded
into the convolution before it: Conv, Clip (ReLU6), MaxPool, Add, GlobalAveragePool. Input
"input", float32 (N, 3, 48, 48) with a dynamic batch dimension N; output "logits", float32
(N, classes). The network's input M = [canny(x), x, x] is computed outside the graph, from
uint8 grayscale 48x48 faces x, by either of two equal means (the test suite checks they give the
same floats):

    fercuda.data.fer_input(torch.from_numpy(faces)[:, None])      # faces: uint8 (N, 48, 48)
    fercuda.export.fer_input_numpy(faces)                         # cv2 only:

    edges = cv2.Canny(cv2.GaussianBlur(face, (5, 5), 0), 50, 150)
    m = np.stack([edges, face, face]).astype(np.float32) * np.float32(2 / 255) - np.float32(1)

The file's metadata (onnx.ModelProto.metadata_props) holds "classes" (a JSON list in output
order), "input_contract" (the paragraph above), "opset", "model_config", "fercuda_version" and,
for the shipped model, its accuracies.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
INPUT_CONTRACT = (
    "float32 (N, 3, 48, 48) = [edges, x, x] * 2/255 - 1 for uint8 grayscale 48x48 faces x "
    "(cv2.resize(gray_crop, (48, 48), interpolation=cv2.INTER_AREA)), edges = "
    "cv2.Canny(cv2.GaussianBlur(x, (5, 5), 0), 50, 150); computed by fercuda.data.fer_input(x) or "
    "fercuda.export.fer_input_numpy(x). Output: logits (N, classes); softmax gives the probabilities."
)


def fer_input_numpy(faces: np.ndarray) -> np.ndarray:
    """The network's input from uint8 faces (N, 48, 48) or (N, 1, 48, 48), with cv2 and numpy
    only: the same float32 values as fercuda.data.fer_input."""
    import cv2

    from fercuda.data.transforms import CANNY_HIGH, CANNY_LOW

    faces = np.asarray(faces)
    if faces.dtype != np.uint8 or faces.ndim not in (3, 4) or (faces.ndim == 4 and faces.shape[1] != 1):
        raise ValueError(f"fer_input_numpy: argument 'faces' must be a uint8 array (N, H, W) or (N, 1, H, W), "
                         f"got {faces.dtype} {faces.shape}")
    faces = faces.reshape(faces.shape[0], faces.shape[-2], faces.shape[-1])
    edges = np.stack([cv2.Canny(cv2.GaussianBlur(f, (5, 5), 0), CANNY_LOW, CANNY_HIGH) for f in faces]) \
        if len(faces) else np.zeros_like(faces)
    m = np.stack([edges, faces, faces], axis=1).astype(np.float32)
    return m * np.float32(2.0 / 255.0) - np.float32(1.0)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of a plain (fused=False) FERNet in eval mode with each BatchNorm2d folded into the
    Conv2d before it (the BatchNorm replaced by nn.Identity). Raises where a BatchNorm is left."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()

    def fold(module: nn.Module) -> None:
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
        for child in module.children():
            fold(child)

    fold(model)
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f"fold_batchnorm: BatchNorm layers not preceded by a Conv2d: {left}")
    return model


def _plain_twin(model: nn.Module) -> nn.Module:
    from fercuda.models import FERNet

    if isinstance(model, FERNet) and model.fused:
        plain = FERNet(**model.config(), fused=False)
        plain.load_state_dict(model.state_dict())
        return plain.eval()
    return model


def onnx_bytes(model: nn.Module, metadata: dict | None = None, opset: int = OPSET) -> bytes:
    """The ONNX file of a FERNet (fused or plain) as bytes: plain layers, BatchNorm folded, a
    dynamic batch, the metadata described in this module's docstring."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("fercuda export needs the onnx package: pip install 'fercuda[onnx]' "
                          "(or pip install onnx)") from e
    model = fold_batchnorm(_plain_twin(model).cpu().float())
    in_channels = getattr(model, "in_channels", 3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, in_channels, 48, 48),), buffer, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}}, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    ops = sorted({n.op_type for n in proto.graph.node})
    if "BatchNormalization" in ops:
        raise RuntimeError(f"onnx export: a BatchNormalization node is left in the graph ({ops})")
    import fercuda

    meta = {"opset": str(opset), "input_contract": INPUT_CONTRACT, "fercuda_version": fercuda.__version__}
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.doc_string = "fercuda", "FERNet (fercuda): " + INPUT_CONTRACT
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# What a checkpoint's metadata contributes to the ONNX file's metadata.
METADATA_KEYS = ("classes", "model_config", "public_test_accuracy", "private_test_accuracy", "dataset")


def export_onnx(checkpoint, dest, opset: int = OPSET) -> dict:
    """Write the FERNet of `checkpoint` (None: the shipped one; a .pt file or a run folder) to
    `dest` as ONNX, atomically. Returns the metadata written."""
    from fercuda.models import load
    from fercuda.runfiles import atomic_write

    dest = Path(dest)
    if dest.suffix.lower() != ".onnx":
        raise ValueError(f"fercuda export: the output {dest} must end in .onnx")
    model = load(checkpoint, fused=False)
    metadata = {k: model.metadata[k] for k in METADATA_KEYS if k in model.metadata}
    metadata["checkpoint"] = Path(model.metadata["checkpoint"]).name
    data = onnx_bytes(model, metadata, opset)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
    return {"opset": opset, **metadata, "bytes": len(data)}


def read_metadata(path) -> dict:
    """The metadata of an ONNX file written by fercuda export, JSON values decoded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for entry in proto.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except ValueError:
            out[entry.key] = entry.value
    return out
