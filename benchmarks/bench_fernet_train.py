"""FERNet throughput, fused depthwise blocks against plain PyTorch layers, in every layout and
precision a user would pick, in one run.

    python -m pytest benchmarks/bench_fernet_train.py -s --benchmark-columns=median,rounds
    FERCUDA_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_fernet_train.py -s

Training: one step = augmentation + [canny, x, x] + forward + backward + Adam, batch 64 (the
paper's). Inference: eval mode, batch 64 and batch 1, forward only. Each configuration is a
layout (NCHW or channels_last), an autocast precision (none, bfloat16 on the CPU, float16 on
CUDA) and, optionally, torch.compile of the model; FERCUDA_BENCH_CONFIGS picks a subset
(comma-separated names of CONFIGS). Images/s per row and, per width, the best fused
configuration over the best plain one are printed as soon as they are measured and stored in
extra_info. The fused and plain models of a configuration are timed in turn, round after
round, in the same test; `fercuda train` picks its configuration with fercuda.runtime (see the README). The
date, versions and threads are in the environment record, kept once (benchmarks/conftest.py).
"""

import os
import statistics
from dataclasses import dataclass

import pytest
import torch

from fercuda.compare import emit, interleaved_times_ms
from fercuda.data import fer_input
from fercuda.models import FERNet
from fercuda.runtime import keep_freed_memory
from fercuda.training import make_batch, train_step

DEVICE = torch.device(os.environ.get("FERCUDA_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
BATCH = 64
WIDTHS = [float(w) for w in os.environ.get("FERCUDA_BENCH_WIDTHS", "0.25,1.0").split(",")]
ROUNDS = int(os.environ.get("FERCUDA_BENCH_ROUNDS", "5"))


@dataclass(frozen=True)
class Config:
    name: str
    channels_last: bool = False
    autocast: torch.dtype | None = None
    compile: bool = False


_LOW = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16
_LOW_NAME = "fp16" if DEVICE.type == "cuda" else "bf16"
ALL_CONFIGS = [
    Config("fp32"),
    Config("fp32-cl", channels_last=True),
    Config(_LOW_NAME, autocast=_LOW),
    Config(f"{_LOW_NAME}-cl", channels_last=True, autocast=_LOW),
    Config("compile", compile=True),
    Config(f"compile-{_LOW_NAME}-cl", channels_last=True, autocast=_LOW, compile=True),
]
_wanted = os.environ.get("FERCUDA_BENCH_CONFIGS")
CONFIGS = [c for c in ALL_CONFIGS if _wanted is None or c.name in _wanted.split(",")]
if _wanted is not None and not CONFIGS:
    raise ValueError(f"FERCUDA_BENCH_CONFIGS={_wanted!r} names none of {[c.name for c in ALL_CONFIGS]}")

RESULTS = {}  # (kind, width, fused, config name) -> images/s

# As `fercuda train` does on a CPU (the same for both models): freed activations stay in the heap.
if DEVICE.type == "cpu":
    keep_freed_memory()


def _model(width, fused, config, train):
    torch.manual_seed(0)
    model = FERNet(width_mult=width, fused=fused).to(DEVICE).train(train)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        torch._dynamo.reset()  # each case compiles its own graph: no recompile limit reached, never silently eager
    return model, (torch.compile(model) if config.compile else model)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)  # time the work, not the launches


def make_train_step(width, fused, config):
    model, run = _model(width, fused, config, train=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 1, 48, 48), dtype=torch.uint8, device=DEVICE, generator=gen)
    labels = torch.randint(0, 7, (BATCH,), device=DEVICE, generator=gen)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=config.autocast == torch.float16)
    every = torch.arange(BATCH, device=DEVICE)

    def step():  # the step fercuda train runs (fercuda.training), without label smoothing
        x, y = make_batch(images, labels, every, gen, config.channels_last)
        train_step(run, optimizer, scaler, x, y, config.autocast, 0.0)
        _sync()

    return step


def make_infer_step(width, fused, config, batch):
    _, run = _model(width, fused, config, train=False)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, 48, 48), dtype=torch.uint8, device=DEVICE, generator=gen)
    x = fer_input(images)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step():
        with torch.autocast(DEVICE.type, dtype=config.autocast or torch.float32, enabled=config.autocast is not None):
            run(x)
        _sync()

    return step


def _record(kind, width, fused, config, batch, group, median_s):
    images_per_s = batch / median_s
    key = (kind, width, batch)
    RESULTS[(key, fused, config.name)] = images_per_s
    model = "fused" if fused else "plain"
    emit(f"fernet_{kind}", f"{width}-b{batch}-{model}-{config.name}",
         f"{group} {model} {config.name}: {images_per_s:.1f} images/s",
         kind=kind, width_mult=width, fused=fused, config=config.name, device=DEVICE.type, batch=batch,
         rounds=ROUNDS, images_per_s=images_per_s)
    # Once every configuration of this width has both models, the best of each and their ratio.
    done = {(f, c) for (k, f, c) in RESULTS if k == key}
    if len(done) == 2 * len(CONFIGS):
        best = {}
        for f in (True, False):
            name, ips = max(((c, v) for (k, ff, c), v in RESULTS.items() if k == key and ff == f), key=lambda t: t[1])
            best[f] = (name, ips)
        emit(f"fernet_{kind}_best", f"{width}-b{batch}",
             f"{group}: best fused {best[True][0]} {best[True][1]:.1f} images/s, best plain "
             f"{best[False][0]} {best[False][1]:.1f} images/s, fused/plain {best[True][1] / best[False][1]:.2f}x",
             kind=kind, width_mult=width, device=DEVICE.type, batch=batch,
             fused_config=best[True][0], fused_images_per_s=best[True][1],
             plain_config=best[False][0], plain_images_per_s=best[False][1],
             fused_over_plain=best[True][1] / best[False][1])
    return images_per_s


def _measure(kind, benchmark, width, config, batch, steps, rounds, warmup):
    """Both models' steps timed in turn, round after round (a slow spell of a shared machine
    falls on both alike); pytest-benchmark keeps the fused model's rounds."""
    times = interleaved_times_ms({"fused": steps[True], "plain": steps[False]}, rounds, warmup=warmup)
    benchmark.pedantic(steps[True], rounds=1, warmup_rounds=0)
    ips = {f: _record(kind, width, f, config, batch, benchmark.group,
                      statistics.median(times["fused" if f else "plain"]) / 1e3) for f in (True, False)}
    benchmark.extra_info.update(config=config.name, fused_images_per_s=ips[True], plain_images_per_s=ips[False],
                                fused_over_plain=ips[True] / ips[False])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("width", WIDTHS)
def test_train_step(benchmark, width, config):
    steps = {fused: make_train_step(width, fused, config) for fused in (True, False)}
    benchmark.group = f"FERNet train step, width_mult {width}, batch {BATCH}, {DEVICE.type}"
    _measure("train", benchmark, width, config, BATCH, steps, ROUNDS, 2 if config.compile else 1)


@pytest.mark.parametrize("batch", [BATCH, 1], ids=[f"b{BATCH}", "b1"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("width", WIDTHS)
def test_infer(benchmark, width, config, batch):
    steps = {fused: make_infer_step(width, fused, config, batch) for fused in (True, False)}
    benchmark.group = f"FERNet inference, width_mult {width}, batch {batch}, {DEVICE.type}"
    rounds = ROUNDS if batch > 1 else 10 * ROUNDS
    _measure("infer", benchmark, width, config, batch, steps, rounds, 2 if config.compile else 1)
