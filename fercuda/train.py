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
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fercuda.data import kfold_assignments, load_faces
from fercuda.data.diagnostics import splits_differ_warning
from fercuda.distributed import Dist, log
from fercuda.models import FERNet, complexity
from fercuda.runfiles import write_json
from fercuda.runtime import keep_freed_memory, resolve_precision
from fercuda.training import RunClock, train_unit

# Arguments a --resume run may change; every other one comes from the run's args.json.
RESUME_OVERRIDABLE = ("epochs", "time_limit", "device", "progress", "threads")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

SCHEDULES = ("constant", "cosine")



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
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per step and per process: under torchrun with N processes a step sees N x "
                        "this many images (gradients averaged over all of them) at the same --lr")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--plain", action="store_true", help="plain PyTorch depthwise layers instead of the fused op")
    p.add_argument("--folds", type=int, default=0, help="K-fold cross-validation instead of the official split")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast precision of the network: fp16 (CUDA), bf16, or fp32; auto picks fp16 on CUDA, "
                        "bf16 on a CPU with native bfloat16 arithmetic (AVX-512 BF16 or AMX), fp32 otherwise. "
                        "Weights, optimizer and loss stay float32")
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                   help="older spelling: --amp is --precision auto, --no-amp is --precision fp32")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="channels_last activations and weights (default: on for CPUs, off for CUDA)")
    p.add_argument("--schedule", default="constant", choices=SCHEDULES,
                   help="learning rate over the run: constant (the paper), or a cosine decay to 0 over "
                        "--epochs, or over --time-limit when that ends the run first")
    p.add_argument("--warmup", type=float, default=0.0, metavar="FRACTION",
                   help="linear warm-up over this fraction of the run (with --schedule cosine)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (0 = none)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999) and validate, keep and "
                        "report it instead of the last weights (0 = none)")
    p.add_argument("--erasing", type=float, default=0.0, metavar="P",
                   help="random erasing: each training image, with probability P, gets a rectangle (2-33%% of the "
                        "face) set to mid-grey in every input channel (0 = none)")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup: blend each batch with itself reversed, weight ~ Beta(ALPHA, ALPHA) (0 = none)")
    p.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="CutMix: paste a box of the reversed batch, area ~ Beta(ALPHA, ALPHA); with --mixup too, "
                        "each batch takes one of the two (0 = none)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW; 0 = Adam)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    p.add_argument("--limit", type=int, default=0, help="use only N training images (smoke runs)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="the run's training budget, counted across --resume: stop after this long (checked every "
                        "step), then evaluate; --schedule cosine fits its decay to it")
    p.add_argument("--progress", default=None, action=argparse.BooleanOptionalAction,
                   help="tqdm progress bar (default: when stderr is a terminal)")
    return p



def resolve_args(argv=None, parser=None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["fercuda", "train", *(sys.argv[1:] if argv is None else argv)])
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
    if not 0 <= args.label_smoothing < 1 or args.weight_decay < 0 or not 0 <= args.warmup < 1:
        parser.error("--label-smoothing and --warmup must lie in [0, 1), --weight-decay must be >= 0")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema must lie in [0, 1) (a decay such as 0.999; 0 = none), got {args.ema}")
    if not 0 <= args.erasing <= 1:
        parser.error(f"--erasing must be a probability in [0, 1], got {args.erasing}")
    if args.mixup < 0 or args.cutmix < 0:
        parser.error(f"--mixup and --cutmix must be >= 0 (0 = none), got {args.mixup} and {args.cutmix}")
    if args.folds == 1 or args.folds < 0:
        parser.error(f"--folds must be 0 (official split) or >= 2, got {args.folds}")
    return args



def run(args: argparse.Namespace) -> dict:
    clock = RunClock()
    dist = Dist(args.device)
    device = dist.device
    if args.amp is not None:  # the older flag, kept for scripts that pass it
        args.precision = "auto" if args.amp else "fp32"
        args.amp = None
    args.precision = resolve_precision(args.precision, device)
    if args.channels_last is None:
        args.channels_last = device.type == "cpu"
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_memory()
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
              f"{len(data)} images, classes {list(data.classes)}, device {device}, precision {args.precision}, "
              f"channels_last {args.channels_last}, "
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
                                          test_idx, f"fold {f}", clock))
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
            warning = splits_differ_warning(data, train_idx, test_idx, "test")
            if warning:
                log(dist, warning)
            r = train_unit(args, dist, data, out / "official", train_idx, val_idx, test_idx,
                           "PrivateTest" if "PrivateTest" in data.splits else "Test", clock)
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
        clock.close()
        dist.close()



def main(argv=None) -> int:
    run(resolve_args(argv))
    return 0



if __name__ == "__main__":
    sys.exit(main())
