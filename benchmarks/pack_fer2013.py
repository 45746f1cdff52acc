"""Pack the FER2013 image folders into one archive that travels to a GPU machine, and unpack it there.

    python benchmarks/pack_fer2013.py                 # -> .fer2013/fer2013.tar.gz (make gpu-data)
    python benchmarks/pack_fer2013.py --src DIR --out FILE
    python benchmarks/pack_fer2013.py --unpack FILE --to DIR

The folder layout (train/<class>/*.jpg, test/<class>/*.jpg: 35,887 JPEGs, 56 MB) is 35,887 files
of 1.6 kB; as one tar they take 85 MB (each file padded to 512-byte blocks, plus a header), and
gzip brings that to 46 MB: the JPEGs' identical headers and the padding compress, the pixels
do not. What travels with a device call must stay under 64 MiB in all (the working tree, plus
every carried path), so the archive, not the folder, is carried; packing reports the total.
The archive is reproducible (sorted names, no owners, time 0). .fer2013/ is git-ignored.
"""

import argparse
import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = Path(os.environ.get("FERCUDA_FER2013", ROOT.parent / "shared" / "data" / "fer2013"))
DEFAULT_OUT = ROOT / ".fer2013" / "fer2013.tar.gz"
CARRY_LIMIT = 64 * 2**20


def pack(src: Path, out: Path) -> int:
    files = sorted(p for part in ("train", "test") for p in (src / part).rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"pack_fer2013: no train/ or test/ images under {src} (set --src or FERCUDA_FER2013)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(src).as_posix())
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return len(files)


def unpack(archive: Path, to: Path) -> int:
    """Into `to`, which appears only once every file is there (a stopped unpacking leaves none)."""
    partial = to.with_name(to.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            name = Path(m.name)
            if name.is_absolute() or ".." in name.parts:
                raise SystemExit(f"pack_fer2013: {archive} holds an unsafe path {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, members=members, filter="data")
        else:
            tar.extractall(partial, members=members)
    shutil.rmtree(to, ignore_errors=True)
    os.replace(partial, to)
    return len(members)


def travelling_bytes(extra: list[Path]) -> int:
    """Bytes a device call sends: tracked and untracked-not-ignored files, plus the carried paths."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    total = sum((ROOT / os.fsdecode(name)).stat().st_size for name in listed
                if name and (ROOT / os.fsdecode(name)).is_file())
    for path in extra:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"the FER2013 folder (default {DEFAULT_SRC})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the archive (default {DEFAULT_OUT})")
    parser.add_argument("--unpack", type=Path, metavar="ARCHIVE", help="unpack ARCHIVE instead of packing")
    parser.add_argument("--to", type=Path, help="where --unpack writes train/ and test/")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.unpack:
        if args.to is None:
            parser.error("--unpack needs --to DIR")
        n = unpack(args.unpack, args.to)
        splits = {part: sum(1 for _ in (args.to / part).rglob("*.jpg")) for part in ("train", "test")}
        print(f"unpacked {n} files from {args.unpack} into {args.to} in {time.perf_counter() - t0:.1f} s: "
              f"{splits['train']} train, {splits['test']} test JPEGs", flush=True)
        return 0
    out = args.out.resolve()
    n = pack(args.src, out)
    size = out.stat().st_size
    print(f"packed {n} files from {args.src} into {out}: {size / 2**20:.1f} MiB "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    if out.is_relative_to(ROOT):
        total = travelling_bytes([out, ROOT / ".whl"])
        print(f"a device call carrying {out.relative_to(ROOT).parent} and .whl sends {total / 2**20:.1f} MiB "
              f"of the {CARRY_LIMIT // 2**20} MiB allowed", flush=True)
        if total > CARRY_LIMIT:
            print("pack_fer2013: over the limit: carry fewer paths", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
