"""python -m fercuda.compare: its sections build rows and its table prints them (tiny inputs);
its timer, environment record and row keeping."""

import json
from pathlib import Path

import torch

import fercuda
import fercuda.compare as compare
import fercuda.compare.__main__ as compare_main
from fercuda.compare import canny as compare_canny
from fercuda.compare import dwconv as compare_dwconv
from fercuda.compare import environment as compare_environment

REPO = Path(__file__).resolve().parents[1]


def test_dwconv_section_rows_and_table():
    rows = compare_dwconv.dwconv_section([(2, 3, 5, 7)], 1)
    assert len(rows) == 1 and rows[0].max_error < 1e-4 and rows[0].fercuda_ms > 0
    assert set(rows[0].peers_ms) == {"eager PyTorch", "torch.compile"}
    table = compare.format_table(rows + [compare.Row("canny", "case", "cv2", 0, 1.0, {"OpenCV": 2.0})])
    assert "max err" in table and "0 (cv2)" in table and "2.0x" in table
    assert compare_main.SECTIONS == [compare_canny.canny_section, compare_dwconv.dwconv_section]


def test_disagreeing_rows():
    ok = compare.Row("canny", "a", "cv2", 0, 1.0)
    differs = compare.Row("canny", "b", "cv2", 3, 1.0)
    close = compare.Row("dwconv_bn_relu6", "c", "float64", None, 1.0, max_error=1e-6)
    far = compare.Row("dwconv_bn_relu6", "d", "float64", None, 1.0, max_error=1e-2)
    assert compare.disagreeing([ok, differs, close, far]) == [differs, far]


def test_timer_counts_its_calls_and_respects_the_budget():
    calls = []
    times = compare.times_ms(lambda: calls.append(1), 4, warmup=2)
    assert len(calls) == 6 and len(times) == 4 and times == sorted(times) and min(times) >= 0
    calls.clear()
    compare.median_ms(lambda: (calls.append(1), torch.ones(1)), 50, budget_s=0.0)
    assert len(calls) == 2  # the warm-up call and one timed call: a spent budget still times once


def test_interleaved_timer_takes_turns():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = compare.interleaved_times_ms(calls, 4, warmup=1)
    # the warm-ups, then one call each per round, each round starting one contender later
    assert order == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")
    assert set(times) == set("abc") and all(len(t) == 4 and t == sorted(t) and min(t) >= 0 for t in times.values())


def test_network_block_shapes_follow_the_model():
    import fercuda.nn as fnn
    from fercuda.models import FERNet

    for width in (0.25, 1.0):
        shapes = compare_dwconv.network_block_shapes(width, batch=2)
        blocks = [m for m in FERNet(width_mult=width).modules() if isinstance(m, fnn.DWConvBNReLU6)]
        assert sum(shapes.values()) == len(blocks)
        assert sorted({s[1] for s in shapes}) == sorted({b.conv.in_channels for b in blocks})
        assert all(n == 2 and h <= 48 and h == w and stride in (1, 2) for n, _, h, w, stride in shapes)


def test_canny_inputs_and_reference(tmp_path):
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert compare_canny.cv2_canny(faces.numpy()).shape == (3, 48, 48)
    assert compare_canny.cv2_canny(faces[0].numpy()).shape == (48, 48)
    assert compare_canny.fer_images(1, root=tmp_path) is None
    picture, name = compare_canny.picture_1080p(faces.numpy())  # too few faces for the mosaic
    assert picture.shape == (1080, 1920) and name == "synthetic picture"


def test_default_fer2013_root(monkeypatch, tmp_path):
    from fercuda.data import default_fer2013_root

    monkeypatch.setenv("FERCUDA_FER2013", str(tmp_path))
    assert default_fer2013_root() == tmp_path
    monkeypatch.delenv("FERCUDA_FER2013")
    assert default_fer2013_root() == REPO.parent / "shared" / "data" / "fer2013"


def test_environment_record_and_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
                       "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert compare_environment.cpu_info(cpuinfo) == ("Some CPU", ["avx2", "avx512f", "avx512_bf16"])
    record = compare_environment.environment()
    json.dumps(record)
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads()
    assert len(record["load_average"]) == 3 and record["cpu_count"] >= 1
    line = compare_environment.describe(record)
    assert f"torch {torch.__version__}" in line and "load" in line
    # fercuda is loaded here: the record names its CPU kernels' path.
    assert record["fercuda_cpu_isa"] == fercuda.cpu_isa()
    assert f"fercuda CPU path {fercuda.cpu_isa()}" in line
