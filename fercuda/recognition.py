"""Facial-expression recognition: find the faces of an image or a video, and score each emotion.

    from fercuda.recognition import FER

    fer = FER()                                     # the shipped FERNet, OpenCV's Haar cascade
    for face in fer.detect_emotions("photo.jpg"):   # a path, or a BGR / grayscale uint8 array
        print(face["box"], face["dominant_emotion"], face["emotions"])
    for frame in fer.video("clip.mp4"):             # anything cv2.VideoCapture opens; 0: a camera
        print(frame["frame"], frame["time"], frame["faces"])

Each face is a dict: "box" (x, y, w, h) in the image's pixels, "emotions" {class: probability}
in the model's class order (they sum to 1), "dominant_emotion" the most probable class.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
DETECTORS = ("haar", "whole")
# Test-time augmentation: the views averaged per face (softmax probabilities averaged).
TTA_MODES = ("none", "flip", "flip+shift")
TTA_SHIFT = 2  # pixels, for "flip+shift"
DEFAULT_TTA = "flip"


class NoFaceError(ValueError):
    """An image in which no face was found, where one was required."""


def tta_views(faces: torch.Tensor, tta: str) -> torch.Tensor:
    """uint8 faces (N, 1, H, W) -> their views (V * N, 1, H, W), view-major: "none" the faces,
    "flip" also their mirror images, "flip+shift" each of those also shifted by TTA_SHIFT pixels
    left, right, up and down (edge pixels repeated), 10 views."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    views = [faces]
    if tta in ("flip", "flip+shift"):
        views.append(faces.flip(-1))
    if tta == "flip+shift":
        s = TTA_SHIFT
        h, w = faces.shape[-2:]
        for v in list(views):
            p = torch.nn.functional.pad(v.float(), (s, s, s, s), mode="replicate").to(torch.uint8)
            views += [p[..., s:s + h, 0:w], p[..., s:s + h, 2 * s:2 * s + w],
                      p[..., 0:h, s:s + w], p[..., 2 * s:2 * s + h, s:s + w]]
    return torch.cat(views) if len(views) > 1 else faces


def n_views(tta: str) -> int:
    return {"none": 1, "flip": 2, "flip+shift": 10}[tta]


def face_probabilities(engine, faces: torch.Tensor, tta: str = DEFAULT_TTA, batch_size: int = 64,
                       single_view: bool = False):
    """Softmax probabilities (N, classes) of uint8 48x48 faces (N, 1, 48, 48): each batch of
    faces and all their test-time views in one forward of the engine, probabilities averaged
    over the views. single_view: also return the probabilities of the faces alone (the first view)."""
    from fercuda.data import fer_input

    v = n_views(tta)
    out, first = [], []
    for i in range(0, faces.shape[0], batch_size):
        chunk = faces[i:i + batch_size]
        x = fer_input(tta_views(chunk.cpu().contiguous(), tta))
        prob = torch.softmax(engine(x).float(), 1).view(v, chunk.shape[0], -1)
        out.append(prob.mean(0))
        first.append(prob[0])
    prob = torch.cat(out) if out else torch.zeros(0, 0)
    return (prob, torch.cat(first) if first else prob) if single_view else prob


def haar_detector(cascade=None):
    """OpenCV's bundled Haar cascade (or the XML file `cascade`), or (None, why) where it is missing."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        return None, f"this OpenCV build ({cv2.__version__}) has no CascadeClassifier"
    if cascade is None:
        base = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if not base:
            return None, f"this OpenCV build ({cv2.__version__}) ships no cv2.data.haarcascades folder"
        cascade = Path(base) / HAAR_CASCADE
    cascade = Path(cascade)
    if not cascade.exists():
        return None, f"the Haar cascade {cascade} does not exist"
    detector = cv2.CascadeClassifier(str(cascade))
    if detector.empty():
        return None, f"the Haar cascade {cascade} could not be loaded"
    return detector, None


def read_image(source, arg: str = "img") -> np.ndarray:
    """A uint8 BGR (H, W, 3) or grayscale (H, W) array from a path or an array (BGRA: alpha dropped)."""
    import cv2

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
        image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"image {path} cannot be decoded as an image")
        return image
    if not isinstance(source, np.ndarray):
        raise TypeError(f"argument '{arg}' must be an image path or a uint8 numpy array (H, W) or (H, W, 3), "
                        f"got {type(source).__name__}")
    if source.dtype != np.uint8 or not (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))):
        raise ValueError(f"argument '{arg}' must be a uint8 array (H, W) grayscale or (H, W, 3) BGR, "
                         f"got {source.dtype} {source.shape}")
    if source.shape[0] == 0 or source.shape[1] == 0:
        raise ValueError(f"argument '{arg}' is an empty image of shape {source.shape}")
    if source.ndim == 3 and source.shape[2] == 4:
        source = source[..., :3]
    if source.ndim == 3 and source.shape[2] == 1:
        source = source[..., 0]
    return source


def to_gray(image: np.ndarray) -> np.ndarray:
    import cv2

    return image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY)


def crop_faces(gray: np.ndarray, boxes) -> np.ndarray:
    """uint8 (N, 48, 48) crops of the boxes, resized with cv2.INTER_AREA (boxes clipped to the image)."""
    import cv2

    h, w = gray.shape
    crops = []
    for x, y, bw, bh in boxes:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(w, x + bw), min(h, y + bh)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {(x, y, bw, bh)} lies outside the {w}x{h} image")
        crops.append(cv2.resize(gray[y0:y1, x0:x1], (48, 48), interpolation=cv2.INTER_AREA))
    return np.stack(crops) if crops else np.zeros((0, 48, 48), np.uint8)


class FER:
    """Face finding and emotion scoring, for images and videos.

    model: None (the FERNet shipped with fercuda), a run folder of fercuda train or a checkpoint
    file, or a FERNet whose `metadata["classes"]` names its outputs.
    detector: "haar" (OpenCV's bundled frontal-face Haar cascade) or "whole" (each image is one
    face); cascade: another Haar cascade XML file. Boxes the caller has already are passed to
    detect_emotions(img, boxes=...). min_face_size: the smallest face searched, in pixels
    (default: 48 or a tenth of the image's shorter side, whichever is larger); the cascade (24x24
    windows) runs on the image reduced by 24 / min_face_size.
    device: "cpu", "cuda", ... (default: CUDA where available). engine: "auto", "torch",
    "onnxruntime" or "openvino" (fercuda.engines). tta: "flip" (the face and its mirror image,
    the default), "none", or "flip+shift" (10 views).
    """

    def __init__(self, model=None, *, detector: str = "haar", cascade=None, min_face_size: int | None = None,
                 device=None, engine: str = "auto", tta: str = DEFAULT_TTA, batch_size: int = 64):
        from fercuda.engines import make_engine
        from fercuda.models import FERNet, load

        if detector not in DETECTORS:
            raise ValueError(f"argument 'detector' must be one of {DETECTORS}, got {detector!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"argument 'tta' must be one of {TTA_MODES}, got {tta!r}")
        if min_face_size is not None and not (isinstance(min_face_size, int) and min_face_size >= 24):
            raise ValueError(f"argument 'min_face_size' must be None or an int >= 24 (pixels), got {min_face_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model, FERNet):
            self.model = model.eval()
            self.classes = list(getattr(model, "metadata", {}).get("classes") or range(model.num_classes))
        else:
            self.model = load(model, fused=True, device="cpu")
            self.classes = list(self.model.metadata["classes"])
        self.engine = make_engine(engine, self.model, self.device)
        self.engine_name = self.engine.name
        self.tta, self.batch_size, self.min_face_size = tta, batch_size, min_face_size
        self.detector_name = detector
        self.detector, self.detector_problem = (None, "detector='whole'") if detector == "whole" else haar_detector(cascade)
        if cascade is not None and self.detector is None:
            raise FileNotFoundError(f"argument 'cascade': {self.detector_problem}")

    # ------------------------------------------------------------------ faces
    def find_faces(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (x, y, w, h) in a grayscale image: the whole image with detector="whole", and
        for a 48x48 image (a face crop, as FER2013 holds them)."""
        import cv2

        h, w = gray.shape
        whole = [(0, 0, w, h)]
        if self.detector_name == "whole" or (h, w) == (48, 48):
            return whole
        if self.detector is None:
            raise RuntimeError(
                f"face detection unavailable: {self.detector_problem}. Install opencv-python(-headless) 4.x, "
                f"which bundles {HAAR_CASCADE}, pass cascade=PATH to that file, or detector='whole' to "
                "classify the whole image as one face")
        scale = min(1.0, 24.0 / self.face_size_for(gray.shape))
        small = gray
        if scale < 1.0 and min(h, w) * scale >= 48:
            small = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        else:
            scale = 1.0
        found = self.detector.detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        boxes = [tuple(int(round(v / scale)) for v in b) for b in found]
        # Sorted left to right, then top to bottom: the cascade's own order varies from run to run.
        boxes = sorted((x, y, min(bw, w - x), min(bh, h - y)) for x, y, bw, bh in boxes)
        return boxes

    def face_size_for(self, shape) -> int:
        """The smallest face searched in an image of this (H, W): min_face_size, or by default
        48 pixels or a tenth of the shorter side, whichever is larger."""
        return self.min_face_size or max(48, min(shape[:2]) // 10)

    # ------------------------------------------------------------------ scoring
    def classify(self, crops: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) of uint8 48x48 face crops (N, 48, 48), in one batch."""
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        faces = torch.from_numpy(np.ascontiguousarray(crops)).unsqueeze(1)
        return face_probabilities(self.engine, faces, self.tta, self.batch_size).numpy()

    def _faces(self, boxes, probs) -> list[dict]:
        out = []
        for box, p in zip(boxes, probs):
            emotions = {str(c): float(v) for c, v in zip(self.classes, p)}
            out.append({"box": tuple(int(v) for v in box), "emotions": emotions,
                        "dominant_emotion": str(self.classes[int(np.argmax(p))])})
        return out

    def detect_emotions(self, img, boxes=None):
        """The faces of an image: a path, a BGR (H, W, 3) or grayscale (H, W) uint8 array, or a
        list of them (then a list per image, all faces classified in one batch). boxes: the
        faces' (x, y, w, h) where the caller has found them (a list per image for a list)."""
        if isinstance(img, (list, tuple)):
            if boxes is not None and len(boxes) != len(img):
                raise ValueError(f"argument 'boxes' must hold one list of boxes per image: {len(img)} images, "
                                 f"{len(boxes)} lists")
            grays = [to_gray(read_image(im, f"img[{i}]")) for i, im in enumerate(img)]
            all_boxes = [self.find_faces(g) if boxes is None else _check_boxes(boxes[i], f"boxes[{i}]")
                         for i, g in enumerate(grays)]
            crops = [crop_faces(g, b) for g, b in zip(grays, all_boxes)]
            probs = self.classify(np.concatenate(crops)) if crops else np.zeros((0, len(self.classes)))
            out, k = [], 0
            for b in all_boxes:
                out.append(self._faces(b, probs[k:k + len(b)]))
                k += len(b)
            return out
        gray = to_gray(read_image(img))
        boxes = self.find_faces(gray) if boxes is None else _check_boxes(boxes, "boxes")
        return self._faces(boxes, self.classify(crop_faces(gray, boxes)))

    __call__ = detect_emotions

    # ------------------------------------------------------------------ video
    def video(self, source, frames: bool = False, prefetch: int = 8):
        """Per-frame results of a video file, stream or camera (anything cv2.VideoCapture opens;
        an int is a camera index): dicts {"frame": index, "time": seconds, "faces": [...]}, or
        (result, BGR frame) pairs with frames=True. time is index / the stream's frame rate, or the
        seconds since the first frame where the stream states no rate. A thread decodes the
        frames and finds their faces ahead of the scoring, `prefetch` frames at most."""
        capture = open_video(source)
        fps = capture.get(_cv2().CAP_PROP_FPS) or 0.0
        return _video_results(self, capture, fps, frames, prefetch)


def _check_boxes(boxes, arg):
    try:
        out = [tuple(int(v) for v in b) for b in boxes]
    except (TypeError, ValueError):
        raise TypeError(f"argument '{arg}' must be a list of (x, y, w, h) boxes, got {boxes!r}") from None
    if any(len(b) != 4 or b[2] <= 0 or b[3] <= 0 for b in out):
        raise ValueError(f"argument '{arg}' must be a list of (x, y, w, h) boxes with w, h > 0, got {boxes!r}")
    return out


def _cv2():
    import cv2

    return cv2


def open_video(source):
    """cv2.VideoCapture of a path, URL or camera index; a clear error where it cannot be opened."""
    cv2 = _cv2()
    if isinstance(source, (str, Path)) and not str(source).isdigit() and "://" not in str(source):
        if not Path(source).exists():
            raise FileNotFoundError(f"video {source} does not exist")
    capture = cv2.VideoCapture(int(source) if str(source).isdigit() else str(source))
    if not capture.isOpened():
        raise ValueError(f"video {source}: OpenCV cannot open it (not a video, or a codec this OpenCV lacks)")
    return capture


def _frame_reader(capture, prefetch, prepare=None):
    """(frame, prepare(frame)) for the frames of a capture, decoded (and prepared) by a thread
    ahead of their use: cv2 releases the GIL while it decodes and while it runs the cascade, so
    decoding and face finding overlap the scoring of earlier frames."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def run():
        try:
            while not stop.is_set():
                ok, frame = capture.read()
                if not ok:
                    q.put(None)
                    return
                q.put((frame, prepare(frame) if prepare else None))
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)
        capture.release()


def _video_results(fer: FER, capture, fps, frames, prefetch):
    def prepare(frame):
        gray = to_gray(frame)
        boxes = fer.find_faces(gray)
        return boxes, crop_faces(gray, boxes)

    start = None
    for index, (frame, (boxes, crops)) in enumerate(_frame_reader(capture, prefetch, prepare)):
        if start is None:
            start = time.monotonic()
        faces = fer._faces(boxes, fer.classify(crops))
        t = index / fps if fps > 0 else time.monotonic() - start
        result = {"frame": index, "time": round(t, 6), "faces": faces}
        yield (result, frame) if frames else result


def analyze(img, **options):
    """One-call form: FER(**options).detect_emotions(img)."""
    return FER(**options).detect_emotions(img)
