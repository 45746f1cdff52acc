"""Triton kernels of fercuda's operators."""

from fercuda.triton import _compat

_compat.fix_interpreter_index()
