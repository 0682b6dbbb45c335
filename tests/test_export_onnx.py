"""ONNX export of the evaluation forward (launch/export_onnx.py, mip_dist.inference.onnx_export): both layouts
match PyTorch under onnxruntime at two batch sizes, the command end to end, and its one-line refusals.

One export per layout, shared by the module: the paper one through the command (all three inputs, no flip),
the release one through the library (no SIE so no camera input, eval.flip on so flip averaging in the graph)."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mip_dist.config import to_dict
from mip_dist.engine.file_hash import read_sidecar, sha256_file, write_sidecar
from mip_dist.inference import onnx_export as ox

from conftest import NUM_CAMERAS, NUM_CLASSES, inputs, load_launch_script, make_model, small_cfg

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

cli = load_launch_script("export_onnx", "launch_export_onnx")


def _write_model(path: Path, cfg, seed: int = 0, sidecar: bool = True) -> tuple[Path, torch.nn.Module]:
    """An exported model file ({"model", "config", "num_classes", "num_cameras"}) of the config, seeded weights."""
    model = make_model(cfg, seed=seed).eval()
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "num_classes": NUM_CLASSES,
                "num_cameras": NUM_CAMERAS}, path)
    if sidecar:
        write_sidecar(path)
    return path, model


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """The tiny paper-layout model exported by the command: (cfg, model, model file, onnx file, exit, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("onnx_paper")
    cfg = small_cfg("tiny.yaml")
    model_file, model = _write_model(folder / "model_best.pt", cfg)
    onnx_file = folder / "out" / "model.onnx"  # a folder that does not exist yet
    code, out, err = _run_cli([model_file, onnx_file])
    return cfg, model, model_file, onnx_file, code, out, err


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny release-layout model (no SIE, eval.flip on) exported by the library: (cfg, model, model file, result)."""
    folder = tmp_path_factory.mktemp("onnx_release")
    cfg = small_cfg("tiny.yaml", ["model.layout=release", "model.sie=false", "eval.flip=true"])
    model_file, model = _write_model(folder / "model_final.pt", cfg, sidecar=False)
    result = ox.export_onnx(model_file, folder / "release.onnx")
    return cfg, model, model_file, result


def _max_row_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def test_command_exports_paper_layout_end_to_end(paper):
    cfg, _, model_file, onnx_file, code, out, err = paper
    assert code == 0, err
    assert "error" not in err
    for line in ("image     float32 [batch, 3, 128, 64]", "modality  int64   [batch]  0 infrared, 1 visible",
                 "camera    int64   [batch]  the dataset's camera number minus 1", "features  float32 [batch, 640]",
                 "flip averaging: not in the graph", "passed", "dynamo exporter, opset 18"):
        assert line in out, out
    assert onnx_file.is_file() and read_sidecar(onnx_file) == sha256_file(onnx_file)
    assert not [p.name for p in onnx_file.parent.iterdir() if p.name not in ("model.onnx", "model.onnx.sha256")]
    meta = ox.read_metadata(onnx_file)
    assert meta["model_sha256"] == sha256_file(model_file) and meta["model_file"] == "model_best.pt"
    assert meta["layout"] == "paper" and meta["img_size"] == [128, 64] and meta["feature_dim"] == 640
    assert meta["input_names"] == "image,modality,camera" and meta["flip"] is False
    assert meta["exporter"] == "dynamo" and meta["opset"] == 18 and meta["check"]["passed"]
    assert meta["check"]["max_rel_err"] <= 1e-4 and meta["check"]["batch_sizes"] == [1, 3]


@pytest.mark.parametrize("batch", [2, 5])
def test_paper_onnx_matches_pytorch(paper, batch):
    cfg, model, _, onnx_file, code, _, err = paper
    assert code == 0, err
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [
        ("image", "tensor(float)"), ("modality", "tensor(int64)"), ("camera", "tensor(int64)")]
    assert not isinstance(sess.get_inputs()[0].shape[0], int)  # symbolic batch axis
    images, modality, camera = inputs(cfg, [i % 2 for i in range(batch)], seed=batch)
    with torch.inference_mode():
        ref = model.extract(images, modality, camera).numpy()
    (got,) = sess.run(["features"], {"image": images.numpy(), "modality": modality.numpy(), "camera": camera.numpy()})
    assert got.shape == ref.shape == (batch, 640)
    assert _max_row_rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("batch", [2, 5])
def test_release_onnx_matches_pytorch_with_flip(release, batch):
    cfg, model, model_file, result = release
    assert result.exporter == "dynamo" and result.flip and result.layout == "release"
    assert [i.name for i in result.inputs] == ["image", "modality"]  # no SIE: no camera input
    assert read_sidecar(result.path) == result.sha256 == sha256_file(result.path)
    meta = ox.read_metadata(result.path)
    assert meta["flip"] is True and meta["layout"] == "release" and meta["input_names"] == "image,modality"
    assert meta["model_sha256"] == sha256_file(model_file)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images, modality, _ = inputs(cfg, [1 - i % 2 for i in range(batch)], seed=10 + batch)
    with torch.inference_mode():  # the evaluator's flip averaging
        f = model.extract(images, modality, None)
        ref = F.normalize(0.5 * (f + model.extract(images.flip(-1), modality, None)), dim=1).numpy()
    (got,) = sess.run(["features"], {"image": images.numpy(), "modality": modality.numpy()})
    assert got.shape == ref.shape
    assert _max_row_rel_err(got, ref) <= 1e-4


def test_refusals_are_one_line(paper, tmp_path):
    _, _, model_file, onnx_file, code, _, _ = paper
    assert code == 0
    before = sha256_file(onnx_file)
    code, out, err = _run_cli([model_file, onnx_file])  # existing output: refused before anything is read
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and "exists" in err
    assert sha256_file(onnx_file) == before
    code, out, err = _run_cli([tmp_path / "missing.pt", tmp_path / "a.onnx"])
    assert code == 2 and err.count("\n") == 1 and "model file not found" in err and "Traceback" not in err
    code, _, err = _run_cli([model_file, tmp_path / "a.onnx", "--opset", "16"])
    assert code == 2 and err.count("\n") == 1 and "opset 17 or newer" in err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    code, _, err = _run_cli([tmp_path / "junk.pt", tmp_path / "a.onnx"])
    assert code == 2 and err.count("\n") == 1 and "junk.pt" in err
    damaged = tmp_path / "damaged.pt"
    shutil.copy(model_file, damaged)
    (tmp_path / "damaged.pt.sha256").write_text("0" * 64 + "  damaged.pt\n")
    code, _, err = _run_cli([damaged, tmp_path / "a.onnx"])
    assert code == 2 and err.count("\n") == 1 and "sha256" in err
    assert not (tmp_path / "a.onnx").exists()


def test_failed_check_leaves_no_file(paper, tmp_path, monkeypatch):
    """A graph that does not match the model (another model's) fails the check: exit 2, nothing written."""
    cfg, _, _, onnx_file, code, _, _ = paper
    assert code == 0
    other, _ = _write_model(tmp_path / "other.pt", cfg, seed=1)

    def wrong_graph(graph, example, path, opset):
        shutil.copy(onnx_file, path)
        return "dynamo"

    monkeypatch.setattr(ox, "_write_graph", wrong_graph)
    code, _, err = _run_cli([other, tmp_path / "sub" / "o.onnx"])  # its folder is removed again
    assert code == 2 and err.count("\n") == 1 and "max relative error" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt", "other.pt.sha256"]


def test_bench_onnx_reports_both_rates(paper):
    _, model, model_file, onnx_file, code, _, _ = paper
    assert code == 0
    r = ox.bench_onnx(model_file, batch_size=2, seconds=0.05, onnx_path=onnx_file, threads=1)
    assert r["eager_img_s"] > 0 and r["onnx_img_s"] > 0 and r["onnx_over_eager"] > 0
    assert r["batch_size"] == 2 and r["feature_dim"] == 640 and r["flip"] is False
