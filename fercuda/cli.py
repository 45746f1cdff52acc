"""The fercuda command: train, eval, predict, export, info."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fercuda.engines import ENGINES
from fercuda.recognition import DEFAULT_TTA, HAAR_CASCADE, TTA_MODES

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


def load_model(checkpoint, device, fused: bool = True):
    """A FERNet and its class names from a checkpoint written by fercuda train (a file or a run
    folder), or the pretrained FERNet shipped with fercuda when checkpoint is None."""
    from fercuda.models import load

    model = load(checkpoint, fused=fused, device=device)
    return model, list(model.metadata["classes"]), Path(model.metadata["checkpoint"])


def default_device(arg):
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from fercuda.data import load_faces
    from fercuda.engines import make_engine
    from fercuda.evaluation import classification_report, format_report
    from fercuda.plots import plot_confusion
    from fercuda.recognition import face_probabilities
    from fercuda.runfiles import write_json

    device = default_device(args.device)
    if args.plain and args.engine not in ("torch", "auto"):
        raise ValueError(f"--plain runs the plain PyTorch model: it needs --engine torch, got --engine {args.engine}")
    model, classes, path = load_model(args.checkpoint, "cpu", fused=not args.plain)
    engine = make_engine("torch" if args.plain else args.engine, model, device)
    data = load_faces(args.data, args.format, args.on_error, cache_dir=args.cache_dir)
    if list(data.classes) != classes:
        raise ValueError(f"{args.data}: classes {list(data.classes)} differ from the checkpoint's {classes}")
    if args.split == "all":
        idx = torch.arange(len(data))
    else:
        idx = data.indices(args.split)
        if len(idx) == 0:
            raise ValueError(f"{args.data}: no images in split {args.split!r}; "
                             f"present: {sorted(set(data.splits.tolist()))} (or use --split all)")
    batch = 256 if device.type == "cuda" else 32
    prob, single = face_probabilities(engine, data.images[idx], args.tta, batch, single_view=True)
    true = data.labels[idx].numpy()
    report = classification_report(prob.argmax(1).numpy(), true, classes)
    single_accuracy = float((single.argmax(1).numpy() == true).mean()) if len(true) else 0.0
    report.update(split=args.split, checkpoint=str(path), engine=engine.name, tta=args.tta,
                  single_view_accuracy=single_accuracy)
    print(format_report(report, f"{path} on {args.split} ({engine.name}, tta {args.tta})"))
    if args.tta != "none":
        print(f"single view: accuracy {100 * single_accuracy:.2f}%")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", report)
        plot_confusion(report, out / "confusion.png", args.split)
    return 0


# ---------------------------------------------------------------------------- predict
def face_detector(cascade_path=None):
    """OpenCV's bundled Haar cascade, or None where this OpenCV build lacks it (with the reason)."""
    from fercuda.recognition import haar_detector

    return haar_detector(cascade_path)


def annotate(frame: np.ndarray, faces) -> np.ndarray:
    """A copy of a BGR or grayscale frame with each face's box and dominant emotion drawn."""
    import cv2

    scale = max(1, 192 // max(1, min(frame.shape[:2])))  # enlarge tiny images so the text is legible
    if scale > 1:
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR) if frame.ndim == 2 else frame.copy()
    for face in faces:
        x, y, w, h = (v * scale for v in face["box"])
        name = face["dominant_emotion"]
        cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), (0, 255, 0), 2)
        cv2.putText(frame, f"{name} {face['emotions'][name]:.2f}", (x + 2, max(12, y - 4) if y >= 14 else y + 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 255), 1, cv2.LINE_AA)
    return frame


def predict_paths(args, parser=None):
    """(checkpoint or None, input, output) from `fercuda predict [CHECKPOINT] INPUT [--out OUT]`."""
    if len(args.paths) > 2:
        raise SystemExit(f"fercuda predict: expected [CHECKPOINT] INPUT, got {len(args.paths)} paths: {args.paths}")
    checkpoint, source = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    source = Path(source)
    out = Path(args.out) if args.out else Path(f"{source.stem}_fercuda{source.suffix}")
    return checkpoint, source, out


def _write_atomically(out: Path, write) -> None:
    """write(tmp_path) then rename onto out: an error leaves neither a partial file nor a changed out."""
    from fercuda.runfiles import atomic_write

    atomic_write(out, lambda tmp: write(Path(tmp)), keep_suffix=True)


def _json_faces(faces):
    return [{"box": list(f["box"]), "dominant_emotion": f["dominant_emotion"], "emotions": f["emotions"]}
            for f in faces]


def _csv_rows(results, classes):
    rows = []
    for r in results:
        for f in r["faces"]:
            rows.append([r["frame"], f"{r['time']:.3f}", *f["box"], f["dominant_emotion"],
                         *(f"{f['emotions'][c]:.4f}" for c in classes)])
    return ["frame", "time", "x", "y", "w", "h", "dominant_emotion", *classes], rows


def _write_csv(path: Path, header, rows) -> None:
    import csv

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    _write_atomically(path, write)


def make_recognizer(args, checkpoint):
    from fercuda.models import load
    from fercuda.recognition import FER

    detector = "whole" if args.whole_image else "haar"
    device = default_device(args.device)
    model = load(checkpoint, fused=not args.plain, device="cpu") if args.plain else checkpoint
    if args.plain and args.engine not in ("torch", "auto"):
        raise ValueError(f"--plain runs the plain PyTorch model: it needs --engine torch, got --engine {args.engine}")
    return FER(model, detector=detector, cascade=args.cascade, min_face_size=args.min_face_size, device=device,
               engine="torch" if args.plain else args.engine, tta=args.tta)


def cmd_predict(args) -> int:
    import cv2

    from fercuda.recognition import NoFaceError, read_image

    checkpoint, source, out = predict_paths(args)
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out}: the same file as the input; choose another name")
    is_video = source.suffix.lower() in VIDEO_EXTENSIONS
    if not is_video:
        image = read_image(source)  # an undecodable file fails here, before the model is loaded
    fer = make_recognizer(args, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not is_video:
        faces = fer.detect_emotions(image)
        if not faces:
            raise NoFaceError(f"{source}: no face found (faces of {fer.face_size_for(image.shape)} pixels or more "
                              "were searched); --whole-image classifies the whole image as one face, "
                              "--min-face-size 24 searches smaller faces")
        ok, encoded = cv2.imencode(out.suffix or ".png", annotate(image, faces))
        if not ok:
            raise ValueError(f"--out {out}: OpenCV cannot write images with suffix {out.suffix!r}")
        _write_atomically(out, lambda tmp: encoded.tofile(str(tmp)))
        results = [{"frame": 0, "time": 0.0, "faces": faces}]
        json_out = Path(args.json) if args.json else None
        csv_out = Path(args.csv) if args.csv else None
    else:
        results = predict_video(fer, source, out, progress=args.progress)
        json_out = Path(args.json) if args.json else out.with_suffix(".json")
        csv_out = Path(args.csv) if args.csv else out.with_suffix(".csv")
    n_faces = sum(len(r["faces"]) for r in results)
    print(f"{out}: {n_faces} face(s) in {len(results)} frame(s), engine {fer.engine_name}, tta {fer.tta}")
    if n_faces == 0:
        print(f"  no face found in {source}; --whole-image classifies the whole frame as one face")
    for f in results[0]["faces"]:
        name = f["dominant_emotion"]
        print(f"  {list(f['box'])}: {name} ({f['emotions'][name]:.2f})")
    if json_out:
        payload = [{"frame": r["frame"], "time": r["time"], "faces": _json_faces(r["faces"])} for r in results]
        _write_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
        print(f"  {json_out}: per-frame faces (JSON)")
    if csv_out:
        _write_csv(csv_out, *_csv_rows(results, fer.classes))
        print(f"  {csv_out}: one row per face (CSV)")
    return 0


def predict_video(fer, source: Path, out: Path, progress=None) -> list[dict]:
    """Annotate a video into `out` (written atomically); the per-frame results. Frames are decoded
    in one thread and encoded in another while the main thread finds and scores the faces."""
    import queue
    import threading

    import cv2

    from fercuda.recognition import open_video

    capture = open_video(source)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    results = []

    def write_video(tmp: Path) -> None:
        from tqdm import tqdm

        from fercuda.recognition import _video_results

        frames_q: queue.Queue = queue.Queue(maxsize=8)
        failure = []

        def writer_loop():
            writer = None
            try:
                while (frame := frames_q.get()) is not None:
                    if writer is None:
                        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if out.suffix.lower() in {".mp4", ".m4v", ".mov"}
                                                          else "MJPG"))
                        writer = cv2.VideoWriter(str(tmp), fourcc, fps, (frame.shape[1], frame.shape[0]))
                        if not writer.isOpened():
                            raise ValueError(f"--out {out}: OpenCV cannot write this video format")
                    writer.write(frame)
            except BaseException as e:
                failure.append(e)
                while frames_q.get() is not None:  # drain so that the producer never blocks
                    pass
            finally:
                if writer is not None:
                    writer.release()

        thread = threading.Thread(target=writer_loop, daemon=True)
        thread.start()
        show = progress if progress is not None else total >= 100
        bar = tqdm(total=total or None, unit="frame", desc=source.name, disable=not show, file=sys.stderr)
        try:
            for result, frame in _video_results(fer, capture, fps if fps > 0 else 0.0, True, 8):
                if failure:
                    break
                frames_q.put(annotate(frame, result["faces"]))
                results.append(result)
                bar.update()
        finally:
            frames_q.put(None)
            thread.join()
            bar.close()
        if failure:
            raise failure[0]
        if not results:
            raise ValueError(f"video {source}: no frame could be decoded")

    _write_atomically(out, write_video)
    return results


# ---------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from fercuda.export import export_onnx

    if len(args.paths) > 2:
        raise SystemExit(f"fercuda export: expected [CHECKPOINT] OUT.onnx, got {len(args.paths)} paths: {args.paths}")
    checkpoint, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    meta = export_onnx(checkpoint, out, opset=args.opset)
    print(f"{out}: FERNet as ONNX (opset {meta['opset']}, {meta['bytes']:,} bytes, BatchNorm folded, input "
          f"'input' float32 (N, 3, 48, 48), output 'logits' (N, {len(meta['classes'])}); classes {meta['classes']})")
    return 0


# ---------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from fercuda.models import FERNet, complexity

    for w in args.width_mult:
        info = complexity(FERNet(num_classes=args.num_classes, width_mult=w, fused=False), args.image_size)
        print(f"FERNet width_mult={w}: {info['params']:,} parameters, {info['macs'] / 1e6:.1f} M multiply-adds "
              f"({info['flops'] / 1e9:.3f} GFLOPs) per {args.image_size}x{args.image_size} image")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fercuda.train import build_parser as train_parser

    parser = argparse.ArgumentParser(prog="fercuda", description="FERNet on fercuda's ops")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(sub.add_parser("train", help="train FERNet", description="Train FERNet (Adam, lr 1e-3, batch 64)"))

    def common(p, checkpoint=True):
        if checkpoint:
            p.add_argument("checkpoint", nargs="?", default=None,
                           help="best.pt / last.pt, or a run folder (default: the pretrained FERNet shipped with fercuda)")
        p.add_argument("--device", default=None)
        p.add_argument("--plain", action="store_true", help="plain PyTorch depthwise layers instead of the fused op")
        p.add_argument("--engine", default="auto", choices=("auto", *ENGINES),
                       help="inference engine (default auto: the fastest installed, see fercuda.engines)")
        p.add_argument("--tta", default=DEFAULT_TTA, choices=TTA_MODES,
                       help=f"test-time augmentation: views averaged per face (default {DEFAULT_TTA}: the face and "
                            "its mirror image, in one batch)")

    p = sub.add_parser("eval", help="accuracy, per-class precision/recall and confusion matrix of a checkpoint")
    common(p)
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto", choices=("auto", "csv", "folder", "ckplus"))
    p.add_argument("--on-error", default="raise", choices=("raise", "skip"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--split", default="PrivateTest", help="Training, PublicTest, PrivateTest, Test or all")
    p.add_argument("--out", default=None, help="folder for eval.json and confusion.png")

    p = sub.add_parser("predict", help="find faces in an image or video, classify them, write an annotated copy",
                       usage="fercuda predict [CHECKPOINT] INPUT [--out OUT] [options]")
    common(p, checkpoint=False)
    p.add_argument("paths", nargs="+", metavar="[CHECKPOINT] INPUT",
                   help="image or video to classify, after an optional checkpoint (best.pt / last.pt or a run "
                        "folder; default: the pretrained FERNet shipped with fercuda)")
    p.add_argument("--out", default=None,
                   help="annotated image or video to write (default: INPUT's name with _fercuda added, here)")
    p.add_argument("--json", default=None,
                   help="write the predictions as JSON (default for a video: OUT with the suffix .json)")
    p.add_argument("--csv", default=None,
                   help="write the predictions as CSV, one row per face (default for a video: OUT with .csv)")
    p.add_argument("--cascade", default=None, help=f"path to {HAAR_CASCADE} (default: OpenCV's bundled one)")
    p.add_argument("--whole-image", action="store_true", help="classify the whole image as one face, no detection")
    p.add_argument("--min-face-size", type=int, default=None,
                   help="smallest face searched, in pixels (default: 48 or a tenth of the shorter side of the "
                        "image, whichever is larger); detection runs on the frame reduced by 24 / this")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: for videos of 100 frames or more)")

    p = sub.add_parser("export", help="write a FERNet as ONNX (plain graph, BatchNorm folded, dynamic batch)",
                       usage="fercuda export [CHECKPOINT] OUT.onnx [--opset N]")
    p.add_argument("paths", nargs="+", metavar="[CHECKPOINT] OUT.onnx",
                   help="the .onnx file to write, after an optional checkpoint (best.pt / last.pt or a run folder; "
                        "default: the pretrained FERNet shipped with fercuda)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")

    p = sub.add_parser("info", help="parameter count and FLOPs per 48x48 image")
    p.add_argument("--width-mult", type=float, nargs="+", default=[1.0])
    p.add_argument("--num-classes", type=int, default=7)
    p.add_argument("--image-size", type=int, default=48)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from fercuda.train import resolve_args, run

        train_argv = list(sys.argv[2:] if argv is None else argv[1:])
        run(resolve_args(train_argv))
        return 0
    return {"eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "info": cmd_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
