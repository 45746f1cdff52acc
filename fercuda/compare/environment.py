"""The machine and the versions a measurement ran on, recorded once per run.

``environment()`` is the record: the CPU model and the SIMD flags the kernels and torch dispatch on,
cores, threads and the load average, Python, torch (and its CUDA), the peers' and the test
plugins' versions, the GPU where there is one. ``describe()`` is its one-line summary.
``python -m fercuda.compare`` prints it above its table, benchmarks/conftest.py puts it in the
header of a pytest run and in pytest-benchmark's JSON, and benchmarks/gpu_check.py runs this file
as a script, before fercuda._C is built (so it imports no fercuda module):

    python fercuda/compare/environment.py [--json PATH]
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

# The flags that decide which kernels run: torch's and fercuda's CPU code paths (x86 and Arm).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve")
PACKAGES = ("triton", "cv2", "kornia", "numpy", "xdist", "pytest_timeout", "pytest_benchmark", "expecttest")


def cpu_info(cpuinfo=Path("/proc/cpuinfo")):
    """(model name, the CPU_FLAGS present) of the first processor; the flags are empty off Linux."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model") and value:
            model = value
        elif key in ("flags", "Features"):
            flags = set(value.split())
            break  # every processor lists the same
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def environment():
    """The record: a dict of JSON-serialisable values (None for a package that is not installed)."""
    import torch

    model, flags = cpu_info()
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": model, "cpu_flags": flags, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "cuda": torch.version.cuda}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_GiB=round(props.total_memory / 2**30, 1), gpu_sm_count=props.multi_processor_count,
                    gpu_capability=f"{props.major}.{props.minor}")
    for name in PACKAGES:
        try:
            module = __import__(name)
        except ImportError:
            info[name] = None
        else:
            info[name] = getattr(module, "__version__", "present")
    info["cv2_threads"] = sys.modules["cv2"].getNumThreads() if info["cv2"] else None
    # The instruction-set path of fercuda's CPU kernels, where fercuda is loaded already.
    info["fercuda_cpu_isa"] = sys.modules["fercuda"].cpu_isa() if "fercuda._C" in sys.modules else None
    return info


def describe(info):
    """One line of the record: what a reader needs beside a figure to compare it with another."""
    gpu = info.get("gpu") or "no GPU"
    if info.get("gpu_memory_GiB"):
        gpu += f" ({info['gpu_memory_GiB']} GiB, {info['gpu_sm_count']} SMs, sm_{info['gpu_capability'].replace('.', '')})"
    load = info.get("load_average")
    return (f"{info['cpu']} ({info['cpu_count']} cores; {' '.join(info['cpu_flags']) or 'no listed SIMD flags'}), "
            f"load {load[0] if load else '?'}; {gpu}; python {info['python']}, torch {info['torch']} "
            f"(CUDA {info['cuda']}), triton {info['triton']}, cv2 {info['cv2']}, kornia {info['kornia']}; "
            f"{info['threads']} torch threads, {info['cv2_threads']} cv2 threads"
            + (f"; fercuda CPU path {info['fercuda_cpu_isa']}" if info.get("fercuda_cpu_isa") else ""))


if __name__ == "__main__":
    record = environment()
    text = json.dumps(record, indent=1)
    print(text)
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(text + "\n")
    elif len(sys.argv) != 1:
        raise SystemExit("usage: python fercuda/compare/environment.py [--json PATH]")
