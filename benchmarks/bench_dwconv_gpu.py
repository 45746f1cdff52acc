"""GPU benchmarks of the fused depthwise 3x3 conv + BatchNorm + ReLU6 at the network's shapes.

Inference: fercuda's CUDA kernel vs its Triton kernel vs eager PyTorch (conv2d -> batch_norm ->
relu6) vs torch.compile of the same, with the achieved bandwidth (input + output bytes, each
counted once) as a fraction of a device-to-device copy's bandwidth measured in the same run.
torch.compile starts from a reset per case and must compile exactly one graph, never recompiling
while timed (fercuda.compare.dwconv.compile_block): its column is compiled code, never a silent eager fallback.
Training: forward + backward (fused CUDA, fused Triton) vs eager autograd.

Times are medians of triton.testing.do_bench (fercuda.compare.median_ms on cuda: warm-up, then
synchronized repetitions). Each row is printed as soon as it is measured (fercuda.compare.emit);
the inputs and the eager block are fercuda.compare.dwconv's, the environment is recorded once
(gpu_check.py's environment stage, benchmarks/conftest.py). Run:
    python -m pytest benchmarks/bench_dwconv_gpu.py --benchmark-only -s
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the dwconv GPU benchmarks need a CUDA device", allow_module_level=True)

import fercuda  # noqa: E402,F401  (loads the C++ ops)
from fercuda import _build_info  # noqa: E402
from fercuda.compare import emit, median_ms  # noqa: E402
from fercuda.compare.dwconv import assert_still_compiled, block_inputs, compile_block, eager_block  # noqa: E402
from gpu_cases import DTYPE, LAYOUTS, SHAPE_IDS, SHAPES  # noqa: E402
from fercuda.ops import dwconv_bn_relu6  # noqa: E402

if not _build_info.WITH_CUDA:
    pytest.skip("fercuda._C was built without its CUDA kernels", allow_module_level=True)

INFERENCE_HEADER = ("inference bf16      shape            layout  cuda_ms triton_ms eager_ms compile_ms  cuda/copy "
                    "triton/copy  x_eager x_compile (cuda; triton)")
TRAINING_HEADER = "training bf16 fwd+bwd shape           layout  cuda_ms triton_ms eager_ms  cuda_x_eager triton_x_eager"


@pytest.fixture(scope="module")
def copy_gbps():
    """Device-to-device copy bandwidth (read + write bytes), the ceiling for a one-pass kernel."""
    src = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device="cuda")
    return 2 * src.numel() / ms / 1e6


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=("nchw", "channels_last"))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_inference(benchmark, copy_gbps, shape, channels_last):
    inputs = block_inputs(shape, channels_last, DTYPE, "cuda")
    x = inputs[0]
    compiled, compile_cache = compile_block(inputs)
    ops = {
        "cuda": lambda: torch.ops.fercuda.dwconv_bn_relu6(*inputs, 1, 1, 1e-5),
        "triton": lambda: torch.ops.fercuda.dwconv_bn_relu6_triton(*inputs, 1, 1, 1e-5),
        "eager": lambda: eager_block(*inputs),
        "compile": lambda: compiled(*inputs),
    }
    ms = {name: median_ms(fn, device="cuda") for name, fn in ops.items()}
    assert_still_compiled()
    out_bytes = x.numel() * x.element_size()  # stride 1, padding 1: same shape
    gbps = (x.numel() * x.element_size() + out_bytes) / ms["cuda"] / 1e6
    gbps_triton = (x.numel() * x.element_size() + out_bytes) / ms["triton"] / 1e6
    info = {
        "shape": list(shape), "dtype": str(DTYPE), "channels_last": channels_last,
        "copy_GBps": round(copy_gbps, 1),
        **{f"{name}_ms": round(v, 5) for name, v in ms.items()},
        "cuda_GBps": round(gbps, 1), "cuda_fraction_of_copy": round(gbps / copy_gbps, 3),
        "triton_GBps": round(gbps_triton, 1), "triton_fraction_of_copy": round(gbps_triton / copy_gbps, 3),
        "cuda_speedup_vs_eager": round(ms["eager"] / ms["cuda"], 2),
        "cuda_speedup_vs_compile": round(ms["compile"] / ms["cuda"], 2),
        "triton_speedup_vs_eager": round(ms["eager"] / ms["triton"], 2),
        "triton_speedup_vs_compile": round(ms["compile"] / ms["triton"], 2),
        "compile_cache": compile_cache,
    }
    benchmark.extra_info.update(info)
    emit(
        "dwconv_inference", f"{'x'.join(map(str, shape))}-{'cl' if channels_last else 'nchw'}",
        f"inference bf16 {'x'.join(map(str, shape)):>20} {'cl' if channels_last else 'nchw':>7} "
        f"{ms['cuda']:8.4f} {ms['triton']:9.4f} {ms['eager']:8.4f} {ms['compile']:10.4f} "
        f"{info['cuda_fraction_of_copy']:10.3f} {info['triton_fraction_of_copy']:11.3f} "
        f"{info['cuda_speedup_vs_eager']:5.2f};{info['triton_speedup_vs_eager']:5.2f} "
        f"{info['cuda_speedup_vs_compile']:5.2f};{info['triton_speedup_vs_compile']:5.2f}",
        header=INFERENCE_HEADER, **info,
    )

    def run_synchronized():
        ops["cuda"]()
        torch.cuda.synchronize()

    benchmark.pedantic(run_synchronized, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=("nchw", "channels_last"))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_training_forward_backward(benchmark, shape, channels_last):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = block_inputs(shape, channels_last, DTYPE, "cuda")
    grad_out = torch.randn_like(x)

    def fused_cuda():
        out, mean, invstd, _, _, _ = torch.ops.fercuda.dwconv_bn_relu6_train(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, 1, 1, 1e-5, 0.1)
        return torch.ops.fercuda.dwconv_bn_relu6_backward(
            grad_out, x, weight, bias, bn_weight, bn_bias, mean, invstd, 1, 1, True)

    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, bn_weight, bn_bias)]

    def fused_triton():
        out = dwconv_bn_relu6(*leaves, running_mean, running_var, training=True, backend="triton")
        return torch.autograd.grad(out, leaves, grad_out)

    def eager():
        out = eager_block(*leaves, running_mean, running_var, training=True)
        return torch.autograd.grad(out, leaves, grad_out)

    ms = {name: median_ms(fn, device="cuda") for name, fn in (("cuda", fused_cuda), ("triton", fused_triton),
                                                               ("eager", eager))}
    info = {
        "shape": list(shape), "dtype": str(DTYPE), "channels_last": channels_last,
        **{f"{name}_fwd_bwd_ms": round(v, 5) for name, v in ms.items()},
        "cuda_speedup_vs_eager": round(ms["eager"] / ms["cuda"], 2),
        "triton_speedup_vs_eager": round(ms["eager"] / ms["triton"], 2),
    }
    benchmark.extra_info.update(info)
    emit(
        "dwconv_training", f"{'x'.join(map(str, shape))}-{'cl' if channels_last else 'nchw'}",
        f"training bf16 {'x'.join(map(str, shape)):>21} {'cl' if channels_last else 'nchw':>7} "
        f"{ms['cuda']:8.4f} {ms['triton']:9.4f} {ms['eager']:8.4f} {info['cuda_speedup_vs_eager']:13.2f} "
        f"{info['triton_speedup_vs_eager']:14.2f}",
        header=TRAINING_HEADER, **info,
    )

    def run_synchronized():
        fused_cuda()
        torch.cuda.synchronize()

    benchmark.pedantic(run_synchronized, rounds=10, warmup_rounds=2)
