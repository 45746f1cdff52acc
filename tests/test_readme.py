"""The README's examples, run as written: every Python block, and the `fercuda` commands that need
no data set or run folder, in a folder holding the photo.jpg and clip.mp4 they name."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import cv2
import pytest

from fercuda import cli
from fercuda.compare.video import synthetic_photo, synthetic_video

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(kind):
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == kind]


def _is_recognition(code):
    return "fer.detect_emotions" in code or "fer.video" in code


def test_readme_python_blocks_without_pictures_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _blocks("python") if not _is_recognition(b)]
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


@pytest.fixture
def pictures(fer2013_dir, tmp_path, monkeypatch):
    """photo.jpg: the README's two PrivateTest faces; clip.mp4: a short video of three faces."""
    faces = [cv2.imread(str(sorted((fer2013_dir / "test" / c).glob("PrivateTest_*"))[0]), cv2.IMREAD_GRAYSCALE)
             for c in ("happy", "surprise", "neutral")]
    synthetic_photo(tmp_path / "photo.jpg", faces[:2])
    synthetic_video(tmp_path / "clip.mp4", faces, frames=10, n_faces=3)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_recognition_example_prints_its_output(pictures):
    blocks = [b for b in _blocks("python") if _is_recognition(b)]
    assert len(blocks) == 2
    namespace = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(code, str(README), "exec"), namespace)
    printed = out.getvalue().splitlines()
    # The README's output block follows the first example: boxes and emotions as printed, the
    # probabilities within 0.02 (engines round differently in their last bits).
    fences = FENCE.findall(README.read_text())
    following = fences[fences.index(("python", blocks[0])) + 1]
    assert following[0] == ""  # the output block, no language
    expected = following[1].strip().splitlines()
    assert len(printed) == len(expected) + 10  # then one line per frame of the video
    for got, want in zip(printed, expected):
        *g_words, g_p = got.rsplit(" ", 1)
        *w_words, w_p = want.rsplit(" ", 1)
        assert g_words == w_words and abs(float(g_p) - float(w_p)) <= 0.02, (got, want)
    assert all(line.startswith(str(i) + " ") for i, line in enumerate(printed[len(expected):]))


def _commands(*starts):
    commands = [line.split("#")[0].strip() for body in _blocks("bash") for line in body.splitlines()]
    return [c for c in dict.fromkeys(commands) if c.startswith(starts)]


def test_readme_commands_run(pictures, capsys):
    runnable = _commands("fercuda predict photo.jpg", "fercuda predict clip.mp4", "fercuda info")
    assert len(runnable) == 3, runnable
    for command in runnable:
        assert cli.main(shlex.split(command)[1:]) == 0, command
    for name in ("photo_fercuda.jpg", "out/clip.mp4", "out/clip.json", "out/clip.csv"):
        assert (pictures / name).is_file(), name


def test_readme_export_command_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fercuda[engines]')")
    monkeypatch.chdir(tmp_path)
    (command,) = _commands("fercuda export model.onnx")
    assert cli.main(shlex.split(command)[1:]) == 0
    assert (tmp_path / "model.onnx").is_file()
