"""Protocol selections on fabricated SYSU / RegDB / LLCM indexes: counts, seeds, determinism, errors."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from mip_dist.eval.protocols import ProtocolError, build_settings, draw_gallery

SYSU_MODALITY = {1: 1, 2: 1, 3: 0, 4: 1, 5: 1, 6: 0}


def sysu_index(seed: int = 0) -> dict:
    """A SYSU-like test index: 7 ids, uneven image counts, some ids missing from some cameras."""
    rng = np.random.default_rng(seed)
    records = []
    for pid in (3, 11, 12, 40, 41, 57, 90):
        for cam in range(1, 7):
            if rng.random() < 0.2 and cam not in (3,):  # a listed id may lack a camera folder
                continue
            for n in range(int(rng.integers(1, 16))):
                path = f"/data/SYSU-MM01/cam{cam}/{pid:04d}/{n + 1:04d}.jpg"
                records.append({"key": f"cam{cam}_{pid:04d}_{n + 1:04d}", "pid": pid, "camera": cam,
                                "modality": SYSU_MODALITY[cam], "path": path})
    rng.shuffle(records)  # index order must not matter
    return {"dataset": "sysu", "test_records": records}


def reference_gallery_paths(records, cams, trial, shots):
    """The reference data manager's draw: random.seed(trial); ids sorted; cams in order; sorted files."""
    state = random.getstate()
    random.seed(trial)
    files = {}
    for r in records:
        files.setdefault((r["pid"], r["camera"]), []).append(r["path"])
    out = []
    for pid in sorted({r["pid"] for r in records}):
        for cam in cams:
            if (pid, cam) in files:
                new_files = sorted(files[(pid, cam)])
                out += [random.choice(new_files)] if shots == 1 else random.sample(new_files, min(10, len(new_files)))
    random.setstate(state)
    return out


@pytest.fixture(scope="module")
def index():
    return sysu_index()


def _by_name(settings):
    return {s.name: s for s in settings}


def test_sysu_counts_and_structure(index):
    recs = index["test_records"]
    settings = _by_name(build_settings(index, ["sysu"], trials=10))
    assert sorted(settings) == ["all_multi", "all_single", "indoor_multi", "indoor_single"]
    expected_query = [i for i, r in enumerate(recs) if r["camera"] in (3, 6)]
    for s in settings.values():
        assert s.metric == "sysu" and s.protocol == "sysu"
        assert sorted(s.query.tolist()) == expected_query
        assert s.seeds == list(range(10)) and s.trials == 10
    groups = Counter((r["pid"], r["camera"]) for r in recs if r["camera"] in (1, 2, 4, 5))
    for mode, cams in (("all", (1, 2, 4, 5)), ("indoor", (1, 2))):
        present = {k: n for k, n in groups.items() if k[1] in cams}
        for shot, per in (("single", 1), ("multi", 10)):
            for g in settings[f"{mode}_{shot}"].galleries:
                picked = Counter((recs[i]["pid"], recs[i]["camera"]) for i in g)
                assert picked == {k: min(per, n) for k, n in present.items()}
                assert len(set(g.tolist())) == len(g)  # without replacement
                assert all(recs[i]["modality"] == 1 for i in g)
    # single-shot all-search: one image per (id, RGB camera) present
    assert settings["all_single"].galleries[0].size == len(groups)


def test_sysu_draws_equal_reference_data_manager(index):
    recs = index["test_records"]
    settings = _by_name(build_settings(index, ["sysu"], trials=10))
    for mode, cams in (("all", [1, 2, 4, 5]), ("indoor", [1, 2])):
        for shot, per in (("single", 1), ("multi", 10)):
            s = settings[f"{mode}_{shot}"]
            for trial, g in zip(s.seeds, s.galleries):
                ours = [recs[i]["path"] for i in g]
                assert ours == reference_gallery_paths([r for r in recs if r["modality"] == 1], cams, trial, per)


def test_sysu_is_deterministic_and_trials_differ(index):
    a = build_settings(index, ["sysu"], trials=10)
    b = build_settings(sysu_index(), ["sysu"], trials=10)  # same records, fresh objects
    for sa, sb in zip(a, b):
        assert all(np.array_equal(x, y) for x, y in zip(sa.galleries, sb.galleries))
    single = _by_name(a)["all_single"].galleries
    assert len({tuple(g.tolist()) for g in single}) > 1  # seeds 0..9 give different galleries


def test_sysu_authors_variant_is_labelled(index):
    authors = _by_name(build_settings(index, ["sysu_authors"], trials=10))
    standard = _by_name(build_settings(index, ["sysu"], trials=10))
    assert sorted(authors) == ["authors_all_multi", "authors_all_single", "authors_indoor_multi",
                               "authors_indoor_single"]
    for name, s in authors.items():
        assert s.trials == 1 and s.seeds == [0] and s.metric == "plain" and s.protocol == "sysu_authors"
        assert "NO cam3/cam2 removal" in s.description
        assert np.array_equal(s.galleries[0], standard[name[len("authors_"):]].galleries[0])


def test_regdb_directions():
    records = []
    for pid in range(5):
        for n in range(10):
            records.append({"key": f"v{pid}_{n}", "pid": pid, "camera": 1, "modality": 1, "path": f"V/{pid}/{n}.bmp"})
            records.append({"key": f"t{pid}_{n}", "pid": pid, "camera": 2, "modality": 0, "path": f"T/{pid}/{n}.bmp"})
    s = _by_name(build_settings({"dataset": "regdb", "regdb_split": 3, "test_records": records}, ["regdb"]))
    v2t, t2v = s["visible_to_thermal"], s["thermal_to_visible"]
    assert v2t.metric == t2v.metric == "regdb" and v2t.trials == 1 and v2t.seeds == [None]
    assert {records[i]["modality"] for i in v2t.query} == {1} and {records[i]["modality"] for i in v2t.galleries[0]} == {0}
    assert np.array_equal(v2t.query, t2v.galleries[0]) and v2t.query.size == 50
    assert v2t.counts["split"] == 3 and "split 3" in v2t.description


def test_llcm_one_image_per_id_camera():
    rng = np.random.default_rng(1)
    records = []
    for pid in (1, 4, 9):
        for cam in (1, 2, 3, 4, 5):
            for mod in (0, 1):
                if mod == 0 and cam == 3:
                    continue  # LLCM has no NIR cam3
                for n in range(int(rng.integers(1, 6))):
                    records.append({"key": f"{pid}_{cam}_{mod}_{n}", "pid": pid, "camera": cam, "modality": mod,
                                    "path": f"test_{'nir' if mod == 0 else 'vis'}/cam{cam}/{pid:04d}/{n}.jpg"})
    s = _by_name(build_settings({"dataset": "llcm", "test_records": records}, ["llcm"], trials=4))
    assert sorted(s) == ["infrared_to_visible", "visible_to_infrared", "visible_to_infrared_literal"]
    present = {mod: {(r["pid"], r["camera"]) for r in records if r["modality"] == mod} for mod in (0, 1)}
    n_images = {mod: sum(r["modality"] == mod for r in records) for mod in (0, 1)}
    ir2vis, vis2ir, literal = s["infrared_to_visible"], s["visible_to_infrared"], s["visible_to_infrared_literal"]
    for st in s.values():
        assert st.metric == "llcm" and st.seeds == [0, 1, 2, 3] and st.trials == 4
    assert ir2vis.headline and vis2ir.headline and not literal.headline
    # IR->VIS (authors' test_mode=[1,2]): all NIR queries, one VIS image per (id, camera) per trial
    assert ir2vis.query.size == n_images[0] and ir2vis.query_draws is None
    for g in ir2vis.galleries:
        assert Counter((records[i]["pid"], records[i]["camera"]) for i in g) == {k: 1 for k in present[1]}
    # VIS->IR as published (test_mode=[2,1], roles swapped): drawn NIR queries vs ALL visible images
    for t in range(4):
        q = vis2ir.trial_query(t)
        assert Counter((records[i]["pid"], records[i]["camera"]) for i in q) == {k: 1 for k in present[0]}
        assert {records[i]["modality"] for i in q} == {0}
        assert vis2ir.galleries[t].size == n_images[1] and {records[i]["modality"] for i in vis2ir.galleries[t]} == {1}
        expected = reference_gallery_paths([r for r in records if r["modality"] == 0], [1, 2, 4, 5], t, 1)
        assert [records[i]["path"] for i in q] == expected  # process_gallery_llcm(mode=2, trial=t), draw for draw
    # the literal direction: all VIS queries vs one NIR per (id, camera): the same draws on the other side
    assert literal.query.size == n_images[1]
    for t in range(4):
        assert np.array_equal(literal.galleries[t], vis2ir.trial_query(t))


def test_draw_gallery_multi_shot_caps_at_group_size():
    groups = [[0, 1, 2], list(range(10, 40))]
    g = draw_gallery(groups, seed=5, shots=10)
    assert sorted(g[:3].tolist()) == [0, 1, 2] and len(set(g[3:].tolist())) == 10


def test_errors_name_the_problem(index):
    with pytest.raises(ProtocolError, match="unknown protocol 'market'"):
        build_settings(index, ["market"])
    with pytest.raises(ProtocolError, match="does not apply to dataset 'sysu'"):
        build_settings(index, ["regdb"])
    with pytest.raises(ProtocolError, match="no test_records"):
        build_settings({"dataset": "sysu", "test_records": []}, ["sysu"])
    no_ir = {"dataset": "synthetic", "test_records": [r for r in index["test_records"] if r["modality"] == 1]}
    with pytest.raises(ProtocolError, match="cameras 3 and 6"):
        build_settings(no_ir, ["sysu"])
    with pytest.raises(ProtocolError, match="more than once"):
        build_settings(index, ["sysu", "sysu"])
