"""The package itself: a broken build is reported, not hidden; the build says what it holds."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import fercuda
from fercuda import _build_info


def test_broken_extension_raises_an_import_error_with_the_cause(tmp_path):
    # A copy of the package whose compiled extension is not a loadable library.
    package = Path(fercuda.__file__).parent
    copy = tmp_path / "fercuda"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for so in package.glob("_C*.so"):
        (copy / so.name).write_bytes(b"not a shared library")
    result = subprocess.run([sys.executable, "-c", "import fercuda"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError: fercuda: the compiled extension fercuda._C failed to load" in result.stderr
    assert f"torch {torch.__version__}" in result.stderr
    assert "Original error:" in result.stderr


def test_build_info_matches_the_registered_kernels():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fercuda::canny", "CUDA")
    assert has_cuda_kernel == bool(_build_info.WITH_CUDA) == fercuda.cuda_kernels_built()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fercuda::canny", "CPU")
    assert _build_info.TORCH_VERSION == torch.__version__


def test_triton_modules_launch_kernels_and_import_no_entry_point():
    """Kernels below, entry points above: fercuda.ops imports the Triton modules, never the reverse."""
    import ast

    for path in (Path(fercuda.__file__).parent / "triton").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n in ("fercuda.ops", "fercuda.nn") or n.startswith("fercuda.models") for n in names), (
                f"{path.name} imports {names}")
