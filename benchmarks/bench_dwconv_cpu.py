"""CPU benchmarks of the fused depthwise conv + BatchNorm + ReLU6 at the network's block shapes, in
both layouts and both precisions a user trains in.

Run: python -m pytest benchmarks/bench_dwconv_cpu.py -q -s
     FERCUDA_BENCH_WIDTHS=0.25,1.0 ...   (the shapes of FERNet at these widths; default 0.25,
                                          the width `fercuda train` ships)

Shapes: fercuda.compare.dwconv.network_block_shapes(width) (N=64), each measured once however
many blocks share it. Each case: layout NCHW or channels_last, dtype float32 or bfloat16
(bfloat16 activations and conv weights with float32 BatchNorm parameters and statistics, as
autocast runs the eager block). The contenders of a case are timed in turn, round after round
(fercuda.compare.interleaved_times_ms), and the ratios are of their medians; the fastest
runs' ratios ("best_x_*") are printed too.
  inference: fercuda vs eager (conv2d + batch_norm + relu6, eval) in the same layout and dtype,
             vs torch.compile of that eager block, and vs oneDNN's conv with ReLU6 fused as a
             post-op and BatchNorm folded into its weights (fercuda.compare.dwconv.onednn_fused_block).
  training:  forward + backward of DWConvBNReLU6 vs nn.Sequential(Conv2d, BatchNorm2d, ReLU6),
             train mode, under CPU autocast for bfloat16, as a user trains either.
test_summary (last) prints the geometric means over the shapes per mode, layout and dtype, and
every case where fercuda is slower than eager; BENCHMARKS.md has the figures.
Targets: inference >= 5x eager and >= 2x torch.compile (geometric mean), training >= 2x eager
(geometric mean), and no case slower than eager.
"""

import copy
import math
import os
import statistics

import pytest
import torch

import fercuda.nn as fnn
from fercuda.compare import interleaved_times_ms
from fercuda.compare.dwconv import (assert_still_compiled, block_inputs, compile_block, eager_block, fused_block,
                                    network_block_shapes, onednn_fused_block)
from fercuda.runtime import keep_freed_memory

WIDTHS = [float(w) for w in os.environ.get("FERCUDA_BENCH_WIDTHS", "0.25").split(",")]
ROUNDS = int(os.environ.get("FERCUDA_BENCH_ROUNDS", "7"))
SHAPES = [(w, shape) for w in WIDTHS for shape in network_block_shapes(w)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = {}  # (mode, layout, dtype name, width, shape) -> {contender: median ms}

# As `fercuda train` does, for every contender alike: freed activations stay in the heap.
keep_freed_memory()


def _ratios(times, base="fercuda"):
    info = {f"{name}_ms": statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        if name != base:
            info[f"x_{name}"] = statistics.median(t) / statistics.median(times[base])
            info[f"best_x_{name}"] = t[0] / times[base][0]
    return info


def _record(benchmark, key, times):
    RESULTS[key] = {name: statistics.median(t) for name, t in times.items()}
    mode, layout, dtype, width, shape = key
    n, c, h, w, stride = shape
    info = {"case": f"{mode} {layout} {dtype} width {width} N{n} C{c} {h}x{w} s{stride}", **_ratios(times)}
    benchmark.extra_info.update(info)
    print("\n" + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


def _ids(shapes):
    return [f"w{w}-C{s[1]}_{s[2]}x{s[3]}_s{s[4]}" for w, s in shapes]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("width,shape", SHAPES, ids=_ids(SHAPES))
def test_inference(benchmark, width, shape, layout, dtype):
    n, c, h, w, stride = shape
    args = block_inputs((n, c, h, w), channels_last=layout == "channels_last", dtype=DTYPES[dtype])
    with torch.no_grad():
        compiled, _ = compile_block((*args, stride))
        onednn = onednn_fused_block(*args, stride=stride)
        times = interleaved_times_ms({
            "fercuda": lambda: fused_block(*args, stride=stride),
            "eager": lambda: eager_block(*args, stride=stride),
            "compile": lambda: compiled(*args, stride),
            "onednn": lambda: onednn(args[0]),
        }, ROUNDS, warmup=2)
        assert_still_compiled()
        benchmark.pedantic(lambda: fused_block(*args, stride=stride), rounds=3, warmup_rounds=1)
    _record(benchmark, ("inference", layout, dtype, width, shape), times)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("width,shape", SHAPES, ids=_ids(SHAPES))
def test_training(benchmark, width, shape, layout, dtype):
    n, c, h, w, stride = shape
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    fused = fnn.DWConvBNReLU6(c, stride=stride).train().to(memory_format=memory_format)
    seq = copy.deepcopy(fused).to_sequential().train()
    low = DTYPES[dtype] if DTYPES[dtype] != torch.float32 else None
    x = block_inputs((n, c, h, w), channels_last=layout == "channels_last", dtype=DTYPES[dtype])[0]
    x.requires_grad_()
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1  # 3x3, padding 1
    grad = torch.randn(n, c, h_out, w_out, dtype=DTYPES[dtype]).contiguous(memory_format=memory_format)

    def step(module):
        def run():
            with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
                y = module(x)
            y.backward(grad)
        return run

    times = interleaved_times_ms({"fercuda": step(fused), "eager": step(seq)}, ROUNDS, warmup=2)
    benchmark.pedantic(step(fused), rounds=3, warmup_rounds=1)
    _record(benchmark, ("training", layout, dtype, width, shape), times)


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def test_summary():
    """Geometric means of the speed-ups over the shapes, and the cases slower than eager."""
    if not RESULTS:
        pytest.skip("no case measured in this run")
    lines = ["", "fercuda speed-up (geometric mean over the network's block shapes):"]
    groups = sorted({(mode, layout, dtype, width) for mode, layout, dtype, width, _ in RESULTS})
    for group in groups:
        cases = [r for k, r in RESULTS.items() if k[:4] == group]
        figures = [f"vs eager {_geomean([r['eager'] / r['fercuda'] for r in cases]):.2f}x"]
        if all("compile" in r for r in cases):
            figures.append(f"vs torch.compile {_geomean([r['compile'] / r['fercuda'] for r in cases]):.2f}x")
        if all("onednn" in r for r in cases):
            figures.append(f"vs oneDNN fused conv {_geomean([r['onednn'] / r['fercuda'] for r in cases]):.2f}x")
        lines.append(f"  {group[0]:9s} {group[1]:13s} {group[2]} width {group[3]}: {', '.join(figures)}"
                     f" ({len(cases)} shapes)")
    slower = [(k, r) for k, r in RESULTS.items() if r["fercuda"] > r["eager"]]
    lines.append(f"cases slower than eager: {len(slower)} of {len(RESULTS)}")
    for (mode, layout, dtype, width, shape), r in slower:
        lines.append(f"  {mode} {layout} {dtype} width {width} {shape}: {r['eager'] / r['fercuda']:.2f}x"
                     f" ({r['fercuda']:.2f} ms vs {r['eager']:.2f} ms)")
    print("\n".join(lines))
