"""CPU benchmarks of BatchNorm + ReLU6 + residual add (fercuda.ops.batch_norm_act) where FERNet uses
it, after its stem, pointwise and shortcut convs, in both layouts and both precisions a user trains in.

Run: python -m pytest benchmarks/bench_bn_act_cpu.py -q -s
     FERCUDA_BENCH_WIDTHS=0.25,1.0 ...   (FERNet's shapes at these widths; default 0.25)
     FERCUDA_BENCH_COMPILE=0 ...         (leave torch.compile out: a compile a case)
     FERCUDA_BENCH_THREADS=1 ...         (torch's thread count for every contender; default torch's)

Shapes: fercuda.compare.bn_act.network_bn_shapes(width) (N=64), each with the activation and the
residual add the network has there, measured once however many layers share it. Each case: layout
NCHW or channels_last, dtype float32 or bfloat16 (bfloat16 x and residual with float32 BatchNorm
parameters and statistics, as autocast runs the eager chain). The contenders of a case are timed
in turn, round after round (fercuda.compare.interleaved_times_ms), and the ratios are of their
medians.
  inference: batch_norm_act vs eager (batch_norm + hardtanh + add, eval) and torch.compile of it.
  training:  forward + backward with batch statistics of the same three; the gradient a dense
             tensor in the output's layout.
test_summary (last) prints the geometric means over the shapes per mode, layout and dtype, and every
case slower than eager. Targets: >= 1.5x eager (geometric mean), no case below 1.0x.
"""

import math
import os
import statistics

import pytest
import torch

from fercuda.compare import interleaved_times_ms
from fercuda.compare.bn_act import bn_act_inputs, eager_chain, fused_chain, network_bn_shapes
from fercuda.runtime import keep_freed_memory

WIDTHS = [float(w) for w in os.environ.get("FERCUDA_BENCH_WIDTHS", "0.25").split(",")]
ROUNDS = int(os.environ.get("FERCUDA_BENCH_ROUNDS", "7"))
COMPILE = os.environ.get("FERCUDA_BENCH_COMPILE", "1") != "0"
if os.environ.get("FERCUDA_BENCH_THREADS"):
    # On a machine shared with other work, two threads of an op wait on each other whenever one
    # is descheduled (steps of several ms at these sub-ms sizes); one thread does not.
    torch.set_num_threads(int(os.environ["FERCUDA_BENCH_THREADS"]))
SHAPES = [(w, shape) for w in WIDTHS for shape in network_bn_shapes(w)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = {}  # (mode, layout, dtype name, width, shape) -> {contender: median ms}

keep_freed_memory()


def _record(key, times):
    RESULTS[key] = {name: statistics.median(t) for name, t in times.items()}
    mode, layout, dtype, width, (n, c, h, w, relu6, residual) = key
    kind = ("relu6" if relu6 else "identity") + ("+add" if residual else "")
    ratios = "  ".join(f"x_{name}={RESULTS[key][name] / RESULTS[key]['fercuda']:.2f}" for name in times
                       if name != "fercuda")
    print(f"\n{mode} {layout} {dtype} width {width} N{n} C{c} {h}x{w} {kind}: "
          f"fercuda {RESULTS[key]['fercuda']:.3f} ms  {ratios}")


def _ids(shapes):
    return [f"w{w}-C{s[1]}_{s[2]}x{s[3]}" + ("_relu6" if s[4] else "") + ("_add" if s[5] else "") for w, s in shapes]


def _compiled(training):
    torch._dynamo.reset()
    return torch.compile(lambda *a, relu6: eager_chain(*a, relu6=relu6, training=training), dynamic=False,
                         fullgraph=True)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("width,shape", SHAPES, ids=_ids(SHAPES))
def test_inference(width, shape, layout, dtype):
    n, c, h, w, relu6, residual = shape
    args = bn_act_inputs((n, c, h, w), residual=residual, channels_last=layout == "channels_last",
                         dtype=DTYPES[dtype])
    contenders = {"fercuda": lambda: fused_chain(*args, relu6=relu6),
                  "eager": lambda: eager_chain(*args, relu6=relu6)}
    with torch.no_grad():
        if COMPILE:
            compiled = _compiled(False)
            compiled(*args, relu6=relu6)
            contenders["compile"] = lambda: compiled(*args, relu6=relu6)
        times = interleaved_times_ms(contenders, ROUNDS, warmup=2)
    _record(("inference", layout, dtype, width, shape), times)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("width,shape", SHAPES, ids=_ids(SHAPES))
def test_training(width, shape, layout, dtype):
    n, c, h, w, relu6, residual = shape
    x, weight, bias, rm, rv, res = bn_act_inputs((n, c, h, w), residual=residual,
                                                 channels_last=layout == "channels_last", dtype=DTYPES[dtype])
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    res = None if res is None else res.requires_grad_()
    grad = torch.randn(x.shape, dtype=torch.float32).to(x.dtype).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    def step(fn):
        def run():
            fn(*leaves, rm, rv, res, relu6=relu6, training=True).backward(grad)
        return run

    contenders = {"fercuda": step(fused_chain), "eager": step(eager_chain)}
    if COMPILE:
        compiled = _compiled(True)
        contenders["compile"] = step(lambda *a, relu6, training: compiled(*a, relu6=relu6))
    times = interleaved_times_ms(contenders, ROUNDS, warmup=2)
    _record(("training", layout, dtype, width, shape), times)


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def test_summary():
    """Geometric means of the speed-ups over the shapes, and the cases slower than eager."""
    if not RESULTS:
        pytest.skip("no case measured in this run")
    lines = ["", f"batch_norm_act speed-up (geometric mean over FERNet's shapes, {torch.get_num_threads()} threads):"]
    for group in sorted({k[:4] for k in RESULTS}):
        cases = [r for k, r in RESULTS.items() if k[:4] == group]
        figures = [f"vs eager {_geomean([r['eager'] / r['fercuda'] for r in cases]):.2f}x"
                   f" (min {min(r['eager'] / r['fercuda'] for r in cases):.2f}x)"]
        if all("compile" in r for r in cases):
            figures.append(f"vs torch.compile {_geomean([r['compile'] / r['fercuda'] for r in cases]):.2f}x")
        lines.append(f"  {group[0]:9s} {group[1]:13s} {group[2]} width {group[3]}: {', '.join(figures)}"
                     f" ({len(cases)} shapes)")
    slower = [(k, r) for k, r in RESULTS.items() if r["fercuda"] > r["eager"]]
    lines.append(f"cases slower than eager: {len(slower)} of {len(RESULTS)}")
    for (mode, layout, dtype, width, shape), r in slower:
        lines.append(f"  {mode} {layout} {dtype} width {width} {shape}: {r['eager'] / r['fercuda']:.2f}x"
                     f" ({r['fercuda']:.3f} ms vs {r['eager']:.3f} ms)")
    print("\n".join(lines))
