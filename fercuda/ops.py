"""Public entry points of fercuda's operators (torch.ops.fercuda.*)."""

import torch

from fercuda import _meta  # noqa: F401  (fake kernels for torch.compile)
