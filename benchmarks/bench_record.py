"""How a benchmark reports what it measured: the environment, and one row per measurement.

``emit`` prints a table row the moment its figures are measured and appends the same row, as
one JSON line, to the file ``$FERCUDA_BENCH_ROWS`` names (benchmarks/gpu_check.sh sets it). A run
stopped by a time limit keeps every row measured before the stop: nothing waits for pytest (or
pytest-benchmark's JSON, written only at the end of a session) to finish.

``python benchmarks/bench_record.py [--json PATH]`` prints the environment record (and writes it).
"""

import json
import os
import platform
import sys
import time

_headers_printed = set()


def environment():
    """Versions and the device, recorded once per run and with every benchmark's figures."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_GiB=round(props.total_memory / 2**30, 1), gpu_sm_count=props.multi_processor_count,
                    gpu_capability=f"{props.major}.{props.minor}")
    for name in ("triton", "cv2", "kornia", "numpy", "xdist", "pytest_timeout", "pytest_benchmark", "expecttest"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "present")
        except ImportError:
            info[name] = None
    return info


def emit(bench, case, table, *, header=None, **figures):
    """Print `table` (after `header`, once per bench) and append {bench, case, table, figures} to
    $FERCUDA_BENCH_ROWS. Figures must be JSON-serialisable (numbers, strings, lists, dicts)."""
    if header is not None and (bench, header) not in _headers_printed:
        _headers_printed.add((bench, header))
        print("\n" + header, flush=True)
    print(table, flush=True)
    path = os.environ.get("FERCUDA_BENCH_ROWS")
    if path:
        row = {"bench": bench, "case": case, "table": table, "header": header, "time": time.time(), **figures}
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


if __name__ == "__main__":
    record = environment()
    text = json.dumps(record, indent=1)
    print(text)
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        with open(sys.argv[2], "w") as f:
            f.write(text + "\n")
