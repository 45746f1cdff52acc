"""`fercuda predict` on a video: where the time goes, and frames/s end to end.

    python -m pytest benchmarks/bench_predict_video.py -s --benchmark-disable

The video is generated (fercuda.compare.video.synthetic_video): FER2013 PrivateTest faces, or
random-texture faces where FER2013 is absent, enlarged to a quarter of the frame height and drifting
on a textured background, FERCUDA_BENCH_FRAMES frames (default 150) at 640x480 and 1280x720, with
FERCUDA_BENCH_FACES faces (default 3), mp4v. test_stages times each stage alone over the decoded
frames (decode, grayscale + detection on the reduced frame, crops, scoring in each engine with the
default test-time views, annotation, encoding); test_end_to_end runs `fercuda predict` itself (the
default engine and views; model loading excluded) and reports frames/s, decoding and writing
included.
"""

import os
import time

import cv2
import numpy as np
import pytest

from fercuda.compare import emit
from fercuda.compare.video import synthetic_video
from fercuda.data import default_fer2013_root

FRAMES = int(os.environ.get("FERCUDA_BENCH_FRAMES", "150"))
N_FACES = int(os.environ.get("FERCUDA_BENCH_FACES", "3"))
SIZES = [(640, 480), (1280, 720)]


def _faces():
    root = default_fer2013_root() / "test"
    picks = [sorted((root / c).glob("PrivateTest_*")) for c in ("happy", "surprise", "neutral", "sad")]
    if all(picks):
        return [cv2.imread(str(p[0]), cv2.IMREAD_GRAYSCALE) for p in picks]
    rng = np.random.default_rng(0)
    return [cv2.GaussianBlur(rng.integers(0, 256, (48, 48), dtype=np.uint8), (5, 5), 0) for _ in range(4)]


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def video(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / f"faces_{request.param[0]}x{request.param[1]}.mp4"
    synthetic_video(path, _faces(), size=request.param, frames=FRAMES, n_faces=N_FACES)
    return path, request.param


def test_stages(benchmark, video):
    from fercuda.cli import annotate
    from fercuda.engines import installed_engines
    from fercuda.recognition import FER, crop_faces, to_gray

    path, (w, h) = video
    capture = cv2.VideoCapture(str(path))
    frames = []
    t = time.perf_counter()
    while (got := capture.read())[0]:
        frames.append(got[1])
    stages = {"decode": (time.perf_counter() - t) / len(frames)}
    fer = FER(device="cpu", engine="torch")
    t = time.perf_counter()
    grays = [to_gray(f) for f in frames]
    boxes = [fer.find_faces(g) for g in grays]
    stages["gray + detect"] = (time.perf_counter() - t) / len(frames)
    t = time.perf_counter()
    crops = [crop_faces(g, b) for g, b in zip(grays, boxes)]
    stages["crop"] = (time.perf_counter() - t) / len(frames)
    for engine in installed_engines():
        scorer = FER(device="cpu", engine=engine)
        scorer.classify(crops[0])
        t = time.perf_counter()
        probs = [scorer.classify(c) for c in crops]
        stages[f"score ({engine}, tta {scorer.tta})"] = (time.perf_counter() - t) / len(frames)
    results = [fer._faces(b, p) for b, p in zip(boxes, probs)]
    t = time.perf_counter()
    annotated = [annotate(f, r) for f, r in zip(frames, results)]
    stages["annotate"] = (time.perf_counter() - t) / len(frames)
    writer = cv2.VideoWriter(str(path.with_name("encoded.mp4")), cv2.VideoWriter_fourcc(*"mp4v"), 30, (w, h))
    t = time.perf_counter()
    for a in annotated:
        writer.write(a)
    writer.release()
    stages["encode"] = (time.perf_counter() - t) / len(frames)
    found = sum(len(b) for b in boxes) / len(frames)
    for name, s in stages.items():
        emit("predict_video_stages", f"{w}x{h}-{name}", f"{w}x{h} {name:<32} {s * 1e3:7.2f} ms/frame",
             size=f"{w}x{h}", stage=name, ms_per_frame=s * 1e3, faces_per_frame=found)
    benchmark.extra_info.update(ms_per_frame={k: v * 1e3 for k, v in stages.items()}, faces_per_frame=found)
    benchmark.pedantic(lambda: None, rounds=1)


def test_end_to_end(benchmark, video, tmp_path):
    from fercuda import cli
    from fercuda.recognition import FER

    path, (w, h) = video
    fer = FER(device="cpu")  # loaded (and the ONNX graph cached) before the clock starts
    out = tmp_path / "out.mp4"
    args = cli.build_parser().parse_args(["predict", str(path), "--out", str(out), "--no-progress"])
    t = time.perf_counter()
    results = cli.predict_video(fer, path, out, progress=False)
    seconds = time.perf_counter() - t
    fps = len(results) / seconds
    found = sum(len(r["faces"]) for r in results) / len(results)
    emit("predict_video", f"{w}x{h}", f"{w}x{h}: {len(results)} frames in {seconds:.2f} s, {fps:.1f} frames/s "
         f"({fer.engine_name}, tta {fer.tta}, {found:.2f} faces/frame), decoding and writing included",
         size=f"{w}x{h}", frames=len(results), seconds=seconds, fps=fps, engine=fer.engine_name, tta=fer.tta,
         faces_per_frame=found, load_average=os.getloadavg()[0], args=vars(args)["paths"])
    benchmark.extra_info.update(fps=fps, faces_per_frame=found)
    benchmark.pedantic(lambda: None, rounds=1)
