"""The fercuda command: train, eval, predict, info."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
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
    from fercuda.evaluation import classification_report, format_report, predict_logits
    from fercuda.plots import plot_confusion
    from fercuda.runfiles import write_json

    device = default_device(args.device)
    model, classes, path = load_model(args.checkpoint, device, fused=not args.plain)
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
    logits = predict_logits(model, data.images[idx], device)
    report = classification_report(logits.argmax(1).cpu().numpy(), data.labels[idx].numpy(), classes)
    report.update(split=args.split, checkpoint=str(path))
    print(format_report(report, f"{path} on {args.split}"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", report)
        plot_confusion(report, out / "confusion.png", args.split)
    return 0


# ---------------------------------------------------------------------------- predict
def face_detector(cascade_path=None):
    """OpenCV's bundled Haar cascade, or None where this OpenCV build lacks it (with the reason)."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        return None, f"this OpenCV build ({cv2.__version__}) has no CascadeClassifier"
    if cascade_path is None:
        base = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if not base:
            return None, f"this OpenCV build ({cv2.__version__}) ships no cv2.data.haarcascades folder"
        cascade_path = Path(base) / HAAR_CASCADE
    cascade_path = Path(cascade_path)
    if not cascade_path.exists():
        return None, f"the Haar cascade {cascade_path} does not exist"
    detector = cv2.CascadeClassifier(str(cascade_path))
    if detector.empty():
        return None, f"the Haar cascade {cascade_path} could not be loaded"
    return detector, None


class FacePredictor:
    def __init__(self, model, classes, device, detector, detector_problem, whole_image: bool):
        self.model, self.classes, self.device = model, classes, device
        self.detector, self.detector_problem, self.whole_image = detector, detector_problem, whole_image

    def faces(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        h, w = gray.shape
        whole = [(0, 0, w, h)]
        if self.whole_image:
            return whole
        is_face_crop = (h, w) == (48, 48)
        if self.detector is None:
            if is_face_crop:  # already a FER-style face: nothing to detect
                return whole
            raise RuntimeError(
                f"face detection unavailable: {self.detector_problem}. Install opencv-python(-headless) 4.x, "
                f"which bundles {HAAR_CASCADE}, pass --cascade PATH to that file, or --whole-image to "
                "classify the whole image as one face")
        found = self.detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        boxes = [tuple(int(v) for v in b) for b in found]
        if not boxes and is_face_crop:
            return whole
        return boxes

    @torch.no_grad()
    def classify(self, gray: np.ndarray, boxes) -> list[tuple[str, float]]:
        import cv2

        from fercuda.data import fer_input

        if not boxes:
            return []
        crops = np.stack([cv2.resize(gray[y:y + h, x:x + w], (48, 48), interpolation=cv2.INTER_AREA)
                          for x, y, w, h in boxes])
        x = fer_input(torch.from_numpy(crops).unsqueeze(1).to(self.device))
        prob = torch.softmax(self.model(x).float(), 1).cpu()
        conf, idx = prob.max(1)
        return [(self.classes[i], float(c)) for i, c in zip(idx.tolist(), conf.tolist())]


def annotate(frame: np.ndarray, boxes, labels) -> np.ndarray:
    import cv2

    scale = max(1, 192 // max(1, min(frame.shape[:2])))  # enlarge tiny images so the text is legible
    if scale > 1:
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    for (x, y, w, h), (name, conf) in zip(boxes, labels):
        x, y, w, h = (v * scale for v in (x, y, w, h))
        cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), (0, 255, 0), 2)
        cv2.putText(frame, f"{name} {conf:.2f}", (x + 2, max(12, y - 4) if y >= 14 else y + 14),
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


def cmd_predict(args) -> int:
    import cv2

    checkpoint, source, out = predict_paths(args)
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out}: the same file as the input; choose another name")
    device = default_device(args.device)
    model, classes, _ = load_model(checkpoint, device, fused=not args.plain)
    detector, problem = (None, "--whole-image given") if args.whole_image else face_detector(args.cascade)
    if args.cascade and detector is None:
        raise RuntimeError(f"--cascade {args.cascade}: {problem}")
    predictor = FacePredictor(model, classes, device, detector, problem, args.whole_image)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    if source.suffix.lower() not in VIDEO_EXTENSIONS:
        image = cv2.imdecode(np.fromfile(str(source), dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{source}: cannot be decoded as an image (videos need one of {sorted(VIDEO_EXTENSIONS)})")
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        boxes = predictor.faces(gray)
        labels = predictor.classify(gray, boxes)
        results.append({"frame": 0, "faces": [{"box": list(b), "label": n, "confidence": c}
                                             for b, (n, c) in zip(boxes, labels)]})
        ok, encoded = cv2.imencode(out.suffix or ".png", annotate(image, boxes, labels))
        if not ok:
            raise ValueError(f"--out {out}: OpenCV cannot write images with suffix {out.suffix!r}")
        _write_atomically(out, lambda tmp: encoded.tofile(str(tmp)))
    else:
        capture = cv2.VideoCapture(str(source))
        if not capture.isOpened():
            raise ValueError(f"{source}: OpenCV cannot open this video (not a video, or a codec this OpenCV lacks)")

        def write_video(tmp: Path) -> None:
            fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
            writer = None
            try:
                while True:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                    boxes = predictor.faces(gray)
                    labels = predictor.classify(gray, boxes)
                    annotated = annotate(frame, boxes, labels)
                    if writer is None:
                        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if out.suffix.lower() in {".mp4", ".m4v", ".mov"} else "MJPG"))
                        writer = cv2.VideoWriter(str(tmp), fourcc, fps, (annotated.shape[1], annotated.shape[0]))
                        if not writer.isOpened():
                            raise ValueError(f"--out {out}: OpenCV cannot write this video format")
                    writer.write(annotated)
                    results.append({"frame": len(results), "faces": [{"box": list(b), "label": n, "confidence": c}
                                                                     for b, (n, c) in zip(boxes, labels)]})
            finally:
                capture.release()
                if writer is not None:
                    writer.release()
            if not results:
                raise ValueError(f"{source}: no frame could be decoded")

        _write_atomically(out, write_video)
    n_faces = sum(len(r["faces"]) for r in results)
    print(f"{out}: {n_faces} face(s) in {len(results)} frame(s)")
    if n_faces == 0:
        print(f"  no face found in {source}; --whole-image classifies the whole frame as one face")
    for r in results[:1] if len(results) > 1 else results:
        for f in r["faces"]:
            print(f"  {f['box']}: {f['label']} ({f['confidence']:.2f})")
    if args.json:
        json_out = Path(args.json)
        _write_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
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
    p.add_argument("--json", default=None, help="also write the predictions as JSON")
    p.add_argument("--cascade", default=None, help=f"path to {HAAR_CASCADE} (default: OpenCV's bundled one)")
    p.add_argument("--whole-image", action="store_true", help="classify the whole image as one face, no detection")

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
    return {"eval": cmd_eval, "predict": cmd_predict, "info": cmd_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
