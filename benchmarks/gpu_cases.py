"""The cases of the GPU benchmarks, importable before fercuda._C is built.

bench_canny_gpu.py and bench_dwconv_gpu.py time them; gpu_warmup.py compiles them (the Triton
kernels, torch.compile's graphs) while nvcc builds the extension, so the benchmarks find their
compile caches warm. Both sides must build the same inputs: Triton's cache is keyed by the
kernel's arguments' dtypes and by which integers are divisible by 16, torch.compile's by the
graph and the inputs' shapes, strides and dtypes. The inputs themselves, the Canny settings and
the eager block come from fercuda.compare (canny.py, dwconv.py), as `make compare`'s do.
"""

import torch

# Canny: all of FER2013 (48x48) in one call, and single pictures (H, W).
FER_COUNT = 35887
CANNY_PICTURES = [(1080, 1920), (2160, 3840)]

# dwconv: (N, C, H, W) of the network's depthwise blocks.
SHAPES = [(64, 128, 48, 48), (64, 256, 24, 24), (64, 512, 12, 12), (64, 1024, 6, 6), (64, 1536, 6, 6)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = (False, True)  # channels_last
DTYPE = torch.bfloat16  # activations; BatchNorm parameters and statistics stay float32
