"""FERNet inference in every engine fercuda.engines offers, at batch 1 and 64, in one run.

    python -m pytest benchmarks/bench_fernet_inference.py -s --benchmark-columns=median,rounds

The shipped FERNet (width 0.25), forward only, on the network input of random faces (the
[canny, x, x] input is computed once, outside the timing). Contenders, each timed in turn round
after round (fercuda.compare.interleaved_times_ms): PyTorch with fercuda's fused model in float32
NCHW, float32 channels_last (engine="torch") and bfloat16 autocast channels_last (where the CPU has native
bfloat16); ONNX Runtime float32; OpenVINO with its default precision (bfloat16 on CPUs with native
bfloat16, float32 elsewhere) and in float32. Engines that are not installed are left out, with
the reason printed. A call at batch 1 runs 16 forwards. Images/s per contender and the fastest
over fercuda's PyTorch are printed and kept in extra_info.
"""

import os
import statistics

import pytest
import torch

from fercuda.compare import emit, interleaved_times_ms
from fercuda.data import fer_input
from fercuda.engines import OnnxRuntimeEngine, OpenVINOEngine, TorchEngine, installed
from fercuda.models import pretrained
from fercuda.runtime import cpu_has_native_bf16

ROUNDS = int(os.environ.get("FERCUDA_BENCH_ROUNDS", "7"))
CALLS_AT_BATCH_1 = 16


def _contenders(x):
    model = pretrained(fused=True)
    out, skipped = {}, []

    @torch.inference_mode()
    def torch_nchw(_):
        return model(x)

    out["torch-fp32"] = torch_nchw
    engine = TorchEngine(pretrained(fused=True), "cpu")  # engine="torch": channels_last on a CPU
    cl_model = engine.model
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out["torch-fp32-cl"] = engine
    if cpu_has_native_bf16():
        @torch.inference_mode()
        def torch_bf16(_):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return cl_model(x_cl)

        out["torch-bf16-cl"] = torch_bf16
    else:
        skipped.append("torch-bf16-cl: this CPU has no native bfloat16 arithmetic")
    from fercuda.export import onnx_bytes

    if installed("onnx"):
        data = onnx_bytes(model)
        if installed("onnxruntime"):
            out["onnxruntime-fp32"] = OnnxRuntimeEngine(data)
        else:
            skipped.append("onnxruntime: not installed")
        if installed("openvino"):
            ov = OpenVINOEngine(data)
            out[f"openvino-{ov.precision}"] = ov
            if ov.precision != "f32":
                out["openvino-f32"] = OpenVINOEngine(data, precision="f32")
        else:
            skipped.append("openvino: not installed")
    else:
        skipped.append("onnxruntime, openvino: onnx is not installed (pip install 'fercuda[engines]')")
    return out, skipped


@pytest.mark.parametrize("batch", [64, 1], ids=["b64", "b1"])
def test_inference_engines(benchmark, batch):
    gen = torch.Generator().manual_seed(0)
    x = fer_input(torch.randint(0, 256, (batch, 1, 48, 48), dtype=torch.uint8, generator=gen))
    engines, skipped = _contenders(x)
    for reason in skipped:
        print(f"\n  left out: {reason}")
    calls = CALLS_AT_BATCH_1 if batch == 1 else 1

    def timed(engine):
        def run():
            for _ in range(calls):
                engine(x)
        return run

    fns = {name: timed(e) for name, e in engines.items()}
    times = interleaved_times_ms(fns, ROUNDS, warmup=2)
    benchmark.group = f"FERNet inference engines, width 0.25, batch {batch}, cpu"
    benchmark.pedantic(fns["torch-fp32"], rounds=1, warmup_rounds=0)
    ips = {name: batch * calls / (statistics.median(t) / 1e3) for name, t in times.items()}
    torch_best = max(v for k, v in ips.items() if k.startswith("torch"))
    for name, v in sorted(ips.items(), key=lambda kv: -kv[1]):
        emit("fernet_inference_engines", f"b{batch}-{name}",
             f"batch {batch:>2} {name:<17} {v:8.1f} images/s  ({v / torch_best:.2f}x fercuda's best PyTorch)",
             engine=name, batch=batch, images_per_s=v, threads=torch.get_num_threads(), rounds=ROUNDS)
    fastest = max(ips, key=ips.get)
    benchmark.extra_info.update(images_per_s=ips, fastest=fastest, fastest_over_torch=ips[fastest] / torch_best)
