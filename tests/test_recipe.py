"""The training recipe's pieces: random erasing, mixup / CutMix, the weight average and the run
clock that a paused run does not advance."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fercuda.data import mix_batch, random_erasing
from fercuda.training import RunClock, WeightAverage


def test_random_erasing_sets_one_box_per_chosen_image():
    n, h, w = 2000, 48, 40
    x = torch.ones(n, 3, h, w).contiguous(memory_format=torch.channels_last)
    random_erasing(x, 0.5, torch.Generator().manual_seed(3))
    erased = x == 0
    assert torch.equal(erased[:, 0], erased[:, 1]) and torch.equal(erased[:, 0], erased[:, 2])
    assert torch.all((x == 0) | (x == 1))
    hit = erased[:, 0].flatten(1).any(1)
    assert 0.45 < hit.float().mean().item() < 0.55
    for m in erased[hit, 0][:200]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        box = torch.zeros_like(m)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(m, box), "not one rectangle"
        area = m.sum().item() / (h * w)
        assert 0.015 < area < 0.36
    again = torch.ones(n, 3, h, w)
    random_erasing(again, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(again == 0, erased)


def test_random_erasing_rejects_bad_input():
    with pytest.raises(ValueError, match="random_erasing\\(x\\): expected a floating tensor"):
        random_erasing(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError, match="random_erasing\\(p\\): expected a probability in \\[0, 1\\], got 1.5"):
        random_erasing(torch.zeros(2, 1, 8, 8), 1.5)
    x = torch.rand(3, 2, 8, 8)
    assert torch.equal(random_erasing(x.clone(), 0.0), x)
    assert random_erasing(torch.zeros(0, 3, 8, 8), 1.0).shape == (0, 3, 8, 8)


def test_mixup_blends_each_image_with_its_mirror_in_the_batch():
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    mixed, lam = mix_batch(x, np.random.default_rng(0), mixup_alpha=0.4)
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0), rtol=0, atol=1e-12)


def test_cutmix_lam_is_the_share_of_each_image_left():
    values = torch.arange(6, dtype=torch.float32)
    x = values.view(6, 1, 1, 1).expand(6, 3, 48, 48).contiguous()
    for seed in range(20):
        mixed, lam = mix_batch(x, np.random.default_rng(seed), cutmix_alpha=1.0)
        own = (mixed == values.view(6, 1, 1, 1)).float().mean((1, 2, 3))
        assert torch.allclose(own, torch.full((6,), lam)), seed
        assert torch.equal(mixed[mixed != values.view(6, 1, 1, 1).expand_as(mixed)],
                           x.flip(0)[mixed != values.view(6, 1, 1, 1).expand_as(mixed)])
    assert mix_batch(x, np.random.default_rng(0)) == (x, 1.0)
    with pytest.raises(ValueError, match="alphas must be >= 0"):
        mix_batch(x, np.random.default_rng(0), mixup_alpha=-1.0)


def test_weight_average_follows_its_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = WeightAverage(model, decay=0.9)
    reference = {k: v.double().clone() for k, v in model.state_dict().items()}
    for k in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 6, 6))  # training mode: running statistics move
        ema.update(model)
        d = min(0.9, (1 + k) / (10 + k))
        for name, v in model.state_dict().items():
            if v.is_floating_point():
                reference[name] = d * reference[name] + (1 - d) * v.double()
            else:
                reference[name] = v.double()
    for name, v in ema.model.state_dict().items():
        torch.testing.assert_close(v.double(), reference[name], rtol=1e-6, atol=1e-6)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    copy = WeightAverage(model, decay=0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 5


def test_run_clock_does_not_count_a_stopped_process():
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from fercuda.training import RunClock
        clock = RunClock(tick=0.05, stall=0.5)
        print("ready", flush=True)
        sys.stdin.readline()
        print(f"{clock.elapsed():.3f} {clock.paused():.3f}", flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        start = time.monotonic()
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.5)
        child.stdin.write("\n")
        child.stdin.flush()
        elapsed, paused = map(float, child.stdout.readline().split())
        wall = time.monotonic() - start
    finally:
        child.kill()
        child.wait()
    assert paused > 2.5
    assert elapsed < wall - 2.5


def test_run_clock_counts_resumed_seconds():
    clock = RunClock()
    clock.resumed_at(100.0)
    assert 100.0 <= clock.elapsed() < 101.0
    clock.close()
