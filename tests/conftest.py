import os

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter where no GPU is present.
# The interpreter is chosen when a kernel is defined, so set it before fercuda is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fercuda  # noqa: E402
from fercuda.data import default_fer2013_root  # noqa: E402

FER2013 = default_fer2013_root()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fer2013_dir():
    if not (FER2013 / "test").is_dir():
        pytest.skip(f"FER2013 images not found at {FER2013} (set FERCUDA_FER2013 to their folder)")
    return FER2013


@pytest.fixture
def rng():
    """Fresh random inputs every run; the seed is printed on failure, and FERCUDA_TEST_SEED=<seed>
    replays it."""
    seed = int(os.environ.get("FERCUDA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)
