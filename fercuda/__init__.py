"""fercuda: exact, fast Canny edges and a fused depthwise conv + BatchNorm + ReLU6, as torch ops."""

import torch

__version__ = "0.1.0"


def _load_extension():
    try:
        from fercuda import _C  # noqa: F401  (loading registers the operators)
    except ImportError as e:
        if "FERCUDA_CPU_ISA" in str(e):
            raise ImportError(f"fercuda: {e}") from None
        raise ImportError(
            "fercuda: the compiled extension fercuda._C failed to load "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
            "Rebuild it against the installed torch with `pip install -e . --no-build-isolation`. "
            f"Original error: {e}"
        ) from e
    return _C


_C = _load_extension()

from fercuda import nn, ops  # noqa: E402,F401


def cuda_kernels_built() -> bool:
    """Whether this build of fercuda._C holds CUDA kernels (whether or not a GPU is present)."""
    from fercuda import _build_info

    return bool(_build_info.WITH_CUDA)


def cpu_isa() -> str:
    """The instruction-set path the CPU kernels take: "avx512_bf16", "avx512", "avx2" or
    "baseline". The widest one this CPU can run, unless forced by the environment variable
    FERCUDA_CPU_ISA (read at import) or by set_cpu_isa."""
    return _C.cpu_isa()


def supported_cpu_isas() -> tuple:
    """The instruction-set paths this CPU can run, narrowest first."""
    return _C.cpu_isas()


def set_cpu_isa(isa: str) -> str:
    """Makes the CPU kernels take the path `isa` (one of supported_cpu_isas(), or "auto" for the
    widest); returns the path taken before. Every path computes the same contract; outputs may
    differ in the last bits between paths. A path this CPU cannot run raises a RuntimeError."""
    if not isinstance(isa, str):
        raise TypeError(f"fercuda.set_cpu_isa: argument 'isa' must be a str, got {type(isa).__name__}")
    return _C.set_cpu_isa(isa)
