"""Loaders for FER2013 (Kaggle CSV, ICML CSV, image folders) and CK+48, with a decoded cache.

Every loader returns a FaceData: uint8 images (N, 1, 48, 48), int64 labels, a split name per
image (FER2013's "Training" / "PublicTest" / "PrivateTest") and a subject id per image (CK+).
Bad input is either an error naming the file or row (on_error="raise") or skipped and counted
(on_error="skip"); a label is never guessed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 48
# The label order of fer2013.csv (and icml_face_data.csv).
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# Folder names seen in the wild for each FER2013 class, mapped explicitly to the CSV order.
FER_ALIASES = {
    "angry": 0, "anger": 0, "an": 0,
    "disgust": 1, "disgusted": 1, "di": 1,
    "fear": 2, "fearful": 2, "scared": 2, "afraid": 2, "sc": 2,
    "happy": 3, "happiness": 3, "ha": 3,
    "sad": 4, "sadness": 4, "sa": 4,
    "surprise": 5, "surprised": 5, "su": 5,
    "neutral": 6, "ne": 6,
}
FER_SPLITS = ("Training", "PublicTest", "PrivateTest")
# CK+48's folders, in this fixed label order; "neutral" appears in some copies.
CKPLUS_CLASSES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise", "neutral")
CKPLUS_ALIASES = {"anger": "anger", "angry": "anger", "contempt": "contempt", "disgust": "disgust",
                  "fear": "fear", "happy": "happy", "happiness": "happy", "sadness": "sadness",
                  "sad": "sadness", "surprise": "surprise", "neutral": "neutral"}
CKPLUS_NAME = re.compile(r"^(S\d+)_(\d+)_(\d+)")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff"}
FORMATS = ("auto", "csv", "folder", "ckplus")
ON_ERROR = ("raise", "skip")
CACHE_VERSION = 1


class DataError(ValueError):
    """A malformed row, an unreadable image, an unknown class: the message names where."""


@dataclass
class FaceData:
    images: torch.Tensor  # uint8 (N, 1, 48, 48)
    labels: torch.Tensor  # int64 (N,)
    splits: np.ndarray  # str (N,): "Training", "PublicTest", "PrivateTest", or "" where none
    subjects: np.ndarray  # str (N,): CK+ subject ids ("S005"), "" where none
    classes: tuple[str, ...]
    source: str
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # one line per skipped row or file

    def __len__(self) -> int:
        return self.labels.shape[0]

    def indices(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.flatnonzero(self.splits == split))


class _Collector:
    """Gathers decoded faces, and either raises on a problem or counts it."""

    def __init__(self, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        self.splits: list[str] = []
        self.subjects: list[str] = []
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(message)
        self.problems.append(message)

    def add(self, image: np.ndarray, label: int, split: str = "", subject: str = "") -> None:
        self.images.append(image)
        self.labels.append(label)
        self.splits.append(split)
        self.subjects.append(subject)

    def result(self, classes, source) -> FaceData:
        n = len(self.labels)
        images = np.stack(self.images) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        return FaceData(
            images=torch.from_numpy(images.reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE).copy()),
            labels=torch.tensor(self.labels, dtype=torch.int64),
            splits=np.array(self.splits, dtype=str) if n else np.zeros(0, dtype="<U1"),
            subjects=np.array(self.subjects, dtype=str) if n else np.zeros(0, dtype="<U1"),
            classes=tuple(classes),
            source=str(source),
            skipped=len(self.problems),
            problems=self.problems,
        )


# ---------------------------------------------------------------------------- CSV
def _decode_csv(path: Path, on_error: str) -> FaceData:
    out = _Collector(on_error)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header with emotion and pixels columns") from None
        # icml_face_data.csv spells its columns "emotion", " Usage", " pixels".
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        if "emotion" not in columns or "pixels" not in columns:
            raise DataError(
                f"{path}: header must name the columns emotion and pixels (and optionally Usage), got {header}"
            )
        i_label, i_pixels, i_usage = columns["emotion"], columns["pixels"], columns.get("usage")
        width = len(header)
        for row_number, row in enumerate(reader, start=2):  # line 1 is the header
            where = f"{path}: row {row_number}"
            if not row:
                continue
            if len(row) != width:
                out.problem(f"{where}: expected {width} fields, got {len(row)}")
                continue
            try:
                label = int(row[i_label].strip())
            except ValueError:
                out.problem(f"{where}: emotion {row[i_label]!r} is not an integer")
                continue
            if not 0 <= label < len(FER_CLASSES):
                out.problem(f"{where}: emotion {label} is out of range 0..{len(FER_CLASSES) - 1}")
                continue
            split = row[i_usage].strip() if i_usage is not None else "Training"
            if split not in FER_SPLITS:
                out.problem(f"{where}: Usage {split!r} is not one of {FER_SPLITS}")
                continue
            try:
                pixels = np.array(row[i_pixels].split(), dtype=np.int64)
            except ValueError:
                out.problem(f"{where}: pixels hold a non-integer value")
                continue
            if pixels.size != IMAGE_SIZE * IMAGE_SIZE:
                out.problem(f"{where}: expected {IMAGE_SIZE * IMAGE_SIZE} pixels, got {pixels.size}")
                continue
            if pixels.min() < 0 or pixels.max() > 255:
                out.problem(f"{where}: pixel values must lie in 0..255, got {pixels.min()}..{pixels.max()}")
                continue
            out.add(pixels.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE), label, split)
    return out.result(FER_CLASSES, path)


# ---------------------------------------------------------------------------- images
def _read_gray(path: Path, out: _Collector) -> np.ndarray | None:
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None:
        out.problem(f"{path}: cannot be decoded as an image")
        return None
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
        out.problem(f"{path}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} image, got {image.shape[1]}x{image.shape[0]}")
        return None
    return image


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _fer_split_of(path: Path, top: str) -> str:
    """The official split from FER2013's file-name prefix; without one, from the top folder
    (train/ -> Training, val/ -> PublicTest, test/ -> Test)."""
    for split in FER_SPLITS:
        if path.name.startswith(split + "_"):
            return split
    return {"train": "Training", "val": "PublicTest", "validation": "PublicTest"}.get(top, "Test")


def _decode_folder(root: Path, on_error: str) -> FaceData:
    out = _Collector(on_error)
    tops = [t for t in ("train", "test", "val", "validation") if (root / t).is_dir()]
    if not tops:
        raise DataError(f"{root}: expected sub-folders train/ and/or test/ holding one folder per class")
    for top in tops:
        for class_dir in sorted(p for p in (root / top).iterdir() if p.is_dir()):
            label = FER_ALIASES.get(class_dir.name.lower())
            if label is None:
                out.problem(
                    f"{class_dir}: unknown class folder {class_dir.name!r}; known names: {sorted(FER_ALIASES)}"
                )
                continue
            for path in _image_files(class_dir):
                image = _read_gray(path, out)
                if image is not None:
                    out.add(image, label, _fer_split_of(path, top))
    return out.result(FER_CLASSES, root)


def _decode_ckplus(root: Path, on_error: str) -> FaceData:
    out = _Collector(on_error)
    class_dirs = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        name = CKPLUS_ALIASES.get(class_dir.name.lower())
        if name is None:
            out.problem(f"{class_dir}: unknown CK+ class folder; known names: {sorted(CKPLUS_ALIASES)}")
            continue
        class_dirs[class_dir] = name
    # Labels follow CKPLUS_CLASSES restricted to the classes present (7 for CK+48).
    classes = tuple(c for c in CKPLUS_CLASSES if c in set(class_dirs.values()))
    for class_dir, name in class_dirs.items():
        for path in _image_files(class_dir):
            match = CKPLUS_NAME.match(path.name)
            if match is None:
                out.problem(f"{path}: name does not start with S<subject>_<sequence>_<frame>")
                continue
            image = _read_gray(path, out)
            if image is not None:
                out.add(image, classes.index(name), "", match.group(1))
    return out.result(classes, root)


# ---------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("FERCUDA_CACHE", Path.home() / ".cache" / "fercuda"))


def _source_signature(path: Path) -> list:
    """What the cache key depends on: every source file's path, size and mtime."""
    if path.is_file():
        st = path.stat()
        return [[str(path), st.st_size, st.st_mtime_ns]]
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            entries.append([os.path.relpath(os.path.join(dirpath, name), path), st.st_size, st.st_mtime_ns])
    return entries


def _cache_file(path: Path, fmt: str, on_error: str, cache_dir: Path) -> Path:
    key = json.dumps([CACHE_VERSION, str(path), fmt, on_error, _source_signature(path)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir / f"{path.name}-{fmt}-{digest}.npz"


def _save_cache(data: FaceData, file: Path) -> None:
    from fercuda.runfiles import atomic_write

    file.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a concurrent reader sees the old file or the whole new one. keep_suffix: np.savez
    # appends .npz to a name that lacks it.
    atomic_write(file, lambda tmp: np.savez(
        tmp, images=data.images.numpy(), labels=data.labels.numpy(), splits=data.splits,
        subjects=data.subjects, classes=np.array(data.classes), source=np.array(data.source),
        problems=np.array(data.problems, dtype=str),
    ), keep_suffix=True)


def _load_cache(file: Path) -> FaceData:
    with np.load(file) as z:
        problems = [str(p) for p in z["problems"]]
        return FaceData(
            images=torch.from_numpy(z["images"]), labels=torch.from_numpy(z["labels"]),
            splits=z["splits"], subjects=z["subjects"], classes=tuple(str(c) for c in z["classes"]),
            source=str(z["source"]), skipped=len(problems), problems=problems,
        )


# ---------------------------------------------------------------------------- entry point
def detect_format(path: Path) -> str:
    if path.is_file():
        return "csv"
    if path.is_dir():
        if (path / "train").is_dir() or (path / "test").is_dir():
            return "folder"
        names = {p.name.lower() for p in path.iterdir() if p.is_dir()}
        if names and names <= set(CKPLUS_ALIASES):
            return "ckplus"
        raise DataError(
            f"{path}: cannot tell its format; expected a CSV file, train/ and test/ folders, or "
            "CK+ class folders (anger, contempt, ...); pass --format"
        )
    raise FileNotFoundError(f"data path {path} does not exist")


_DECODERS = {"csv": _decode_csv, "folder": _decode_folder, "ckplus": _decode_ckplus}


def load_faces(path, format: str = "auto", on_error: str = "raise", cache_dir=None, cache: bool = True) -> FaceData:
    """Load FER2013 (CSV or folders) or CK+48 as uint8 (N, 1, 48, 48) faces.

    The decoded result is cached under cache_dir (default $FERCUDA_CACHE or ~/.cache/fercuda),
    keyed by the source's path, sizes and mtimes, so the next load skips decoding.
    """
    path = Path(path).expanduser().resolve()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "csv" and not path.is_file():
        raise DataError(f"{path}: format csv needs a CSV file, got a folder")
    if fmt != "csv" and not path.is_dir():
        raise DataError(f"{path}: format {fmt} needs a folder, got a file")
    file = _cache_file(path, fmt, on_error, Path(cache_dir) if cache_dir else default_cache_dir()) if cache else None
    if file is not None and file.exists():
        try:
            return _load_cache(file)
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            print(f"fercuda: ignoring unreadable cache {file}: {e}", file=sys.stderr)
    data = _DECODERS[fmt](path, on_error)
    if len(data) == 0:
        raise DataError(f"{path}: no usable images found ({data.skipped} skipped)")
    if file is not None:
        try:
            _save_cache(data, file)
        except OSError as e:
            print(f"fercuda: could not write cache {file}: {e}", file=sys.stderr)
    return data


# ---------------------------------------------------------------------------- folds
def kfold_assignments(n: int, k: int, seed: int = 0, groups=None, labels=None) -> np.ndarray:
    """Fold index (0..k-1) per sample. With groups (CK+ subjects), every group lies in one fold,
    groups dealt largest first to the emptiest fold; otherwise folds are stratified by label."""
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    rng = np.random.default_rng(seed)
    folds = np.empty(n, dtype=np.int64)
    if groups is not None and len(groups) and any(g != "" for g in groups):
        groups = np.asarray(groups)
        names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        if len(names) < k:
            raise ValueError(f"{k} folds need at least {k} subjects, got {len(names)}")
        order = rng.permutation(len(names))
        order = order[np.argsort(-counts[order], kind="stable")]
        sizes = np.zeros(k, dtype=np.int64)
        group_fold = np.empty(len(names), dtype=np.int64)
        for g in order:
            f = int(np.argmin(sizes))
            group_fold[g] = f
            sizes[f] += counts[g]
        return group_fold[inverse]
    labels = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        offset = rng.integers(k)
        folds[idx] = (np.arange(len(idx)) + offset) % k
    return folds
