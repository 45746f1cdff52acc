"""Where fercuda looks for data sets by default. Standard library only: benchmarks/gpu_check.py
loads this file by its path, before fercuda._C is built."""

import os
from pathlib import Path

FER2013_ENV = "FERCUDA_FER2013"


def default_fer2013_root() -> Path:
    """The FER2013 image folders (train/<class>/*.jpg, test/<class>/*.jpg): $FERCUDA_FER2013 where
    it is set, else ../shared/data/fer2013 beside the repository checkout. The folder may be absent."""
    preset = os.environ.get(FER2013_ENV)
    if preset:
        return Path(preset)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "fer2013"
