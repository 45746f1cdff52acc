"""Networks built on fercuda's ops, and the FERNet shipped with fercuda.

    import fercuda.models
    model = fercuda.models.pretrained()            # the shipped FERNet, eval mode, metadata attached
    model = fercuda.models.load("runs/fer2013")    # a run folder's best model (or a .pt file)
"""

from fercuda.models.checkpoint import (PRETRAINED_FILE, CheckpointError, load, pretrained, pretrained_metadata,
                                       read_checkpoint)
from fercuda.models.fernet import FERNet, complexity, make_divisible

__all__ = ["PRETRAINED_FILE", "CheckpointError", "FERNet", "complexity", "load", "make_divisible", "pretrained",
           "pretrained_metadata", "read_checkpoint"]
