"""Gallery search (`mip_dist.inference.search`, launch/search.py): brute-force equality, backend agreement, the
tie rule, re-ranking as the evaluator's function computes it, one-line errors, and the command's outputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_launch_script

from mip_dist.eval.rerank import re_ranking
from mip_dist.inference import search as S
from mip_dist.inference.feature_file import load_features, save_features

BACKENDS = ["faiss", "torch"] if S.faiss_available() else ["torch"]
SHA = "a" * 64


@pytest.fixture(scope="module")
def cli():
    """launch/search.py as a module."""
    return load_launch_script("search", "launch_search_tests")


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """n random L2-normalised float32 rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def alternating(n: int, first: str = "visible") -> list[str]:
    """visible, infrared, visible, ... (or starting with infrared)."""
    other = "infrared" if first == "visible" else "visible"
    return [first if i % 2 == 0 else other for i in range(n)]


def write(path: Path, feats: torch.Tensor, modalities: list, sha: str = SHA, stem: str = "img") -> Path:
    """A feature file whose item i is <stem>_i.png with the given modality, camera i % 3 + 1 and pid i % 7."""
    items = [{"path": f"{stem}_{i}.png", "camera": i % 3 + 1, "pid": i % 7} for i in range(len(modalities))]
    for item, m in zip(items, modalities):
        if m is not None:
            item["modality"] = m
    return save_features(path, feats, items, {"path": "model.pt", "sha256": sha, "layout": "paper"})


def brute_force(q: torch.Tensor, g: torch.Tensor, q_mod: list, g_mod: list, k: int, cross: bool):
    """Full similarity matrix, other-modality mask, stable descending sort: what the search must return."""
    sims = (q.double() @ g.double().t()).numpy()
    if cross:
        sims[np.asarray(q_mod)[:, None] == np.asarray(g_mod)[None, :]] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cross", [True, False])
def test_search_equals_brute_force(tmp_path, backend, cross):
    g_mod, q_mod = alternating(300), alternating(41, "infrared")
    gal = load_features(write(tmp_path / "g.safetensors", unit_rows(300, 32, 0), g_mod))
    qry = load_features(write(tmp_path / "q.safetensors", unit_rows(41, 32, 1), q_mod))
    res = S.search_features(qry, gal, 10, cross_modality=cross, backend=backend)
    ref_s, ref_i = brute_force(qry.features, gal.features, q_mod, g_mod, 10, cross)
    assert res.indices.shape == (41, 10) and res.score_kind == "cosine" and res.backend == backend
    assert np.array_equal(res.indices.numpy(), ref_i)
    np.testing.assert_allclose(res.scores.numpy(), ref_s, atol=1e-5)
    if cross:
        got = np.asarray(g_mod)[res.indices.numpy()]
        assert (got != np.asarray(q_mod)[:, None]).all()


@pytest.mark.skipif("faiss" not in BACKENDS, reason="faiss-cpu not installed")
def test_faiss_and_torch_agree():
    g, q = unit_rows(3000, 64, 2), unit_rows(150, 64, 3)
    fs, fi = S.build_index(g, "faiss").search(q, 20)
    ts, ti = S.build_index(g, "torch").search(q, 20)
    assert torch.equal(fi, ti)
    assert torch.allclose(fs, ts, atol=1e-5)
    assert (fs[:, :-1] >= fs[:, 1:]).all()
    small = S.build_index(g[:7], "faiss").search(q[:3], 50)  # k above the index size: capped, no -1 rows
    assert small[1].shape == (3, 7) and torch.equal(small[1], S.build_index(g[:7], "torch").search(q[:3], 50)[1])


def test_torch_blocks_merge_exactly(monkeypatch):
    """Many small query x gallery blocks (the path a 1M-row gallery takes) give the one-block result."""
    g, q = unit_rows(1010, 16, 8), unit_rows(70, 16, 9)
    whole = S.build_index(g, "torch").search(q, 15)
    monkeypatch.setattr(S, "_QUERY_BLOCK", 16)
    monkeypatch.setattr(S, "_CHUNK_ELEMENTS", 16 * 40)  # 40 gallery rows per block: 26 blocks, the last of 10 < k
    blocked = S.build_index(g, "torch").search(q, 15)
    assert torch.equal(whole[1], blocked[1]) and torch.equal(whole[0], blocked[0])
    ref_s, ref_i = brute_force(q, g, [], [], 15, cross=False)
    assert np.array_equal(blocked[1].numpy(), ref_i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_lowest_row_first(backend):
    """Exact ties (one-hot rows: every product is exactly 0 or 1): the lowest gallery rows win, in order."""
    hot = torch.tensor([3, 1, 3, 0, 3, 5, 3, 2, 3, 3, 7, 6, 4, 3] * 4)
    g = torch.nn.functional.one_hot(hot, 8).float()
    q = torch.nn.functional.one_hot(torch.tensor([3, 5, 0]), 8).float()
    ones = {c: (hot == c).nonzero().flatten().tolist() for c in (3, 5, 0)}
    for k in (4, 20, 30):
        scores, idx = S.build_index(g, backend).search(q, k)
        for row, c in enumerate((3, 5, 0)):
            rest = [i for i in range(len(hot)) if i not in ones[c]]
            assert idx[row].tolist() == (ones[c] + rest)[:k]
            assert scores[row].tolist() == ([1.0] * len(ones[c]) + [0.0] * len(rest))[:k]


@pytest.mark.parametrize("cross", [True, False])
def test_rerank_equals_evaluator_function(tmp_path, cross):
    g_mod, q_mod = alternating(30), alternating(9, "infrared")
    gal = load_features(write(tmp_path / "g.safetensors", unit_rows(30, 16, 4), g_mod))
    qry = load_features(write(tmp_path / "q.safetensors", unit_rows(9, 16, 5), q_mod))
    res = S.search_features(qry, gal, 5, cross_modality=cross, rerank=True)
    assert res.score_kind == "-rerank_distance"
    groups = [(q_rows, [i for i, m in enumerate(g_mod) if m != qm])
              for qm in ("visible", "infrared")
              for q_rows in [[i for i, m in enumerate(q_mod) if m == qm]]] if cross else \
        [(list(range(9)), list(range(30)))]
    for q_rows, g_rows in groups:
        dist = re_ranking(qry.features[q_rows], gal.features[g_rows])  # k1=20, k2=6, lambda=0.3
        order = torch.sort(dist, dim=1, stable=True).indices[:, :5]
        assert torch.equal(res.indices[q_rows], torch.tensor(g_rows)[order])
        assert torch.allclose(res.scores[q_rows], -dist.gather(1, order))


def test_rerank_refuses_above_the_limit(tmp_path):
    gal = load_features(write(tmp_path / "g.safetensors", unit_rows(30, 16, 4), alternating(30)))
    qry = load_features(write(tmp_path / "q.safetensors", unit_rows(9, 16, 5), alternating(9)))
    with pytest.raises(S.SearchError, match=r"above the limit of 18 images"):
        S.search_features(qry, gal, 5, rerank=True, max_rerank_items=18)


def test_auto_without_faiss_uses_torch(monkeypatch, caplog):
    monkeypatch.setattr(S, "faiss_available", lambda: False)
    with caplog.at_level("INFO", logger="mip_dist"):
        index = S.build_index(unit_rows(10, 8, 0), "auto")
    assert index.backend == "torch" and "torch" in caplog.text
    with pytest.raises(S.SearchError, match="faiss does not import"):
        S.build_index(unit_rows(10, 8, 0), "faiss")


def bad_query(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(command-line args, text the error must contain) for one kind of unusable input."""
    g = write(tmp_path / "g.safetensors", unit_rows(20, 16, 0), alternating(20))
    if case == "model":
        q = write(tmp_path / "q.safetensors", unit_rows(4, 16, 1), alternating(4), sha="b" * 64)
        return ["--gallery", str(g), "--query", str(q)], "made by model sha256 bbbbbbbbbbbb"
    if case == "dim":
        q = write(tmp_path / "q.safetensors", unit_rows(4, 8, 1), alternating(4))
        return ["--gallery", str(g), "--query", str(q)], "has dimension 8"
    if case == "modality":
        q = write(tmp_path / "q.safetensors", unit_rows(4, 16, 1), ["visible", None, "visible", "infrared"])
        return ["--gallery", str(g), "--query", str(q)], "row 1 (img_1.png) has modality None"
    if case == "one_modality_gallery":
        g1 = write(tmp_path / "g1.safetensors", unit_rows(5, 16, 0), ["visible"] * 5)
        q = write(tmp_path / "q.safetensors", unit_rows(4, 16, 1), alternating(4))
        return ["--gallery", str(g1), "--query", str(q)], "holds no infrared rows"
    if case == "rerank_limit":  # 2 visible queries + 10 infrared gallery rows = 12 > 11
        q = write(tmp_path / "q.safetensors", unit_rows(4, 16, 1), alternating(4))
        return ["--gallery", str(g), "--query", str(q), "--rerank", "--rerank-limit", "11"], "above the limit of 11"
    if case == "images_without_modality":
        return ["--gallery", str(g), "--query-images", str(g), "--model", "m.pt"], "needs --modality"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["model", "dim", "modality", "one_modality_gallery", "rerank_limit",
                                  "images_without_modality"])
def test_bad_inputs_one_error_line(tmp_path, capsys, monkeypatch, cli, case):
    monkeypatch.delenv("MIP_DEBUG", raising=False)
    argv, expected = bad_query(tmp_path, case)
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_command_end_to_end(tmp_path, capsys, cli):
    from PIL import Image

    g_mod, q_mod = alternating(40), alternating(11)
    g = write(tmp_path / "g.safetensors", unit_rows(40, 16, 6), g_mod, stem="gal")
    q = write(tmp_path / "q.safetensors", unit_rows(11, 16, 7), q_mod, stem="qry")
    for i in range(0, 40, 2):  # half the gallery images exist (beside the feature file): the rest are grey tiles
        Image.new("RGB", (32, 64), (6 * i, 90, 160)).save(tmp_path / f"gal_{i}.png")
    Image.new("RGB", (32, 64), (200, 20, 20)).save(tmp_path / "qry_0.png")
    out = tmp_path / "out"
    assert cli.main(["--gallery", str(g), "--query", str(q), "--topk", "4", "--out", str(out), "--show", "2",
                     "--figures", "3", "--backend", "torch"]) == 0
    printed = capsys.readouterr().out
    assert "query 0: qry_0.png" in printed and "query 1:" in printed and "query 2:" not in printed
    assert "9 more queries" in printed

    doc = json.loads((out / "results.json").read_text())
    ref = S.search_features(load_features(q), load_features(g), 4, backend="torch")
    assert doc["score"] == "cosine" and doc["cross_modality"] and len(doc["queries"]) == 11
    assert [[m["row"] for m in r["matches"]] for r in doc["queries"]] == ref.indices.tolist()
    first = doc["queries"][0]["matches"][0]
    assert first["path"] == f"gal_{first['row']}.png" and first["modality"] == "infrared"
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11 * 4 and rows[0]["rank"] == "1" and rows[0]["query_path"] == "qry_0.png"
    pngs = sorted(p.name for p in out.glob("ranklist_*.png"))
    assert pngs == ["ranklist_0000.png", "ranklist_0001.png", "ranklist_0002.png"]
    assert Image.open(out / pngs[0]).size[0] >= 400


def test_command_with_query_images(tmp_path, capsys, cli):
    """--query-images: the extractor's features of image files, searched against a gallery the same model made."""
    from PIL import Image
    from conftest import make_model, small_cfg

    from mip_dist.engine.export import export_model
    from mip_dist.inference import FeatureExtractor

    cfg = small_cfg("tiny.yaml")
    model = make_model(cfg)
    model_path = export_model(tmp_path / "model_best.pt", model.state_dict(), cfg, 7, 3)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 64), (40 * i, 100, 255 - 40 * i)).save(imgs / f"g{i}.png")
    fx = FeatureExtractor(model_path)
    gallery_files = [str(imgs / f"g{i}.png") for i in range(6)]
    feats = fx(gallery_files, modality="visible")
    items = [{"path": p, "modality": "visible", "camera": None, "pid": i} for i, p in enumerate(gallery_files)]
    g = save_features(tmp_path / "g.safetensors", feats, items, fx.model_info)
    out = tmp_path / "out"
    rc = cli.main(["--gallery", str(g), "--query-images", str(imgs / "g2.png"), str(imgs / "g4.png"),
                   "--model", str(model_path), "--modality", "infrared", "--topk", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    q = fx([str(imgs / "g2.png"), str(imgs / "g4.png")], modality="infrared")
    expected = torch.sort(q @ feats.t(), dim=1, descending=True, stable=True).indices[:, :3]
    assert [[m["row"] for m in r["matches"]] for r in doc["queries"]] == expected.tolist()
    assert doc["queries"][0]["query"]["modality"] == "infrared"


def test_bench_search_section(tmp_path, capsys):
    """launch/bench_inference.py's search section on a tiny gallery: a table, ratios, every number in --json."""
    bench = load_launch_script("bench_inference", "bench_inference_tests")
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "300", "--dim", "8", "--batch", "5", "--repeat", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["search"]["results"]
    assert [r["backend"] for r in rows] == BACKENDS and all(r["rows"] == 300 for r in rows)
    assert all(r["index_bytes"] == 300 * 8 * 4 and r["batch_ms_per_query"] > 0 for r in rows)
    assert len(doc["search"]["torch_over_faiss"]) == (1 if len(BACKENDS) == 2 else 0)
    assert "ms/query" in capsys.readouterr().out
