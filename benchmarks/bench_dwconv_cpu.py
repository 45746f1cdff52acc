"""CPU benchmarks of the fused depthwise conv + BatchNorm + ReLU6, float32, the network's shapes.

Run: PYTHONPATH=$PWD python -m pytest benchmarks/bench_dwconv_cpu.py -q -s

Each case times, in one run and by one method (warm repetitions), the fused op and its
peers, and reports the ratios of the medians (printed and in benchmark.extra_info); on a
shared machine the ratios of the fastest runs ("best_*") are printed too.
  inference: fercuda vs eager (conv2d + batch_norm + relu6, eval), vs torch.compile of that
             eager block, vs x.clone() (a plain copy of the same bytes, output allocated as
             the op allocates its own); GB/s counts input + output.
  training:  forward + backward of DWConvBNReLU6 vs nn.Sequential(Conv2d, BatchNorm2d, ReLU6).
Targets: inference >= 5x eager, >= 2x compile, >= 0.5x the copy's bandwidth; training >= 2x eager.
Inputs, the eager block, torch.compile of it and the timer: fercuda.compare (`make compare`'s);
the environment (load average included) is recorded once, by benchmarks/conftest.py.
"""

import copy
import statistics

import pytest
import torch

import fercuda.nn as fnn
from fercuda.compare import times_ms
from fercuda.compare.dwconv import assert_still_compiled, block_inputs, compile_block, eager_block, fused_block

N = 64
# (C, H) of the network's depthwise blocks (stride 1).
SHAPES = [(128, 48), (128, 24), (256, 24), (364, 12), (512, 6), (728, 6), (1536, 6)]
REPS = 9


def _measure(**contenders):
    """{name: sorted times} for each contender, run in turn."""
    return {name: times_ms(fn, REPS, warmup=2) for name, fn in contenders.items()}


def _ratios(times, base="fercuda"):
    info = {}
    for name, t in times.items():
        info[f"{name}_ms"] = statistics.median(t)
    for name, t in times.items():
        if name != base:
            info[f"x_{name}"] = statistics.median(t) / statistics.median(times[base])
            info[f"best_x_{name}"] = t[0] / times[base][0]
    return info


def _record(benchmark, info):
    benchmark.extra_info.update(info)
    print("\n" + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


@pytest.mark.parametrize(
    "channels_last",
    [False, True],
    ids=["nchw", "channels_last"],
)
@pytest.mark.parametrize("c,h", SHAPES, ids=[f"C{c}_{h}x{h}" for c, h in SHAPES])
def test_inference(benchmark, c, h, channels_last):
    if channels_last and (c, h) not in ((128, 48), (256, 24), (728, 6)):
        pytest.skip("channels_last measured on three representative shapes")
    args = block_inputs((N, c, h, h), channels_last=channels_last)
    with torch.no_grad():
        compiled, _ = compile_block(args)
        times = _measure(
            fercuda=lambda: fused_block(*args),
            eager=lambda: eager_block(*args),
            compile=lambda: compiled(*args),
            copy=lambda: args[0].clone(),
        )
        assert_still_compiled()
        benchmark.pedantic(lambda: fused_block(*args), rounds=REPS, warmup_rounds=1)
    gigabytes = 2 * args[0].numel() * args[0].element_size() / 1e9
    info = {"case": f"N{N} C{c} {h}x{h} {'channels_last' if channels_last else 'nchw'}", **_ratios(times)}
    info["fercuda_GBps"] = gigabytes / info["fercuda_ms"] * 1e3
    info["copy_GBps"] = gigabytes / info["copy_ms"] * 1e3
    # The fraction of the copy's bandwidth the fused op reaches: copy time / fused time.
    info["fraction_of_copy_bandwidth"] = info.pop("x_copy")
    info["best_fraction_of_copy_bandwidth"] = info.pop("best_x_copy")
    _record(benchmark, info)


@pytest.mark.parametrize("c,h", SHAPES, ids=[f"C{c}_{h}x{h}" for c, h in SHAPES])
def test_training_forward_backward(benchmark, c, h):
    fused = fnn.DWConvBNReLU6(c).train()
    seq = copy.deepcopy(fused).to_sequential().train()
    x = block_inputs((N, c, h, h))[0].requires_grad_()
    grad = torch.randn(N, c, h, h)

    def step(module):
        def run():
            y = module(x)
            y.backward(grad)
        return run

    times = _measure(fercuda=step(fused), eager=step(seq))
    benchmark.pedantic(step(fused), rounds=REPS, warmup_rounds=1)
    _record(benchmark, {"case": f"N{N} C{c} {h}x{h} train fwd+bwd", **_ratios(times)})
