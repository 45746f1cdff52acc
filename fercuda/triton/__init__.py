"""Triton kernels of fercuda's operators."""
