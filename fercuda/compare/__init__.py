"""How fercuda is compared with its peers: one timer, one row type, one table, one way to keep rows.

``python -m fercuda.compare`` (``make compare``) prints one table of its sections (``__main__.py``):
``canny.py`` (against OpenCV and kornia) and ``dwconv.py`` (against eager PyTorch and
torch.compile). The pytest-benchmark modules in benchmarks/ and the GPU script take their inputs,
peers, timer and environment record (``environment.py``) from here too.

This module imports no fercuda op: benchmarks/gpu_warmup.py imports the sections' inputs through it
before fercuda._C is built.
"""

import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

ROWS_ENV = "FERCUDA_BENCH_ROWS"  # the JSON-lines file emit() appends to (benchmarks/gpu_check.sh sets it)


@dataclass
class Row:
    """One case of a section: fercuda's agreement with its reference and its time against its peers'."""
    section: str
    case: str
    reference: str  # what "differing" (or max_error) counts against
    differing: int | None  # elements of fercuda's output that differ from the reference
    fercuda_ms: float
    peers_ms: dict[str, float | None] = field(default_factory=dict)  # None: peer not available
    max_error: float | None = None  # for floating-point outputs: largest |fercuda - reference|


def times_ms(fn, repeat=5, *, warmup=1, budget_s=None, synchronize=False):
    """Sorted wall times, in milliseconds, of `repeat` calls of fn after `warmup` calls.

    budget_s: fewer calls (at least one) where the last warm-up call shows that `repeat` of them
    would take longer. synchronize: torch.cuda.synchronize() before the clock starts and before it
    stops (a call that launches CUDA work, timed on the host)."""

    def call():
        if synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if synchronize:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    last = None
    for _ in range(warmup):
        last = call()
    if budget_s is not None and last is not None:
        repeat = max(1, min(repeat, int(budget_s / max(last, 1e-6))))
    return sorted(call() * 1e3 for _ in range(repeat))


def interleaved_times_ms(contenders, rounds=5, *, warmup=1):
    """{name: sorted wall times in ms} of each contender (a dict of name -> zero-argument fn),
    called in turn once per round after `warmup` calls each: on a shared machine a slow spell
    then falls on every contender alike instead of on whichever was being timed. Round r starts
    at contender r mod k and goes round: contenders that share an input find it in cache when
    they follow one another, so each follows each other equally often (with a fixed order the
    second of two contenders reading the same tensor measured up to 20% faster than the same
    code first)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    items = list(contenders.items())
    times = {name: [] for name in contenders}
    for r in range(rounds):
        for name, fn in items[r % len(items):] + items[:r % len(items)]:
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(t) for name, t in times.items()}


def median_ms(fn, repeat=5, *, warmup=1, budget_s=None, device="cpu", rep_ms=100):
    """The median time of fn in milliseconds.

    On the CPU: the median of times_ms(fn, repeat, warmup=warmup, budget_s=budget_s). On CUDA:
    triton.testing.do_bench's median (CUDA events, 25 ms of warm-up, rep_ms of repetitions, the
    cache flushed between them), the time of the GPU work rather than of its launches."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    return statistics.median(times_ms(fn, repeat, warmup=warmup, budget_s=budget_s))


def format_table(rows):
    """The rows as one aligned table: a column per peer's time and per speed-up over it."""
    peer_names = list(dict.fromkeys(name for row in rows for name in row.peers_ms))
    header = ["section", "case", "agreement (vs)", "fercuda ms"]
    header += [f"{p} ms" for p in peer_names] + [f"speed-up vs {p}" for p in peer_names]
    lines = []
    for row in rows:
        if row.max_error is not None:
            agreement = f"max err {row.max_error:.1e} ({row.reference})"
        else:
            agreement = "-" if row.differing is None else f"{row.differing} ({row.reference})"
        line = [row.section, row.case, agreement, f"{row.fercuda_ms:.2f}"]
        peer_ms = [row.peers_ms.get(p) for p in peer_names]
        line += ["-" if t is None else f"{t:.2f}" for t in peer_ms]
        line += ["-" if t is None else f"{t / row.fercuda_ms:.1f}x" for t in peer_ms]
        lines.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def disagreeing(rows, max_error=1e-4):
    """The rows whose output differs from their reference (any differing element, or an error over max_error)."""
    return [row for row in rows if row.differing or (row.max_error is not None and row.max_error > max_error)]


_headers_printed = set()


def emit(bench, case, table, *, header=None, **figures):
    """A benchmark's row the moment it is measured: print `table` (after `header`, once per bench)
    and append {bench, case, table, header, time, figures} as one JSON line to $FERCUDA_BENCH_ROWS.

    A run stopped by a time limit keeps every row measured before the stop: nothing waits for
    pytest (or pytest-benchmark's JSON, written only at the end of a session) to finish. Figures
    must be JSON-serialisable (numbers, strings, lists, dicts)."""
    if header is not None and (bench, header) not in _headers_printed:
        _headers_printed.add((bench, header))
        print("\n" + header, flush=True)
    print(table, flush=True)
    path = os.environ.get(ROWS_ENV)
    if path:
        row = {"bench": bench, "case": case, "table": table, "header": header, "time": time.time(), **figures}
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
