"""FER2013 and CK+ loaders, and the device-side preprocessing of the paper."""

from fercuda.data.datasets import (
    CKPLUS_CLASSES,
    FER_ALIASES,
    FER_CLASSES,
    FER_SPLITS,
    DataError,
    FaceData,
    default_cache_dir,
    detect_format,
    kfold_assignments,
    load_faces,
)
from fercuda.data.paths import FER2013_ENV, default_fer2013_root
from fercuda.data.transforms import augment, fer_input, mix_batch, random_erasing

__all__ = [
    "CKPLUS_CLASSES", "FER2013_ENV", "FER_ALIASES", "FER_CLASSES", "FER_SPLITS", "DataError", "FaceData",
    "augment", "default_cache_dir", "default_fer2013_root", "detect_format", "fer_input", "kfold_assignments",
    "load_faces", "mix_batch", "random_erasing",
]
