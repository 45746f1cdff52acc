"""Train FERNet on FER2013 or CK+ (the paper's section 4.1 setup: Adam, lr 1e-3, batch 64).

    fercuda train --data /path/to/fer2013.csv --out runs/fer2013
    torchrun --nproc-per-node 4 -m fercuda.train --data ... --out ...

Official split: train on Training, keep the checkpoint best on PublicTest, report PrivateTest.
--folds K: K-fold cross-validation (subjects never straddle folds on CK+); each fold trains on
K-1 folds and reports the last epoch's model on the held-out fold (no checkpoint is chosen on
the fold it is scored on); the summary gives mean and std over folds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fercuda.data import augment, fer_input, kfold_assignments, load_faces
from fercuda.models import FERNet, complexity

# Arguments a --resume run may change; every other one comes from the run's args.json.
RESUME_OVERRIDABLE = ("epochs", "time_limit", "device", "amp", "progress", "threads")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fercuda train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="fer2013.csv, icml_face_data.csv, a train/test folder tree or CK+48")
    p.add_argument("--format", default="auto", choices=("auto", "csv", "folder", "ckplus"))
    p.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                   help="malformed rows or images: stop with an error, or skip and count them")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default ~/.cache/fercuda)")
    p.add_argument("--out", default=None, help="run folder (default runs/<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument("--epochs", type=int, default=None, help="default 50")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--plain", action="store_true", help="plain PyTorch depthwise layers instead of the fused op")
    p.add_argument("--folds", type=int, default=0, help="K-fold cross-validation instead of the official split")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                   help="float16 mixed precision (default on for CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    p.add_argument("--limit", type=int, default=0, help="use only N training images (smoke runs)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop training after this long (checked every step), then evaluate")
    p.add_argument("--progress", default=None, action=argparse.BooleanOptionalAction,
                   help="tqdm progress bar (default: when stderr is a terminal)")
    return p


# ---------------------------------------------------------------------------- small utilities
def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and os.replace it: a crash leaves the
    old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, w)


def save_checkpoint(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state(aug_generator: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        # As plain lists, so checkpoints load with torch.load(weights_only=True).
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "augment": aug_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, aug_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    aug_generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a single process otherwise."""

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg is None:
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {device_arg}: CUDA is not available on this machine")
        if self.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.main = self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """Whether any rank says so: every rank must leave a loop at the same step, or DDP hangs."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


def log(dist: Dist, *msg):
    if dist.main:
        print(*msg, flush=True)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_logits(model, images: torch.Tensor, device, batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """Logits of uint8 faces (N, 1, 48, 48) in eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = fer_input(images[i:i + batch_size].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def classification_report(pred: np.ndarray, true: np.ndarray, classes) -> dict:
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp, predicted, actual = cm[i, i], cm[:, i].sum(), cm[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(actual)}
    accuracy = float((pred == true).mean()) if len(true) else 0.0
    return {"accuracy": accuracy, "per_class": per_class, "confusion_matrix": cm.tolist(), "classes": list(classes)}


def format_report(report: dict, title: str) -> str:
    lines = [f"{title}: accuracy {100 * report['accuracy']:.2f}% on {sum(r['support'] for r in report['per_class'].values())} images",
             f"{'class':>10} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>7}"]
    for name, r in report["per_class"].items():
        lines.append(f"{name:>10} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:7d}")
    return "\n".join(lines)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [h.get("val_loss") for h in history], "o-", label="validation")
        ax_acc.plot(epochs, [h.get("val_acc") for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_confusion(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(report["confusion_matrix"], dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({int(cm[i, j])})", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: accuracy {100 * report['accuracy']:.2f}%")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------------------- one training run
def sharpness(images: torch.Tensor, sample: int = 2000) -> float:
    """Mean |Laplacian| of up to `sample` uint8 faces (N, 1, H, W), evenly spaced."""
    if len(images) == 0:
        return float("nan")
    pick = images[torch.linspace(0, len(images) - 1, min(sample, len(images))).long()].float()
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(pick, kernel).abs().mean().item()


def warn_if_splits_differ(data, train_idx, eval_idx, eval_name: str, dist) -> None:
    """Training and evaluation images of one data set should look alike. A copy whose training
    images were blurred (or re-encoded far more coarsely) than its test images trains a network
    for a different input than it is scored on, and its Canny channel changes most of all."""
    a = sharpness(data.images[torch.as_tensor(train_idx)])
    b = sharpness(data.images[torch.as_tensor(eval_idx)])
    if a > 0 and b > 0 and max(a / b, b / a) > 3:
        log(dist, f"warning: the Training images are {'blurrier' if a < b else 'sharper'} than the {eval_name} "
                  f"images (mean |Laplacian| {a:.1f} against {b:.1f}); accuracy on {eval_name} will suffer "
                  "from the difference, not only from the model. Check the data set's copy.")


def build_model(num_classes: int, width_mult: float, fused: bool, device) -> FERNet:
    return FERNet(num_classes=num_classes, width_mult=width_mult, fused=fused).to(device)


def train_unit(args, dist: Dist, data, unit_dir: Path, train_idx, val_idx, test_idx, test_name: str,
               start_time: float) -> dict:
    """Train one model (the official split, or one fold) in unit_dir, resuming from its last.pt."""
    device, amp = dist.device, args.amp
    results_file = unit_dir / "results.json"
    if results_file.exists():
        done = json.loads(results_file.read_text())
        if done["epochs_done"] >= args.epochs:
            log(dist, f"{unit_dir}: already finished, reusing {results_file}")
            return done
    unit_dir.mkdir(parents=True, exist_ok=True)

    classes = data.classes
    model = build_model(len(classes), args.width_mult, not args.plain, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
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
        log(dist, f"resuming {unit_dir} after epoch {start_epoch}")

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
        return dist.any(args.time_limit is not None and time.time() - start_time > 60 * args.time_limit)

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
            x8 = images[idx]
            if args.augment:
                x8 = augment(x8, aug_gen)
            x = fer_input(x8)
            y = labels[idx]
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
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
               "images_per_s": seen / elapsed, "epoch_seconds": elapsed, "steps": step + 1}
        if len(val_idx):
            logits = predict_logits(model, data.images[val_idx], device, amp=amp)
            vy = data.labels[val_idx].to(logits.device)
            row["val_loss"] = F.cross_entropy(logits, vy).item()
            row["val_acc"] = (logits.argmax(1) == vy).float().mean().item()
        history.append(row)
        log(dist, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        if dist.main:
            improved = row.get("val_acc", -1.0) > best_val
            if improved:
                best_val = row["val_acc"]
                save_checkpoint(unit_dir / "best.pt", {**meta, "model": model.state_dict(), "epoch": epoch + 1,
                                                       "val_acc": best_val})
            save_checkpoint(last, {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scaler": scaler.state_dict(), "epoch": epoch + 1, "rng": rng_state(aug_gen),
                                   "history": history, "best_val_acc": best_val})
            write_metrics(unit_dir, history)
        dist.barrier()
        if stopped_early:
            break

    # The official split reports the checkpoint best on PublicTest; folds the last epoch's model.
    if dist.main and (unit_dir / "best.pt").exists() and len(val_idx):
        model.load_state_dict(torch.load(unit_dir / "best.pt", map_location=device, weights_only=True)["model"])
    result = {"stopped_early": stopped_early, "epochs_done": len(history),
              "best_val_acc": best_val if best_val >= 0 else None}
    if dist.main:
        if not history:
            raise RuntimeError(f"{unit_dir}: no epoch ran (time limit {args.time_limit} min already spent)")
        logits = predict_logits(model, data.images[test_idx], device, amp=amp)
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


def write_metrics(unit_dir: Path, history: list[dict]) -> None:
    write_json(unit_dir / "metrics.json", history)
    fields = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))

    def w(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(unit_dir / "metrics.csv", w)


# ---------------------------------------------------------------------------- entry point
def resolve_args(argv=None, parser=None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        saved_file = run_dir / "args.json"
        if not saved_file.exists():
            parser.error(f"--resume {run_dir}: no args.json there, not a run folder")
        saved = json.loads(saved_file.read_text())
        for key in RESUME_OVERRIDABLE:
            if getattr(args, key) is not None:
                saved[key] = getattr(args, key)
        saved["resume"] = str(run_dir)
        saved["out"] = str(run_dir)
        args = argparse.Namespace(**{**vars(args), **saved})
    if not args.data:
        parser.error("--data is required")
    if args.epochs is None:
        args.epochs = 50
    if args.out is None:
        args.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if args.batch_size < 1 or args.epochs < 1 or args.lr <= 0 or args.width_mult <= 0:
        parser.error("--batch-size, --epochs, --lr and --width-mult must be positive")
    if args.folds == 1 or args.folds < 0:
        parser.error(f"--folds must be 0 (official split) or >= 2, got {args.folds}")
    return args


def run(args: argparse.Namespace) -> dict:
    start_time = time.time()
    dist = Dist(args.device)
    device = dist.device
    if args.amp is None:
        args.amp = device.type == "cuda"
    args.amp = bool(args.amp) and device.type == "cuda"
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True

    out = Path(args.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "args.json", vars(args))
    dist.barrier()

    data = load_faces(args.data, args.format, args.on_error, cache_dir=args.cache_dir)
    if data.skipped:
        log(dist, f"skipped {data.skipped} bad rows or images, e.g. {data.problems[0]}")
    info = complexity(FERNet(len(data.classes), args.width_mult, fused=False))
    log(dist, f"FERNet width_mult={args.width_mult}: {info['params']:,} parameters, "
              f"{info['macs'] / 1e6:.1f} M multiply-adds ({info['flops'] / 1e9:.3f} GFLOPs) per 48x48 image; "
              f"{len(data)} images, classes {list(data.classes)}, device {device}, amp {args.amp}, "
              f"world size {dist.world}")

    rng = np.random.default_rng(args.seed)

    def limited(idx):
        idx = np.asarray(idx)
        return np.sort(rng.permutation(idx)[: args.limit]) if args.limit and len(idx) > args.limit else idx

    try:
        if args.folds:
            folds = kfold_assignments(len(data), args.folds, args.seed, groups=data.subjects,
                                      labels=data.labels.numpy())
            results = []
            for f in range(args.folds):
                test_idx = np.flatnonzero(folds == f)
                train_idx = limited(np.flatnonzero(folds != f))
                results.append(train_unit(args, dist, data, out / f"fold_{f:02d}", train_idx, np.array([], np.int64),
                                          test_idx, f"fold {f}", start_time))
                if results[-1].get("stopped_early"):
                    break
            accs = [r["test_accuracy"] for r in results if "test_accuracy" in r]
            summary = {"folds": args.folds, "folds_done": len(accs), "fold_accuracies": accs,
                       "mean_accuracy": float(np.mean(accs)) if accs else None,
                       "std_accuracy": float(np.std(accs)) if accs else None, "info": info}
        else:
            train_idx = data.indices("Training").numpy()
            val_idx = data.indices("PublicTest").numpy()
            test_idx = data.indices("PrivateTest").numpy()
            if len(test_idx) == 0:
                test_idx = data.indices("Test").numpy()
            if len(train_idx) == 0 or len(test_idx) == 0:
                raise ValueError(
                    f"{args.data}: the official split needs Training and PrivateTest (or test/) images; "
                    f"found splits {sorted(set(data.splits.tolist()))}. Use --folds K for data without one.")
            if len(val_idx) == 0:
                # No PublicTest (a test/ folder without prefixes): hold out 10 % of Training.
                perm = rng.permutation(train_idx)
                n_val = max(1, len(perm) // 10)
                val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            train_idx = limited(train_idx)
            warn_if_splits_differ(data, train_idx, test_idx, "test", dist)
            r = train_unit(args, dist, data, out / "official", train_idx, val_idx, test_idx,
                           "PrivateTest" if "PrivateTest" in data.splits else "Test", start_time)
            summary = {**r, "info": info}
        if dist.main:
            write_json(out / "summary.json", summary)
            acc = summary.get("test_accuracy", summary.get("mean_accuracy"))
            if acc is not None:
                msg = f"final test accuracy: {100 * acc:.2f}%"
                if args.folds:
                    msg += f" (mean of {summary['folds_done']} folds, std {100 * summary['std_accuracy']:.2f}%)"
                print(msg, flush=True)
        return summary
    finally:
        dist.close()


def main(argv=None) -> int:
    run(resolve_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
