"""Fake (meta) kernels: shapes and dtypes only, so torch.compile(fullgraph=True) can trace the ops."""

import torch
