"""fercuda: exact, fast Canny edges and a fused depthwise conv + BatchNorm + ReLU6, as torch ops."""

import torch

__version__ = "0.1.0"


def _load_extension():
    try:
        from fercuda import _C  # noqa: F401  (loading registers the operators)
    except ImportError as e:
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
