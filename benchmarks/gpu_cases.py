"""The cases of the GPU benchmarks, importable without fercuda._C.

bench_canny_gpu.py and bench_dwconv_gpu.py time them; gpu_warmup.py compiles them (the Triton
kernels, torch.compile's graphs) while nvcc builds the extension, so the benchmarks find their
compile caches warm. Both sides must build the same inputs: Triton's cache is keyed by the
kernel's arguments' dtypes and by which integers are divisible by 16, torch.compile's by the
graph and the inputs' shapes, strides and dtypes.
"""

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

# Canny: all of FER2013 (48x48) in one call, and single pictures (H, W).
FER_COUNT = 35887
CANNY_PICTURES = [(1080, 1920), (2160, 3840)]
CANNY_LOW, CANNY_HIGH = 50.0, 150.0

# dwconv: (N, C, H, W) of the network's depthwise blocks.
SHAPES = [(64, 128, 48, 48), (64, 256, 24, 24), (64, 512, 12, 12), (64, 1024, 6, 6), (64, 1536, 6, 6)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = (False, True)  # channels_last
DTYPE = torch.bfloat16  # activations; BatchNorm parameters and statistics stay float32


def make_inputs(shape, channels_last, device="cuda", dtype=DTYPE):
    """x, weight, bias (in dtype), bn_weight, bn_bias, running_mean, running_var (float32): random
    values from a fixed seed, never zeros."""
    n, c, h, w = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*s, dtype=dtype, scale=1.0, offset=0.0):
        return torch.randn(*s, generator=gen, device=device, dtype=torch.float32).mul(scale).add(offset).to(dtype)

    x = randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = randn(c, 1, 3, 3, scale=0.5)
    bias = randn(c, scale=0.5)
    bn_weight = randn(c, dtype=torch.float32, scale=0.2, offset=1.0)
    bn_bias = randn(c, dtype=torch.float32, scale=1.0, offset=2.0)
    running_mean = randn(c, dtype=torch.float32, scale=0.3)
    running_var = randn(c, dtype=torch.float32, scale=0.1, offset=1.0).abs()
    return x, weight, bias, bn_weight, bn_bias, running_mean, running_var


def eager_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=False):
    z = F.conv2d(x, weight, bias, 1, 1, 1, x.shape[1])
    # Under mixed precision BatchNorm takes float32 parameters with low-precision activations.
    return F.relu6(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, 0.1, 1e-5))


def compile_block(inputs):
    """torch.compile of eager_block, compiled for these inputs now; raises unless it compiled.

    Dynamo keeps compiled code per function and, once a function has been recompiled
    torch._dynamo.config.recompile_limit times (8 by default), runs it eagerly without an error:
    a sweep of more shapes than that would time eager code under the name torch.compile. A
    reset per case gives every case its own compile, and the counters prove that it happened.
    Returns the compiled function and what torch.compile's caches said ("hit" / "miss")."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(eager_block, dynamic=False, fullgraph=True)
    compiled(*inputs)
    graphs = counters["stats"]["unique_graphs"]
    if graphs != 1:
        raise RuntimeError(f"torch.compile of eager_block compiled {graphs} graphs instead of 1: "
                           f"it fell back to eager or recompiled (dynamo counters {dict(counters['stats'])})")
    inductor = counters["inductor"]
    cache = "hit" if inductor["fxgraph_cache_hit"] else "miss" if inductor["fxgraph_cache_miss"] else "none"
    return compiled, cache


def assert_still_compiled():
    """After timing: no recompile happened (a guard failure would have compiled a second graph)."""
    graphs = counters["stats"]["unique_graphs"]
    if graphs != 1:
        raise RuntimeError(f"torch.compile recompiled while being timed ({graphs} graphs)")
