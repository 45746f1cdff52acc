"""The fused depthwise conv + BatchNorm + ReLU6 next to what a user would otherwise run.

``dwconv_section()`` returns rows for the comparison table of ``python -m fercuda.compare``:
accuracy against eager PyTorch in float64 and CPU timings against eager PyTorch and
torch.compile of the same block. ``python -m fercuda.compare_dwconv`` prints them alone.
"""

import statistics
import time

import torch
import torch.nn.functional as F

from fercuda.ops import dwconv_bn_relu6

# (N, C, H, W) of the network's depthwise blocks, reduced in N to keep the table quick.
SECTION_CASES = [(64, 128, 48, 48), (64, 256, 24, 24), (64, 728, 6, 6)]


def block_inputs(shape, dtype=torch.float32, channels_last=False, seed=0, device="cpu"):
    """x, weight, bias (None), bn_weight, bn_bias, running_mean, running_var."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape

    def rand(*size, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=gen) * scale + offset).to(device=device, dtype=dtype)

    x = rand(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    running_var = (torch.rand(c, generator=gen) + 0.5).to(device=device, dtype=dtype)
    return [x, rand(c, 1, 3, 3, scale=0.5), None, rand(c, scale=0.3, offset=1.5), rand(c, scale=0.5, offset=1.5),
            rand(c, scale=0.2), running_var]


def eager_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1):
    """What a user writes: conv2d + batch_norm + relu6, BatchNorm in eval mode."""
    z = F.conv2d(x, weight, bias, stride, 1, groups=x.shape[1])
    return F.relu6(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, False, 0.0, 1e-5))


def fused_block(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=1):
    return dwconv_bn_relu6(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=stride)


def times_ms(fn, reps=7, warmup=2):
    """Sorted wall times of reps warm calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)


def median_ms(fn, reps=7, warmup=2):
    return statistics.median(times_ms(fn, reps, warmup))


def max_error_vs_float64(args, stride=1):
    y = fused_block(*args, stride=stride)
    ref = eager_block(*(None if a is None else a.double() for a in args), stride=stride)
    return (y.double() - ref).abs().max().item()


def dwconv_section(cases=SECTION_CASES, reps=5):
    """Rows (case, max error vs float64, fercuda ms, eager ms, compile ms, speed-up vs eager,
    speed-up vs compile), inference, float32, CPU."""
    compiled = torch.compile(eager_block, dynamic=True)
    rows = []
    with torch.no_grad():
        for shape in cases:
            args = block_inputs(shape)
            compiled(*args)  # compile outside the timing
            t_fused = median_ms(lambda: fused_block(*args), reps)
            t_eager = median_ms(lambda: eager_block(*args), reps)
            t_compile = median_ms(lambda: compiled(*args), reps)
            rows.append((
                "dwconv_bn_relu6 cpu f32 " + "x".join(map(str, shape)),
                max_error_vs_float64(args),
                t_fused,
                t_eager,
                t_compile,
                t_eager / t_fused,
                t_compile / t_fused,
            ))
    return rows


HEADER = ("case", "max err vs f64", "fercuda ms", "eager ms", "compile ms", "x eager", "x compile")


def format_rows(rows):
    lines = ["{:<40} {:>14} {:>11} {:>9} {:>11} {:>8} {:>10}".format(*HEADER)]
    for case, err, tf, te, tc, se, sc in rows:
        lines.append(f"{case:<40} {err:>14.2e} {tf:>11.2f} {te:>9.2f} {tc:>11.2f} {se:>8.1f} {sc:>10.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_rows(dwconv_section()))
