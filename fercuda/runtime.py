"""Settings of a run that depend on the machine: autocast precision and glibc's memory reuse."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX-512 BF16 or AMX): there bf16
    autocast roughly doubles training speed; elsewhere oneDNN emulates it and fp32 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        flags = []
    if flags:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device (float16 autocast on {device.type} is slower "
                         "than float32); use bf16 or fp32")
    return precision


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MB in the heap instead of returning them to the
    kernel. A training step allocates and frees the same activations every step; by default each
    block above 128 KB is a fresh mmap, and touching it again costs a page fault per 4 KB page
    (on a 2-core machine that was a third of the step, spent in the kernel). No-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
        ok &= libc.mallopt(m_trim_threshold, 1 << 30) == 1
        ok &= libc.mallopt(m_top_pad, 64 << 20) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False
