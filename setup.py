"""Build fercuda._C: C++ CPU kernels always, CUDA kernels whenever torch and a toolkit allow.

CUDA is enabled from ``torch.version.cuda`` and a CUDA toolkit on disk, never from
the presence of a GPU, so a GPU-less build host still compiles every CUDA source.

Environment:
  FORCE_CUDA=1           build the CUDA kernels or fail loudly
  USE_CUDA=0             build the CPU kernels only
  CUDA_HOME / CUDA_PATH  the toolkit folder (the one holding bin/nvcc)
  TORCH_CUDA_ARCH_LIST   target GPUs; default "8.0;9.0+PTX" when no GPU is visible
  MAX_JOBS               parallel compile jobs; default sized from cores and memory
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(path):
    return bool(path) and all(
        os.path.isfile(os.path.join(path, rel))
        for rel in ("bin/nvcc", "include/cuda_runtime.h")
    ) and any(
        os.path.exists(os.path.join(path, lib, "libcudart.so"))
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    )


def find_cuda_home():
    """The toolkit folder, resolved through symlinks and wrapper scripts named nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if _is_toolkit(path):
            return os.path.realpath(path)
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidate = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(candidate):
            return candidate
        # nvcc reports its own installation folder in a dry run ("#$ TOP=...").
        try:
            out = subprocess.run([nvcc, "--dryrun", "-v", "--version"], capture_output=True,
                                 text=True, timeout=60)
            for m in re.finditer(r"TOP=(\S+)", out.stdout + out.stderr):
                top = os.path.realpath(m.group(1))
                if _is_toolkit(top):
                    return top
        except (OSError, subprocess.SubprocessError):
            pass
        # A wrapper script that execs the real compiler by absolute path.
        try:
            with open(real, "r", errors="ignore") as f:
                text = f.read(1 << 16)
            for m in re.finditer(r"(/[^\s'\";]+)/bin/nvcc", text):
                top = os.path.realpath(m.group(1))
                if _is_toolkit(top):
                    return top
        except OSError:
            pass
    for path in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1))
        by_memory = max(1, avail_kb // (3 * 1024 * 1024))  # nvcc on torch headers: ~3 GB a job
    except (OSError, AttributeError):
        by_memory = cores
    return str(max(1, min(cores, by_memory)))


FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"
USE_CUDA = os.environ.get("USE_CUDA", "1") != "0"
CUDA_HOME = find_cuda_home() if (USE_CUDA or FORCE_CUDA) else None
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("MAX_JOBS", default_max_jobs())

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if FORCE_CUDA and not USE_CUDA:
    sys.exit("fercuda setup: FORCE_CUDA=1 and USE_CUDA=0 contradict each other")
WITH_CUDA = (FORCE_CUDA or (USE_CUDA and torch.version.cuda is not None)) and CUDA_HOME is not None
if FORCE_CUDA and not WITH_CUDA:
    sys.exit(
        "fercuda setup: FORCE_CUDA=1 but no CUDA toolkit was found "
        "(set CUDA_HOME to the folder holding bin/nvcc and include/cuda_runtime.h)"
    )
if FORCE_CUDA and torch.version.cuda is None:
    sys.exit(f"fercuda setup: FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def _torch_nvidia_includes():
    """Headers that torch's CUDA headers include but a slim toolkit may lack (cuBLAS, cuSPARSE)."""
    dirs = []
    for sp in sys.path:
        for pattern in ("nvidia/*/include", "nvidia/cu*/include"):
            for d in glob.glob(os.path.join(sp, pattern)):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is inline and runs serially in a file compiled without it.
    # -Wno-psabi: GCC's note that 32-byte vector arguments changed ABI in GCC 4.6 concerns calls
    # across libraries; the CPU kernels' vectors stay inside one translation unit (internal
    # linkage), and the baseline path compiles the same vector code for SSE2.
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
    link = ["-fopenmp"]
    define_macros = []
    if WITH_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "fercuda._C",
            sources,
            include_dirs=include_dirs + _torch_nvidia_includes(),
            define_macros=define_macros + [("FERCUDA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "fercuda._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


class PersistentBuildExtension(BuildExtension.with_options(use_ninja=True)):
    """Objects in ./build/temp, also for `pip install -e .` (which would otherwise build in a fresh
    temporary folder), so ninja recompiles only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


def write_build_info():
    """fercuda/_build_info.py: what this build holds, for tests and error messages."""
    text = (
        "# Written by setup.py at build time.\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_HOME = {CUDA_HOME!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"TORCH_CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if WITH_CUDA else None!r}\n"
    )
    with open(os.path.join(ROOT, "fercuda", "_build_info.py"), "w") as f:
        f.write(text)


write_build_info()

print(
    f"fercuda setup: torch {torch.__version__} (CUDA {torch.version.cuda}), "
    f"toolkit {CUDA_HOME}, CUDA kernels {'on' if WITH_CUDA else 'off'}, "
    f"arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}, MAX_JOBS {os.environ['MAX_JOBS']}",
    file=sys.stderr,
)

setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": PersistentBuildExtension},
)
