"""LLCM VIS->IR as the LLCM authors evaluate it (roles swapped), on a case worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from mip_dist.engine.evaluator import evaluate_features

# (key, pid, camera, modality 0 = near-infrared / 1 = visible, feature angle in degrees)
# Features are unit vectors at these angles, so the distance -cos(a - b) ranks by angular difference.
RECORDS = [
    ("a_nir_c1", 1, 1, 0, 0.0),
    ("b_nir_c2", 2, 2, 0, 90.0),
    ("a_vis_c1", 1, 1, 1, 5.0),
    ("a_vis_c2", 1, 2, 1, 60.0),
    ("b_vis_c1", 2, 1, 1, 20.0),
    ("b_vis_c3", 2, 3, 1, 100.0),
]


def _case() -> tuple[torch.Tensor, list[str], dict]:
    """Features, keys and an LLCM index with ONE image per (identity, camera): every trial draws the same."""
    records, feats = [], []
    for key, pid, cam, mod, angle in RECORDS:
        folder = "test_nir" if mod == 0 else "test_vis"
        records.append({"key": key, "pid": pid, "camera": cam, "modality": mod,
                        "path": f"{folder}/cam{cam}/{pid:04d}/{key}.jpg"})
        feats.append([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    return torch.tensor(feats), [r["key"] for r in records], {"dataset": "llcm", "test_records": records}


@pytest.fixture(scope="module")
def results() -> dict:
    feats, keys, index = _case()
    return evaluate_features(feats, keys, index, ["llcm"], trials=2, max_rank=20)


def test_published_vis_to_ir_ranks_drawn_nir_images_against_all_visible(results):
    # Worked out by hand. Queries: the two NIR images; gallery: all four visible images.
    # a_nir_c1 (0 deg, id 1, cam 1): a_vis_c1 (5 deg) is removed (same id AND camera); the kept list is
    #   b_vis_c1 (20), a_vis_c2 (60), b_vis_c3 (100): first match at 2 -> CMC rank 2, AP 1/2, INP 1/2.
    # b_nir_c2 (90 deg, id 2, cam 2): nothing removed; b_vis_c3 (10), a_vis_c2 (30), b_vis_c1 (70),
    #   a_vis_c1 (85): matches at 1 and 3 -> CMC rank 1, AP (1/1 + 2/3)/2 = 5/6, INP 2/3.
    r = results["visible_to_infrared"]
    assert r["num_query"] == 2 and r["num_gallery"] == 4 and r["headline"]
    assert r["R1"] == pytest.approx(50.0)
    assert r["cmc"][1] == pytest.approx(100.0)
    assert r["mAP"] == pytest.approx(100 * (1 / 2 + 5 / 6) / 2)
    assert r["mINP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert r["R1_std"] == 0.0 and r["trials"] == 2  # one image per (id, camera): every draw is the same


def test_literal_vis_to_ir_is_a_different_evaluation(results):
    # Queries: the four visible images; gallery: the two NIR images (one per id and camera).
    # a_vis_c1: its only match a_nir_c1 shares id AND camera -> removed -> query skipped.
    # a_vis_c2 (60): b_nir_c2 (30), a_nir_c1 (60) -> rank 2, AP 1/2.  b_vis_c1 (20): a_nir_c1 (20),
    # b_nir_c2 (70) -> rank 2, AP 1/2.  b_vis_c3 (100): b_nir_c2 (10) first -> rank 1, AP 1.
    r = results["visible_to_infrared_literal"]
    assert r["num_query"] == 4 and not r["headline"]
    assert r["R1"] == pytest.approx(100 / 3)
    assert r["mAP"] == pytest.approx(100 * 2 / 3)
    assert r["R1"] != pytest.approx(results["visible_to_infrared"]["R1"])


def test_ir_to_vis_is_unchanged(results):
    # Queries: the two NIR images; gallery: one visible image per (id, camera) = all four here, so
    # IR->VIS equals the published VIS->IR on this case (same queries, same gallery).
    assert results["infrared_to_visible"]["R1"] == pytest.approx(results["visible_to_infrared"]["R1"])
    assert results["infrared_to_visible"]["mAP"] == pytest.approx(results["visible_to_infrared"]["mAP"])
