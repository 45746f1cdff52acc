"""Fill Triton's and torch.compile's on-disk caches while nvcc builds fercuda._C.

On a fresh machine each Triton kernel variant compiles on its first call (0.3-5 s) and each
torch.compile graph too: without this, the benchmarks would spend their time caps compiling, and
the GPU tests would compile the same variants in every pytest-xdist worker. gpu_check.sh runs the
parts beside the build, each in its own process; the caches they fill are the ones later
processes read (~/.triton/cache, torch.compile's /tmp/torchinductor_<user>).

    python benchmarks/gpu_warmup.py canny      Triton Canny at bench_canny_gpu.py's shapes
    python benchmarks/gpu_warmup.py dwconv     Triton dwconv at bench_dwconv_gpu.py's cases
    python benchmarks/gpu_warmup.py compile    torch.compile of bench_dwconv_gpu.py's eager block, per case
    python benchmarks/gpu_warmup.py tests      the variants the GPU tests use (odd sizes, dtypes, strides)
    python benchmarks/gpu_warmup.py dwconv --shard 1/4    every 4th case from the 2nd: parts in parallel

A Triton module whose imports are torch, triton and fercuda._checks alone loads before the build
ends: a bare stand-in for the fercuda package lets it load without fercuda/__init__.py (which
loads _C). fercuda/triton/canny.py does, and so do the cases' inputs and the eager block
(fercuda.compare.canny, fercuda.compare.dwconv), shared with the benchmarks and `make compare`. One that needs more of fercuda (dwconv.py registers its
fakes and autograd beside the C++ ops') makes its part wait for the build's fercuda/_C*.so and
start again with the real package. torch.compile's part needs no fercuda at all.

--dry: tiny CPU tensors under TRITON_INTERPRET=1, one case per part: the plumbing without a GPU.
"""

import argparse
import glob
import importlib
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AFTER_BUILD = "--after-build"


def stand_in_package():
    """A bare fercuda package, without fercuda/__init__.py (which loads _C): its submodules that
    need no fercuda._C load through it while the build runs."""
    if AFTER_BUILD not in sys.argv and "fercuda" not in sys.modules:
        package = types.ModuleType("fercuda")
        package.__path__ = [str(ROOT / "fercuda")]
        sys.modules["fercuda"] = package


if __name__ == "__main__":
    if "--dry" in sys.argv[1:]:
        # Triton reads this when it is imported (torch and fercuda.compare import it): set before.
        os.environ["TRITON_INTERPRET"] = "1"
    stand_in_package()  # fercuda.compare's inputs are needed before the build ends

import torch  # noqa: E402

from fercuda.compare.canny import HIGH, LOW  # noqa: E402
from fercuda.compare.dwconv import block_inputs, compile_block  # noqa: E402
from gpu_cases import CANNY_PICTURES, DTYPE, FER_COUNT, LAYOUTS, SHAPES  # noqa: E402

STARTED = float(os.environ.get("GPU_WARMUP_STARTED", time.time()))
DEVICE = "cuda"  # "cpu" with --dry
DRY = False
SHARD = (0, 1)  # --shard K/N: this process warms every N-th case from the K-th


def log(*msg):
    print(f"[{time.strftime('%H:%M:%S')}]", *msg, flush=True)


def fercuda_module(name):
    """fercuda.<name>: through the stand-in package while the build runs, where it loads so."""
    stand_in_package()
    try:
        return importlib.import_module(f"fercuda.{name}")
    except Exception as e:
        if AFTER_BUILD in sys.argv:
            raise
        # It needs the extension: start again once the build has written it (a dry run uses the
        # extension already built).
        log(f"fercuda.{name} needs fercuda._C ({type(e).__name__}: {e}); waiting for the build")
        if not DRY:
            wait_for_extension()
        log("fercuda._C is there: starting again with the real package")
        os.execv(sys.executable, [sys.executable, *sys.argv, AFTER_BUILD])


def wait_for_extension():
    """Until the build has ended: gpu_check.py writes its exit status to the file that
    $GPU_WARMUP_BUILD_DONE names; without it, until a fercuda/_C*.so newer than this warm-up's
    start stops growing (the build copies it last)."""
    marker = os.environ.get("GPU_WARMUP_BUILD_DONE")
    while marker:
        if os.path.exists(marker):
            status = Path(marker).read_text().strip()
            if status != "0":
                raise SystemExit(f"the build failed (exit status {status}): no fercuda._C to warm up with")
            return
        time.sleep(0.5)
    last = None
    while True:
        built = [p for p in glob.glob(str(ROOT / "fercuda" / "_C*.so")) if os.stat(p).st_mtime >= STARTED - 1]
        size = sum(os.stat(p).st_size for p in built)
        if built and size == last:
            return
        last = size if built else None
        time.sleep(1.0)


def timed(label, fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    log(f"{label}: {time.perf_counter() - t0:.2f} s")
    return result


def shard(cases):
    k, n = SHARD
    return cases[k::n]


def uint8_images(shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def dwconv_step(inputs, training, stride=1):
    """The Triton dwconv forward and its backward (its autograd, as fercuda.ops calls it)."""
    ops = fercuda_module("ops")
    leaves = [t.detach().requires_grad_() for t in inputs[:5]]
    out = ops.dwconv_bn_relu6(*leaves, inputs[5].clone(), inputs[6].clone(), stride=stride, training=training,
                              backend="triton")
    return torch.autograd.grad(out, leaves, torch.randn_like(out))


def warm_canny():
    canny = fercuda_module("triton.canny")
    shapes = [(3, 8, 8)] if DRY else [(FER_COUNT, 48, 48)] + CANNY_PICTURES
    for shape in shapes:
        img = uint8_images(shape)
        timed(f"triton canny {shape}", canny.canny, img, LOW, HIGH)


def warm_dwconv():
    fercuda_module("triton.dwconv")
    cases = [((2, 3, 5, 7), False)] if DRY else [(s, cl) for s in SHAPES for cl in LAYOUTS]
    for shape, channels_last in shard(cases):
        inputs = block_inputs(shape, channels_last, DTYPE, DEVICE)
        with torch.no_grad():
            timed(f"triton dwconv {shape} channels_last={channels_last} inference",
                  fercuda_module("ops").dwconv_bn_relu6, *inputs, backend="triton")
        if not DRY:
            timed(f"triton dwconv {shape} channels_last={channels_last} training forward + backward",
                  dwconv_step, inputs, training=True)


def warm_compile():
    cases = [((2, 3, 5, 7), False)] if DRY else [(s, cl) for s in SHAPES for cl in LAYOUTS]
    for shape, channels_last in shard(cases):
        inputs = block_inputs(shape, channels_last, DTYPE, DEVICE)
        _, cache = timed(f"torch.compile eager_block {shape} channels_last={channels_last}", compile_block, inputs)
        log(f"  cache {cache}")


def warm_tests():
    """The compile keys of the GPU tests beyond the benchmarks': odd sizes (integers not divisible
    by 16), every dtype, stride 2, each Canny option, both Canny paths (one program per image, tiles)."""
    canny = fercuda_module("triton.canny")
    pictures = [(2, 7, 13)] if DRY else [(5, 37, 45), (2, 48, 48), (1, 130, 250), (1, 256, 256)]
    options = [(5, False, "sobel"), (3, True, "sobel"), (7, False, "sobel"), (0, False, "paper"), (5, True, "paper")]
    for shape in pictures:
        img = uint8_images(shape)
        for ksize, l2, gradient in options[:1] if DRY else options:
            timed(f"triton canny {shape} ksize={ksize} l2={l2} {gradient}",
                  canny.canny, img, 30, 90, ksize=ksize, l2_gradient=l2, gradient=gradient)
    fercuda_module("triton.dwconv")
    dtypes = [torch.float32] if DRY else [torch.float32, torch.float16, torch.bfloat16]
    shapes = [(2, 3, 5, 7)] if DRY else [(3, 37, 9, 11), (64, 128, 48, 48)]
    for shape in shapes:
        for dtype in dtypes:
            for channels_last in LAYOUTS[:1] if DRY else LAYOUTS:
                inputs = block_inputs(shape, channels_last, dtype, DEVICE)
                for stride in (1,) if DRY else (1, 2):
                    for training in (False, True):
                        timed(f"triton dwconv {shape} {dtype} channels_last={channels_last} stride={stride} "
                              f"training={training}", dwconv_step, inputs, training, stride)


PARTS = {"canny": warm_canny, "dwconv": warm_dwconv, "compile": warm_compile, "tests": warm_tests}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", choices=sorted(PARTS))
    parser.add_argument("--dry", action="store_true", help="tiny CPU tensors under TRITON_INTERPRET=1")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="warm every N-th case of the dwconv and compile parts, from the K-th (one process of N)")
    parser.add_argument(AFTER_BUILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    SHARD = tuple(int(v) for v in args.shard.split("/"))
    os.environ["GPU_WARMUP_STARTED"] = str(STARTED)  # kept across the start again after the build
    DRY = args.dry
    DEVICE = "cpu" if args.dry else "cuda"
    start = time.perf_counter()
    for part in args.parts:
        log(f"warming {part}")
        PARTS[part]()
    log(f"done: {' '.join(args.parts)} in {time.perf_counter() - start:.1f} s")
