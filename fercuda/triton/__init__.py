"""Triton kernels of fercuda's operators (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Importing this package registers the ops (torch.ops.fercuda.canny_triton); the entry point is
fercuda.triton.canny.canny.
"""

from fercuda.triton import canny  # noqa: F401  (registers fercuda::canny_triton)
