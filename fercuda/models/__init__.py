"""Networks built on fercuda's ops."""

from fercuda.models.fernet import FERNet, complexity, make_divisible

__all__ = ["FERNet", "complexity", "make_divisible"]
