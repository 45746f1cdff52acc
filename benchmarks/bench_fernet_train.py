"""Training throughput of FERNet, fused depthwise blocks against plain PyTorch layers, in one run.

    python -m pytest benchmarks/bench_fernet_train.py -s --benchmark-columns=median,rounds
    FERCUDA_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_fernet_train.py -s

One step = augmentation + [canny, x, x] + forward + backward + Adam, batch 64 (the paper's);
images/s and the fused/plain ratio are printed at the end and stored in extra_info.
"""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from fercuda.data import augment, fer_input
from fercuda.models import FERNet

DEVICE = torch.device(os.environ.get("FERCUDA_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
BATCH = 64
WIDTHS = [float(w) for w in os.environ.get("FERCUDA_BENCH_WIDTHS", "0.25,1.0").split(",")]
ROUNDS = int(os.environ.get("FERCUDA_BENCH_ROUNDS", "5"))
RESULTS = {}


def make_step(width, fused):
    torch.manual_seed(0)
    model = FERNet(width_mult=width, fused=fused).to(DEVICE).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 1, 48, 48), dtype=torch.uint8, device=DEVICE, generator=gen)
    labels = torch.randint(0, 7, (BATCH,), device=DEVICE, generator=gen)
    amp = DEVICE.type == "cuda"
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=amp)

    def step():
        x = fer_input(augment(images, gen))
        with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)  # time the work, not the launches

    return step


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("width", WIDTHS)
def test_train_step(benchmark, width, fused):
    step = make_step(width, fused)
    benchmark.group = f"FERNet train step, width_mult {width}, batch {BATCH}, {DEVICE.type}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    images_per_s = BATCH / benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = images_per_s
    RESULTS[(width, fused)] = images_per_s


def teardown_module():
    for width in WIDTHS:
        fused, plain = RESULTS.get((width, True)), RESULTS.get((width, False))
        if fused and plain:
            print(f"\nwidth_mult {width} on {DEVICE.type} ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads): fused {fused:.1f} images/s, plain {plain:.1f} images/s, "
                  f"fused/plain {fused / plain:.2f}x")
