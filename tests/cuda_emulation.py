"""Builds the CUDA device code of fercuda for the CPU: a test's emulation source (which includes
csrc/cuda/*_kernels.cuh on top of cuda_emulation.h) compiled into a shared library, loaded with
ctypes. Used by the "emulated" backend of tests/test_canny.py and tests/test_dwconv.py."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build_emulation(tmp_path_factory, source: str, *, opt: str = "-O1", includes=()) -> ctypes.CDLL:
    """Compile tests/<source> with the repository's headers (plus `includes`) and load it; skips
    the calling test where there is no C++ compiler."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    lib = tmp_path_factory.mktemp("emu") / (Path(source).stem + ".so")
    cmd = [cxx, "-std=c++20", opt, "-pthread", "-shared", "-fPIC", f"-I{REPO / 'csrc' / 'include'}",
           f"-I{REPO / 'csrc' / 'cuda'}", *(f"-I{path}" for path in includes), str(REPO / "tests" / source),
           "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True)
    return ctypes.CDLL(str(lib))
