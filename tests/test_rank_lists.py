"""Rank-list figures: the query, its top-10 gallery images framed green (same id) / red, checked by pixel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mip_dist.eval import visualize as vis
from mip_dist.eval.protocols import build_settings

GREEN, RED = (0, 255, 0), (255, 0, 0)


def _grey(key: str, pid: int, cam: int) -> dict:
    """A flat grey image item (no pixel can be mistaken for a frame colour)."""
    return {"image": torch.zeros(3, 128, 64), "modality": 1, "camera": cam, "pid": pid}


def _strip_counts(png, col: int, row: int, cols: int, rows: int) -> tuple[int, int]:
    """(pure green, pure red) pixel counts inside cell (row, col) of the fixed grid."""
    img = np.asarray(Image.open(png).convert("RGB"))
    h, w = img.shape[:2]
    left, bottom, width, height = vis.rank_list_cell_box(row, col, rows, cols)
    cell = img[int((1 - bottom - height) * h) - 2: int((1 - bottom) * h) + 2, int(left * w) + 1: int((left + width) * w) - 1]
    flat = cell.reshape(-1, 3)
    return int(np.all(flat == GREEN, axis=1).sum()), int(np.all(flat == RED, axis=1).sum())


def test_frames_are_green_for_same_identity_and_red_otherwise(tmp_path):
    same = [True, False, True, False, False, True, False, False, False, True]
    gallery = [{"key": f"g{i}", "pid": 5 if s else 9, "camera": 1 + i % 4, "distance": -0.9 + 0.1 * i, "same": s}
               for i, s in enumerate(same)]
    entries = [{"key": "q", "pid": 5, "camera": 3, "ap": 0.5, "gallery": gallery},
               {"key": "q2", "pid": 9, "camera": 6, "ap": 0.2,
                "gallery": [dict(g, same=not g["same"]) for g in gallery]}]
    images = {k: _grey(k, 0, 1) for k in ["q", "q2"] + [g["key"] for g in gallery]}
    png = vis.plot_rank_lists(entries, images, tmp_path / "ranks.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row, flags in enumerate((same, [not s for s in same])):
        assert _strip_counts(png, 0, row, 11, 2) == (0, 0)  # the query has no frame
        for col, is_same in enumerate(flags, start=1):
            green, red = _strip_counts(png, col, row, 11, 2)
            if is_same:
                assert green > 200 and red == 0, (row, col, green, red)
            else:
                assert red > 200 and green == 0, (row, col, green, red)


def test_rank_lists_rank_like_the_metric_and_find_the_worst_queries():
    # SYSU-like: 2 ids; infrared queries (cam3 / cam6) against visible cameras 1 and 2.
    records, feats = [], []
    angle = {("q", 1, 3): 0, ("q", 2, 6): 90, ("g", 1, 1): 50, ("g", 1, 2): 2, ("g", 2, 1): 88, ("g", 2, 2): 10}
    for (kind, pid, cam), deg in angle.items():
        records.append({"key": f"{kind}{pid}c{cam}", "pid": pid, "camera": cam, "modality": 0 if kind == "q" else 1,
                        "path": f"cam{cam}/{pid:04d}/{kind}.jpg"})
        feats.append([np.cos(np.radians(deg)), np.sin(np.radians(deg))])
    index = {"dataset": "sysu", "test_records": records}
    setting = [s for s in build_settings(index, ["sysu"], trials=1) if s.name == "all_single"][0]
    row_of = {r["key"]: i for i, r in enumerate(records)}
    lists = vis.rank_lists(torch.tensor(feats, dtype=torch.float32), row_of, records, setting, top=10)
    by_key = {e["key"]: e for e in lists["sample"]}
    # q1c3 (cam3): the cam2 entries are removed; kept: g1c1 (50 deg), g2c1 (88) -> match first, AP 1
    assert [g["key"] for g in by_key["q1c3"]["gallery"]] == ["g1c1", "g2c1"]
    assert [g["same"] for g in by_key["q1c3"]["gallery"]] == [True, False] and by_key["q1c3"]["ap"] == 1.0
    # q2c6 (90 deg, cam6): nothing removed; g2c1 (2), g1c1 (40), g2c2 (80), g1c2 (88) -> AP (1 + 2/3) / 2
    assert [g["key"] for g in by_key["q2c6"]["gallery"]] == ["g2c1", "g1c1", "g2c2", "g1c2"]
    assert by_key["q2c6"]["ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert by_key["q2c6"]["gallery"][0]["distance"] == pytest.approx(-np.cos(np.radians(2)))
    assert [e["key"] for e in lists["worst"]] == ["q2c6", "q1c3"]  # lowest AP first
    assert vis.keys_in(lists) == {"q1c3", "q2c6", "g1c1", "g2c1", "g2c2", "g1c2"}
