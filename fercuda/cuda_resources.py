"""Registers, stack (spills) and static shared memory of every CUDA kernel in the built extension,
per target architecture, read from the library itself (``cuobjdump --dump-resource-usage``).

    python -m fercuda.cuda_resources           # markdown, one row per kernel and target
    python -m fercuda.cuda_resources --all     # one row per instantiation

tests/test_cuda_resources.py fails on a kernel that spills (a stack frame or local memory past the
bound it states) or whose static shared memory passes the target's limit. On sm_90 every kernel
shows 1 KiB of static shared memory: the block's system-reserved share. Dynamic shared memory is set at launch (the launch
plans in csrc/cuda/*_kernels.cuh, checked by the CUDA emulation in the tests), not in the binary.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Shared memory a block may use, bytes, by compute capability (the H100 / H200 and A100 opt-in limits).
SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024}


@dataclass(frozen=True)
class Usage:
    arch: int  # compute capability, e.g. 90
    source: str  # the .cu file
    kernel: str  # demangled, template arguments included
    registers: int
    stack: int
    local: int
    shared: int  # static shared memory, bytes

    @property
    def name(self):
        """The kernel's name without namespaces and template arguments."""
        return re.sub(r"<.*", "", self.kernel.split("(")[0]).rsplit("::", 1)[-1]


def library_path():
    import fercuda

    found = sorted(Path(fercuda.__file__).parent.glob("_C*.so"))
    if not found:
        raise RuntimeError("fercuda._C is not built")
    return found[0]


def cuobjdump():
    """The toolkit's cuobjdump, else Triton's bundled one, else one on PATH."""
    import os

    home = os.environ.get("CUDA_HOME")
    if home and Path(home, "bin", "cuobjdump").exists():
        return str(Path(home, "bin", "cuobjdump"))
    from fercuda.triton.resources import _tool  # Triton's knobs, its bundled copy, then PATH

    return _tool("cuobjdump")


def _demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def usages(library=None):
    """Every kernel of every architecture in the library, as Usage."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", str(library or library_path())],
                          capture_output=True, text=True, check=True).stdout
    rows, arch, source = [], None, None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"identifier = (.*)", line):
            source = Path(m.group(1)).name
        elif m := re.match(r"\s*Function (\S+):", line):
            res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1]))
            rows.append([arch, source, m.group(1), int(res["REG"]), int(res["STACK"]), int(res["LOCAL"]),
                         int(res["SHARED"])])
    for row, name in zip(rows, _demangle([r[2] for r in rows])):
        row[2] = name
    return [Usage(*row) for row in rows]


def table(rows, per_instantiation=False):
    groups = {}
    for u in rows:
        key = (u.source, u.kernel if per_instantiation else u.name, u.arch)
        groups.setdefault(key, []).append(u)
    out = ["| source | kernel | target | instantiations | registers | stack + local (B) | static shared (B) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]

    def span(values):
        lo, hi = min(values), max(values)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    for (source, kernel, arch), us in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        out.append(f"| `{source}` | `{kernel}` | sm_{arch} | {len(us)} | {span([u.registers for u in us])} | "
                   f"{span([u.stack + u.local for u in us])} | {span([u.shared for u in us])} |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="one row per instantiation")
    args = parser.parse_args(argv)
    print(table(usages(), per_instantiation=args.all))


if __name__ == "__main__":
    main()
