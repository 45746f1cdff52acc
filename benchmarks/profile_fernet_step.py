"""Where a FERNet training step spends its time: torch.profiler over the steps `fercuda train`
runs (fercuda.training.make_batch and train_step), split into the batch (indexing, augmentation,
the Canny input), forward, backward and the optimizer, with the top operators of each.

    python benchmarks/profile_fernet_step.py                       # bf16 + channels_last, width 0.25
    python benchmarks/profile_fernet_step.py --precision fp32 --no-channels-last --plain

Real FER2013 faces when the folder is found (fercuda.data.default_fer2013_root()), else
random faces of the same size (the step's cost does not depend on the pixel values, except the
Canny input's, a small part). Besides the profiler's CPU time, the process's user and system
CPU seconds over the profiled steps are printed: system time is the kernel's (page faults of
fresh allocations, thread wake-ups), not the network's arithmetic.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fercuda.data import default_fer2013_root, load_faces
from fercuda.models import FERNet
from fercuda.runtime import AUTOCAST_DTYPES, keep_freed_memory
from fercuda.training import make_batch, train_step

PHASES = ("batch", "forward", "backward", "optimizer")


def faces(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    root = default_fer2013_root()
    if (root / "train").is_dir():
        data = load_faces(root)
        return data.images[:count], data.labels[:count], f"FER2013 ({root})"
    images = torch.randint(0, 256, (count, 1, 48, 48), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 7, (count,), generator=generator), "random faces (FER2013 not found)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--plain", action="store_true", help="plain PyTorch layers instead of fercuda's fused ops")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=6, help="operators listed per phase")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as fercuda train does
    gen = torch.Generator().manual_seed(0)
    images, labels, source = faces(args.batch_size * (args.warmup + args.steps), gen)
    model = FERNet(num_classes=7, width_mult=args.width_mult, fused=not args.plain)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    dtype = AUTOCAST_DTYPES.get(args.precision)

    def step(k: int) -> None:
        idx = torch.arange(k * args.batch_size, (k + 1) * args.batch_size)
        x, y = make_batch(images, labels, idx, gen, args.channels_last)
        train_step(model, optimizer, scaler, x, y, dtype, 0.1)

    for k in range(args.warmup):
        step(k)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(args.warmup, args.warmup + args.steps):
            step(k)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)

    print(f"FERNet width {args.width_mult}, batch {args.batch_size}, {'plain' if args.plain else 'fused'}, "
          f"{args.precision}{', channels_last' if args.channels_last else ''}, {args.threads} threads, "
          f"torch {torch.__version__}; inputs: {source}")
    print(f"{args.steps} steps in {wall:.2f} s (profiler on): {args.steps * args.batch_size / wall:.1f} images/s; "
          f"CPU user {r1.ru_utime - r0.ru_utime:.2f} s, system {r1.ru_stime - r0.ru_stime:.2f} s, "
          f"minor page faults {r1.ru_minflt - r0.ru_minflt}")
    events = prof.events()
    phase_us = {name: sum(e.cpu_time_total for e in events if e.name == name) for name in PHASES}
    total = sum(phase_us.values())
    print("\n| phase | ms per step | share |\n| --- | --- | --- |")
    for name in PHASES:
        print(f"| {name} | {phase_us[name] / 1e3 / args.steps:.1f} | {phase_us[name] / max(total, 1):.0%} |")

    # Top operators by self time inside each phase: an event belongs to the phase whose interval
    # holds it (same thread).
    spans = [(e.name, e.time_range.start, e.time_range.end, e.thread) for e in events if e.name in PHASES]
    by_phase: dict[str, dict[str, float]] = {name: {} for name in PHASES}
    for e in events:
        if e.name in PHASES:
            continue
        for name, start, end, thread in spans:
            if e.thread == thread and start <= e.time_range.start and e.time_range.end <= end:
                by_phase[name][e.name] = by_phase[name].get(e.name, 0.0) + e.self_cpu_time_total
                break
    for name in PHASES:
        print(f"\n{name}: top operators by self CPU time (ms per step)")
        for op, us in sorted(by_phase[name].items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {us / 1e3 / args.steps:8.2f}  {op}")


if __name__ == "__main__":
    main()
