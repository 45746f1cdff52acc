"""The fused depthwise conv + BatchNorm + ReLU6 next to what a user would otherwise run: its sample
inputs, the eager block (the reference, in float64, and a peer), torch.compile of that block, and
the dwconv section of ``python -m fercuda.compare``.

benchmarks/bench_dwconv_cpu.py, bench_dwconv_gpu.py and gpu_warmup.py build the same inputs and
compile the same block. fercuda.ops is imported where it is used: gpu_warmup.py compiles the eager
block before fercuda._C is built.
"""

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fercuda.compare import Row, median_ms

# (N, C, H, W) of the network's depthwise blocks, reduced in N to keep the table quick.
SECTION_CASES = [(64, 128, 48, 48), (64, 256, 24, 24), (64, 728, 6, 6)]
EPS = 1e-5


def block_inputs(shape, channels_last=False, dtype=torch.float32, device="cpu", seed=0):
    """x, weight, bias (in dtype), bn_weight, bn_bias, running_mean, running_var (float32, as under
    mixed precision): random values from a fixed seed, drawn on `device`, never zeros."""
    n, c, h, w = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, dtype=dtype, scale=1.0, offset=0.0):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).mul(scale).add(offset).to(dtype)

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


def network_block_shapes(width_mult, batch=64, image_size=48):
    """{(N, C, H, W, stride): how many blocks} of FERNet's depthwise blocks at width_mult, in
    the network's order, found by running the model on one batch (so they follow the model)."""
    import fercuda.nn as fnn
    from fercuda.models import FERNet

    model = FERNet(width_mult=width_mult, in_channels=3).eval()
    shapes = {}

    def hook(module, inputs, _output):
        key = (*inputs[0].shape, module.conv.stride[0])
        shapes[key] = shapes.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, fnn.DWConvBNReLU6)]
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, image_size, image_size))  # FERNet's input: [canny, x, x]
    finally:
        for h in handles:
            h.remove()
    return shapes


def eager_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1, training=False):
    """What a user writes: conv2d (depthwise 3x3, padding 1) + batch_norm + relu6."""
    z = F.conv2d(x, weight, bias, stride, 1, 1, x.shape[1])
    # Under mixed precision BatchNorm takes float32 parameters with low-precision activations.
    return F.relu6(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, 0.1, EPS))


def fused_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1):
    """fercuda's fused op on the same arguments, inference."""
    from fercuda.ops import dwconv_bn_relu6

    return dwconv_bn_relu6(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=stride, eps=EPS)


def onednn_fused_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1):
    """oneDNN's inference conv with ReLU6 fused as a post-op, BatchNorm folded into its weights
    and bias beforehand (as Inductor does under freezing): the fastest form of the eager block
    a user can run on a CPU without fercuda. Returns a function of x, the folding done once."""
    scale = bn_weight.double() / torch.sqrt(running_var.double() + EPS)
    conv_bias = torch.zeros_like(scale) if bias is None else bias.double()
    w = (weight.double() * scale.view(-1, 1, 1, 1)).to(x.dtype)
    b = ((conv_bias - running_mean.double()) * scale + bn_bias.double()).to(x.dtype)
    groups = x.shape[1]
    op = torch.ops.mkldnn._convolution_pointwise

    def run(inp):
        return op(inp, w, b, [1, 1], [stride, stride], [1, 1], groups, "hardtanh", [0.0, 6.0], "")

    return run


def max_error_vs_float64(args, stride=1):
    """The largest |fused - eager block in float64| (inference)."""
    y = fused_block(*args, stride=stride)
    ref = eager_block(*(None if a is None else a.double() for a in args), stride=stride)
    return (y.double() - ref).abs().max().item()


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


def dwconv_section(cases=SECTION_CASES, repeat=5):
    """Inference, float32, CPU: fercuda against eager PyTorch and torch.compile of the same block;
    the reference is the eager block in float64."""
    rows = []
    with torch.no_grad():
        for shape in cases:
            args = block_inputs(shape)
            compiled, _ = compile_block(args)  # compiled outside the timing
            t_fused = median_ms(lambda: fused_block(*args), repeat, warmup=2)
            peers = {"eager PyTorch": median_ms(lambda: eager_block(*args), repeat, warmup=2),
                     "torch.compile": median_ms(lambda: compiled(*args), repeat, warmup=2)}
            assert_still_compiled()
            rows.append(Row("dwconv_bn_relu6", "cpu f32 " + "x".join(map(str, shape)), "float64", None, t_fused,
                            peers, max_error=max_error_vs_float64(args)))
    return rows
