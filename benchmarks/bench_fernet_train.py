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

from bench_record import emit
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
    # Each figure is printed (and kept, see bench_record) as soon as it is measured, the ratio as
    # soon as both of its width's models are: a run stopped midway keeps what it measured.
    where = (f"on {DEVICE.type} ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads)")
    emit("fernet_step", f"{width}-{'fused' if fused else 'plain'}",
         f"width_mult {width} {'fused' if fused else 'plain'} {where}: {images_per_s:.1f} images/s",
         width_mult=width, fused=fused, device=DEVICE.type, batch=BATCH, rounds=ROUNDS, images_per_s=images_per_s)
    fused_ips, plain_ips = RESULTS.get((width, True)), RESULTS.get((width, False))
    if fused_ips and plain_ips:
        emit("fernet_fused_vs_plain", str(width),
             f"width_mult {width} {where}: fused {fused_ips:.1f} images/s, plain {plain_ips:.1f} images/s, "
             f"fused/plain {fused_ips / plain_ips:.2f}x",
             width_mult=width, device=DEVICE.type, batch=BATCH, fused_images_per_s=fused_ips,
             plain_images_per_s=plain_ips, fused_over_plain=fused_ips / plain_ips)
