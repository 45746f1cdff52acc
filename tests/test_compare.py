"""python -m fercuda.compare: its sections build rows and its table prints them (tiny inputs)."""

import functools

import fercuda.compare as compare
import fercuda.compare_dwconv as compare_dwconv


def test_dwconv_section_rows_and_table(monkeypatch):
    tiny = functools.partial(compare_dwconv.dwconv_section, [(2, 3, 5, 7)], 1)
    monkeypatch.setattr(compare_dwconv, "dwconv_section", tiny)
    rows = compare.dwconv_section()
    assert len(rows) == 1 and rows[0].max_error < 1e-4 and rows[0].fercuda_ms > 0
    assert set(rows[0].peers_ms) == {"eager PyTorch", "torch.compile"}
    table = compare.format_table(rows + [compare.Row("canny", "case", "cv2", 0, 1.0, {"OpenCV": 2.0})])
    assert "max err" in table and "0 (cv2)" in table and "2.0x" in table
