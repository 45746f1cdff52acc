"""Inference engines for FERNet: the same network in PyTorch (fercuda's fused ops), ONNX Runtime
or OpenVINO, behind one call: engine(x) -> logits, x the float32 network input (N, 3, 48, 48)
of fercuda.data.fer_input, logits a float32 CPU tensor (N, classes).

    engine = make_engine("auto", model, device)    # model: a FERNet (fercuda.models.load)

ONNX Runtime and OpenVINO are optional (pip install 'fercuda[engines]'); they run the ONNX graph
of fercuda.export (plain layers, BatchNorm folded) on the CPU. "auto" picks, on a CPU, the
first installed of openvino, onnxruntime, torch: the order of their measured speed on FERNet
inference at batch 1 and 64 (benchmarks/bench_fernet_inference.py, BENCHMARKS.md); on a CUDA
device, torch.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

ENGINES = ("torch", "onnxruntime", "openvino")
# The CPU order of "auto", fastest first (BENCHMARKS.md, "FERNet inference engines").
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
PIP_NAMES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


class EngineUnavailable(ImportError):
    """An engine asked for by name that is not installed, or that cannot run on the device asked for."""


def installed(name: str) -> bool:
    return name == "torch" or importlib.util.find_spec(name) is not None


def installed_engines() -> list[str]:
    return [e for e in ENGINES if installed(e)]


def resolve_engine(name: str, device) -> str:
    """The engine `name` stands for on `device`: "auto" resolved, a missing engine an error that names it."""
    device = torch.device(device)
    if name == "auto":
        if device.type != "cpu":
            return "torch"
        return next(e for e in AUTO_ORDER if installed(e))
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or 'auto', got {name!r}")
    if not installed(name):
        raise EngineUnavailable(f"engine {name!r} is not installed: pip install {PIP_NAMES[name]} "
                                f"(or pip install 'fercuda[engines]'); installed engines: {installed_engines()}")
    if name != "torch" and device.type != "cpu":
        raise EngineUnavailable(f"engine {name!r} runs on the CPU here; got device {device} (use engine='torch')")
    return name


class TorchEngine:
    """FERNet in PyTorch, float32, eval mode; the fused model (fercuda's ops) unless given a plain
    one. On a CPU in channels_last, which ran it 1.5x faster than NCHW at batch 64 and 1.1x at
    batch 1 there (benchmarks/bench_fernet_inference.py, BENCHMARKS.md)."""

    name = "torch"

    def __init__(self, model, device):
        self.device = torch.device(device)
        self.channels_last = self.device.type == "cpu"
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, onnx_model: bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"input": x})[0])


class OpenVINOEngine:
    """OpenVINO on the CPU, with its default inference precision (bfloat16 on CPUs with native
    bfloat16 arithmetic, float32 elsewhere) unless precision="f32" is asked for."""

    name = "openvino"

    def __init__(self, onnx_model: bytes, precision: str | None = None, threads: int | None = None):
        import io

        import openvino as ov

        core = ov.Core()
        config = {}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        model = ov.convert_model(io.BytesIO(onnx_model))
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        out = self.request.infer({0: x})
        return torch.from_numpy(np.array(next(iter(out.values())), dtype=np.float32, copy=True))


def _onnx_of(model) -> bytes:
    """The ONNX graph of a FERNet: exported (about 2 s on 2 cores), or the copy an earlier export
    of the same weights left in fercuda's cache folder (keyed by the weights, the configuration
    and the torch and fercuda versions)."""
    import hashlib
    from pathlib import Path

    import fercuda
    from fercuda.data import default_cache_dir
    from fercuda.export import OPSET, onnx_bytes

    classes = list((getattr(model, "metadata", None) or {}).get("classes", []))
    key = hashlib.sha256(f"{fercuda.__version__} {torch.__version__} {OPSET} {classes}".encode())
    if hasattr(model, "config"):
        key.update(repr(model.config()).encode())
    for name, t in model.state_dict().items():
        key.update(name.encode())
        key.update(t.detach().cpu().contiguous().numpy().tobytes())
    cache = default_cache_dir() / "onnx" / f"fernet-{key.hexdigest()[:24]}.onnx"
    if cache.is_file():
        return cache.read_bytes()
    data = onnx_bytes(model, {"classes": classes})
    try:
        from fercuda.runfiles import atomic_write

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: Path(tmp).write_bytes(data))
    except OSError:  # a read-only cache folder: export each time
        pass
    return data


def make_engine(name: str, model, device="cpu", **options):
    """An engine running `model` (a FERNet, fused or plain) on `device`; name "auto", "torch",
    "onnxruntime" or "openvino"; options go to the engine (threads, precision for OpenVINO)."""
    resolved = resolve_engine(name, device)
    if resolved == "torch":
        return TorchEngine(model, device)
    data = _onnx_of(model)
    if resolved == "onnxruntime":
        return OnnxRuntimeEngine(data, threads=options.get("threads"))
    return OpenVINOEngine(data, precision=options.get("precision"), threads=options.get("threads"))
