"""One training run of FERNet (the official split, or one fold): the loop, its learning-rate
schedule, its checkpoints and its final report."""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function

import numpy as np

from fercuda.data import augment, fer_input, mix_batch, random_erasing
from fercuda.distributed import Dist, log
from fercuda.evaluation import classification_report, format_report, predict_logits
from fercuda.models import FERNet
from fercuda.plots import plot_confusion, plot_curves
from fercuda.runfiles import rng_state, save_checkpoint, set_rng_state, write_json, write_metrics
from fercuda.runtime import AUTOCAST_DTYPES

def lr_factor(schedule: str, progress: float, warmup: float) -> float:
    """Learning-rate multiplier at `progress` (0..1) of the run."""
    if schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return (progress + 1e-3) / warmup
    rest = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


def build_model(num_classes: int, width_mult: float, fused: bool, device) -> FERNet:
    return FERNet(num_classes=num_classes, width_mult=width_mult, fused=fused).to(device)


def make_batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, aug_gen: torch.Generator | None,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's input for the faces `images[idx]`: augmented when `aug_gen` is given, then
    Canny edges + the face (fercuda.data.fer_input), in channels_last when asked."""
    with record_function("batch"):
        x8 = images[idx]
        if aug_gen is not None:
            x8 = augment(x8, aug_gen)
        x = fer_input(x8)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels[idx]


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None,
               label_smoothing: float, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on (x, y); returns the logits and the loss. lam < 1: x is a mixed batch
    (fercuda.data.mix_batch) and the loss weighs y by lam and y.flip(0) by 1 - lam. The phases are
    labelled for torch.profiler (benchmarks/profile_fernet_step.py)."""
    with record_function("forward"):
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if lam < 1.0:
                other = F.cross_entropy(logits.float(), y.flip(0), label_smoothing=label_smoothing)
                loss = lam * loss + (1.0 - lam) * other
    with record_function("backward"):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with record_function("optimizer"):
        scaler.step(optimizer)
        scaler.update()
    return logits, loss


class RunClock:
    """Seconds the run has spent, across --resume: what --time-limit and the schedule count. Time
    the process spent stopped (SIGSTOP / Ctrl-Z, then SIGCONT: a run paused while the machine does
    something else) does not count: a watcher thread ticking every `tick` seconds sees the gap
    when the process continues, and counts what exceeds `stall` seconds as paused."""

    def __init__(self, tick: float = 0.5, stall: float = 5.0):
        self.start = time.monotonic()
        self.before = 0.0
        self._paused = 0.0
        self._lock = threading.Lock()
        self._tick, self._stall = tick, stall
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="fercuda-run-clock", daemon=True).start()

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            gap = now - last - self._tick
            if gap > self._stall:
                with self._lock:
                    self._paused += gap
            last = now

    def close(self) -> None:
        self._stop.set()

    def resumed_at(self, seconds: float) -> None:
        self.before = max(self.before, float(seconds))

    def paused(self) -> float:
        """Seconds this process has spent stopped."""
        with self._lock:
            return self._paused

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.start - self.paused()


class WeightAverage:
    """An exponential moving average of a model's parameters and BatchNorm running statistics
    (`--ema DECAY`), updated after every optimizer step: avg = d * avg + (1 - d) * current with
    d = min(DECAY, (1 + k) / (10 + k)) at update k, so the early average is not stuck at the
    initial weights. The average is the model a run validates, keeps and reports."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for k, avg in self.model.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(current[k], 1.0 - d)
            else:
                avg.copy_(current[k])

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def train_unit(args, dist: Dist, data, unit_dir: Path, train_idx, val_idx, test_idx, test_name: str,
               clock: RunClock) -> dict:
    """Train one model (the official split, or one fold) in unit_dir, resuming from its last.pt."""
    device, precision, channels_last = dist.device, args.precision, args.channels_last
    amp = precision == "fp16"  # the only precision that needs a gradient scaler
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    results_file = unit_dir / "results.json"
    if results_file.exists():
        done = json.loads(results_file.read_text())
        if done["epochs_done"] >= args.epochs:
            log(dist, f"{unit_dir}: already finished, reusing {results_file}")
            return done
    unit_dir.mkdir(parents=True, exist_ok=True)

    classes = data.classes
    model = build_model(len(classes), args.width_mult, not args.plain, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.weight_decay:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    ema = WeightAverage(model, args.ema) if args.ema else None
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + dist.rank)
    history, start_epoch, best_val = [], 0, -1.0

    last = unit_dir / "last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], aug_gen)
        history, start_epoch, best_val = ckpt["history"], ckpt["epoch"], ckpt["best_val_acc"]
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        clock.resumed_at(ckpt.get("run_seconds", 0.0))
        log(dist, f"resuming {unit_dir} after epoch {start_epoch}")

    # The model validated, kept as best.pt and reported: the weight average where there is one.
    scored = ema.model if ema is not None else model
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    images = data.images.to(device)
    labels = data.labels.to(device)
    train_idx = torch.as_tensor(train_idx, dtype=torch.int64)
    meta = {"model_config": model.config(), "classes": list(classes), "fused": not args.plain,
            "args": vars(args)}

    def out_of_time() -> bool:
        return dist.any(args.time_limit is not None and clock.elapsed() > 60 * args.time_limit)

    def set_lr(epoch_progress: float) -> float:
        progress = epoch_progress / args.epochs
        if args.time_limit is not None:
            # Every rank must agree: the time of rank 0 decides (a broadcast would cost a sync per step;
            # ranks drift by milliseconds, which moves the rate by a negligible amount).
            progress = max(progress, clock.elapsed() / (60 * args.time_limit))
        lr = args.lr * lr_factor(args.schedule, progress, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    stopped_early = False
    for epoch in range(start_epoch, args.epochs):
        if out_of_time():
            stopped_early = True
            break
        net.train()
        # Same permutation on every rank (seeded by epoch), each rank taking its own shard, as
        # DistributedSampler does; padded so every rank runs the same number of steps.
        perm = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))]
        per_rank = math.ceil(len(perm) / dist.world)
        perm = torch.cat([perm, perm[: per_rank * dist.world - len(perm)]])[dist.rank::dist.world]
        steps = math.ceil(len(perm) / args.batch_size)
        bar = None
        if args.progress and dist.main:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"{unit_dir.name} epoch {epoch + 1}/{args.epochs}", leave=False,
                       dynamic_ncols=True)
        # Running sums stay on the device: a .item() per step would stall the GPU queue.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        t0 = time.perf_counter()
        for step in range(steps):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size].to(device)
            x, y = make_batch(images, labels, idx, aug_gen if args.augment else None, channels_last)
            if args.erasing:
                random_erasing(x, args.erasing, aug_gen)
            lam = 1.0
            if args.mixup or args.cutmix:
                # Drawn from (seed, rank, epoch, step) alone: a resumed run mixes as the first one would.
                x, lam = mix_batch(x, np.random.default_rng([args.seed, dist.rank, epoch, step]), args.mixup,
                                   args.cutmix)
            lr = set_lr(epoch + step / steps)
            logits, loss = train_step(net, optimizer, scaler, x, y, autocast_dtype, args.label_smoothing, lam)
            if ema is not None:
                ema.update(model)
            n = y.shape[0]
            loss_sum += loss.detach() * n
            correct += (logits.argmax(1) == y).sum()
            seen += n
            if bar is not None:
                bar.update()
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{seen * dist.world / (time.perf_counter() - t0):.0f}")
            if out_of_time():
                stopped_early = True
                break
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        loss_sum, correct, seen = dist.all_sum([loss_sum.item(), float(correct.item()), float(seen)])
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "images_per_s": seen / elapsed, "epoch_seconds": elapsed, "steps": step + 1, "lr": lr,
               "run_seconds": clock.elapsed(), "paused_seconds": clock.paused()}
        if len(val_idx):
            logits = predict_logits(scored, data.images[val_idx], device, channels_last=channels_last)
            vy = data.labels[val_idx].to(logits.device)
            row["val_loss"] = F.cross_entropy(logits, vy).item()
            row["val_acc"] = (logits.argmax(1) == vy).float().mean().item()
        history.append(row)
        log(dist, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        if dist.main:
            improved = row.get("val_acc", -1.0) > best_val
            if improved:
                best_val = row["val_acc"]
                save_checkpoint(unit_dir / "best.pt", {**meta, "model": scored.state_dict(), "epoch": epoch + 1,
                                                       "val_acc": best_val})
            state = {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "rng": rng_state(aug_gen),
                     "history": history, "best_val_acc": best_val, "run_seconds": clock.elapsed()}
            if ema is not None:
                state["ema"] = ema.state_dict()
            save_checkpoint(last, state)
            write_metrics(unit_dir, history)
        dist.barrier()
        if stopped_early:
            break

    # DDP keeps the replicas equal by averaging gradients; check that it did (parameters only:
    # each rank updates its BatchNorm running statistics from its own last batch).
    weight_spread = dist.max_spread(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
    # The official split reports the checkpoint best on PublicTest; folds the last epoch's model.
    if ema is not None:
        model = ema.model
    if dist.main and (unit_dir / "best.pt").exists() and len(val_idx):
        model.load_state_dict(torch.load(unit_dir / "best.pt", map_location=device, weights_only=True)["model"])
    result = {"stopped_early": stopped_early, "epochs_done": len(history),
              "best_val_acc": best_val if best_val >= 0 else None, "world_size": dist.world,
              "rank_weight_spread": weight_spread}
    if dist.main:
        if not history:
            raise RuntimeError(f"{unit_dir}: no epoch ran (time limit {args.time_limit} min already spent)")
        logits = predict_logits(model, data.images[test_idx], device, channels_last=channels_last)
        report = classification_report(logits.argmax(1).cpu().numpy(), data.labels[test_idx].numpy(), classes)
        report["split"] = test_name
        result.update(test_accuracy=report["accuracy"], test_split=test_name, test_images=len(test_idx))
        write_json(unit_dir / "per_class.json", report)
        plot_confusion(report, unit_dir / "confusion.png", test_name)
        plot_curves(history, unit_dir / "curves.png")
        print(format_report(report, f"{unit_dir.name} {test_name}"), flush=True)
        if not stopped_early or len(history) >= args.epochs:
            write_json(results_file, result)
        else:
            write_json(unit_dir / "partial_results.json", result)
    dist.barrier()
    return result
