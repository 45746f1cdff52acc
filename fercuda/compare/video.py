"""Synthetic test videos for `fercuda predict`: real 48x48 face images (FER2013's, for instance)
enlarged and pasted on a textured background, drifting slowly from frame to frame, so that a
face detector has faces to find. The tests and benchmarks/bench_predict_video.py write them; no
video file is kept in the repository."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def synthetic_video(path, faces, size=(640, 480), frames=60, fps=30.0, n_faces=2, face_px=None, seed=0):
    """Write a video of `frames` frames of `size` (width, height) to `path` (.avi: MJPG, .mp4:
    mp4v) showing `n_faces` of the uint8 48x48 `faces` (grayscale arrays), each enlarged to
    face_px pixels (default: a quarter of the height) and drifting by a few pixels a frame.
    Returns the faces' boxes (x, y, w, h) per frame."""
    import cv2

    w, h = size
    face_px = face_px or h // 4
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    background = (60 + 80 * xx / w + 40 * yy / h + rng.normal(0, 6, (h, w))).clip(0, 255).astype(np.uint8)
    background = cv2.cvtColor(cv2.GaussianBlur(background, (5, 5), 0), cv2.COLOR_GRAY2BGR)
    tiles = [cv2.cvtColor(cv2.resize(f, (face_px, face_px), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)
             for f in faces[:n_faces]]
    if len(tiles) < n_faces:
        raise ValueError(f"synthetic_video: {n_faces} faces asked for, {len(faces)} given")
    # Home positions spread across the frame, each face drifting on its own small circle.
    homes = [(int((i + 0.5) * w / n_faces - face_px / 2), int(h / 2 - face_px / 2 + (i % 2) * h / 8 - h / 16))
             for i in range(n_faces)]
    radius = max(2, face_px // 12)
    path = Path(path)
    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if path.suffix.lower() == ".mp4" else "MJPG"))
    writer = cv2.VideoWriter(str(path), fourcc, fps, (w, h))
    if not writer.isOpened():
        raise ValueError(f"synthetic_video: OpenCV cannot write {path}")
    boxes = []
    try:
        for t in range(frames):
            frame = background.copy()
            frame_boxes = []
            for i, (tile, (hx, hy)) in enumerate(zip(tiles, homes)):
                a = 2 * math.pi * (t / 90 + i / n_faces)
                x = int(np.clip(hx + radius * math.cos(a), 0, w - face_px))
                y = int(np.clip(hy + radius * math.sin(a), 0, h - face_px))
                frame[y:y + face_px, x:x + face_px] = tile
                frame_boxes.append((x, y, face_px, face_px))
            writer.write(frame)
            boxes.append(frame_boxes)
    finally:
        writer.release()
    return boxes


def synthetic_photo(path, faces, size=(640, 480), face_px=160, seed=0):
    """Write a BGR picture of `size` with the uint8 48x48 `faces` enlarged to face_px and pasted
    side by side on the textured background of synthetic_video; returns their boxes."""
    import cv2

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = (60 + 80 * xx / w + 40 * yy / h + rng.normal(0, 6, (h, w))).clip(0, 255).astype(np.uint8)
    image = cv2.GaussianBlur(image, (5, 5), 0)
    boxes = []
    gap = (w - len(faces) * face_px) // (len(faces) + 1)
    for i, face in enumerate(faces):
        x, y = gap + i * (face_px + gap), (h - face_px) // 2
        image[y:y + face_px, x:x + face_px] = cv2.resize(face, (face_px, face_px), interpolation=cv2.INTER_CUBIC)
        boxes.append((x, y, face_px, face_px))
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)):
        raise ValueError(f"synthetic_photo: OpenCV cannot write {path}")
    return boxes
