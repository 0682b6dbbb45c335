"""FeatureExtractor and launch/extract.py: the evaluator's features for any image, every input kind, feature
files that are reused when nothing changed, unreadable images skipped, and every bad input one `error:` line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mip_dist.config import load_config, to_dict
from mip_dist.data.shards import write_shards
from mip_dist.data.stream import build_test_loader
from mip_dist.engine.evaluator import extract_features
from mip_dist.engine.file_hash import write_sidecar
from mip_dist.engine.safe_load import CheckpointError
from mip_dist.inference import FeatureExtractor
from mip_dist.inference.feature_file import load_features
from mip_dist.model import build_model

from conftest import load_launch_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SIZE = (128, 64)  # tiny.yaml's model.img_size

cli = load_launch_script("extract", "launch_extract")


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("MIP_DEBUG", raising=False)


def _noise(path: Path, size: tuple[int, int], grey: bool, rng: np.random.Generator) -> None:
    """A random image of `size` (H, W): features that differ from image to image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (*size, 1 if grey else 3), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if grey else arr).save(path)


def _sysu_tree(root: Path) -> Path:
    """A SYSU-MM01 tree (ids 1-2 train, 3 val, 4-5 test; 2 images per camera) of noise JPEGs, one per folder at
    the model's size and one smaller (resized on the way in); cameras 3 and 6 infrared (grey)."""
    rng = np.random.default_rng(0)
    (root / "exp").mkdir(parents=True)
    for name, ids in (("train_id", "1,2"), ("val_id", "3"), ("test_id", "4,5")):
        (root / "exp" / f"{name}.txt").write_text(ids + "\n")
    for pid in range(1, 6):
        for cam in range(1, 7):
            for n, size in ((1, SIZE), (2, (96, 40))):
                _noise(root / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.jpg", size, cam in (3, 6), rng)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Test shards of a noise SYSU tree, a tiny exported model (eval.flip=true) with its sha256 sidecar,
    and a folder of PNGs (four at the model's size, one smaller)."""
    base = tmp_path_factory.mktemp("extract")
    tree = _sysu_tree(base / "SYSU")
    shards = base / "shards"
    write_shards("sysu", str(tree), str(shards), workers=1, progress=False)
    index = json.loads((shards / "index.json").read_text())
    cfg = load_config(TINY, ["eval.flip=true", "data.workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, index["num_classes"], index["num_cameras"]).eval()
    path = base / "model.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "num_classes": index["num_classes"],
                "num_cameras": index["num_cameras"]}, path)
    write_sidecar(path)
    rng = np.random.default_rng(1)
    photos = base / "photos"
    for i in range(4):
        _noise(photos / f"p{i}.png", SIZE, False, rng)
    _noise(photos / "sub" / "small.png", (60, 30), True, rng)
    return {"base": base, "tree": tree, "shards": shards, "index": index, "cfg": cfg, "model": model,
            "path": path, "photos": photos, "fx": FeatureExtractor(path, device="cpu")}


def _one_error_line(capsys, *needles: str) -> str:
    """stderr holds exactly one `error:` line containing every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_features_match_the_evaluator_on_test_shards_and_source_files(world, tmp_path, capsys):
    fx = world["fx"]
    assert fx.flip and fx.precision == "fp32" and fx.model_info["layout"] == "paper"  # eval.flip from the file
    loader = build_test_loader(world["cfg"].data, shards=str(world["shards"]), batch_size=64)
    ref, keys = extract_features(world["model"], loader, device="cpu", flip=True)
    ref_of = dict(zip(keys, ref))
    out = tmp_path / "test.safetensors"
    assert cli.main([str(world["shards"]), "--model", str(world["path"]), "--out", str(out), "--device", "cpu",
                     "--batch-size", "5"]) == 0
    ff = load_features(out)
    assert [it["key"] for it in ff.items] and sorted(it["key"] for it in ff.items) == sorted(keys)
    got = torch.stack([ref_of[it["key"]] for it in ff.items])
    assert (ff.features - got).abs().max() <= 1e-6
    records = {r["key"]: r for r in world["index"]["test_records"]}
    for it in ff.items:  # the shards' own labels, by name
        r = records[it["key"]]
        name = ["infrared", "visible"][r["modality"]]
        assert (it["pid"], it["camera"], it["modality"]) == (r["pid"], r["camera"], name)
    # the same images from the dataset tree on disk, labels as the model's ints
    recs = world["index"]["test_records"]
    feats = fx([world["tree"] / r["path"] for r in recs], [r["modality"] for r in recs], [r["camera"] for r in recs])
    assert feats.dtype == torch.float32 and (feats - torch.stack([ref_of[r["key"]] for r in recs])).abs().max() <= 1e-6
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(recs)), atol=1e-5)


def test_paths_pil_and_tensors_give_the_same_features(world):
    fx = world["fx"]
    paths = sorted(world["photos"].glob("p*.png"))
    by_path = fx(paths, "visible", camera=2)
    pils = [Image.open(p) for p in paths]
    uint8 = torch.stack([torch.from_numpy(np.array(p.convert("RGB"))).permute(2, 0, 1) for p in pils])
    assert torch.equal(fx(pils, "visible", camera=2), by_path)
    assert torch.equal(fx(uint8, "visible", camera=2), by_path)  # one [N, 3, H, W] tensor
    assert torch.equal(fx([str(p) for p in paths], ["visible"] * 4, [2, 2, 2, 2]), by_path)
    assert (fx(list(uint8.float() / 255), 1, camera=2) - by_path).abs().max() <= 1e-5  # float images in [0, 1]
    small = FeatureExtractor(world["path"], device="cpu", batch_size=3)  # batches of 3, 1
    assert (small(paths, "visible", camera=2) - by_path).abs().max() <= 1e-6
    assert not torch.equal(fx(paths, "infrared", camera=2), by_path)  # the modality and camera matter
    assert not torch.equal(fx(paths, "visible", camera=5), by_path)
    assert fx([], "visible").shape == (0, fx.dim)


def test_bad_modality_camera_and_image_are_named(world):
    fx = world["fx"]
    img = [world["photos"] / "p0.png"]
    for bad in (None, "rgb", 2, True):
        with pytest.raises(ValueError, match="'visible' or 'infrared'"):
            fx(img, bad)
    with pytest.raises(ValueError, match="modality: 2 values for 1 images"):
        fx(img, ["visible", "infrared"])
    with pytest.raises(ValueError, match="camera 0 is not valid"):
        fx(img, "visible", camera=0)
    with pytest.raises(ValueError, match=r"camera 7 is not in the model's camera table \(6 cameras: 1..6\)"):
        fx(img, "visible", camera=7)
    with pytest.raises(ValueError, match=r"nope.png: not a readable image"):
        fx([world["photos"] / "nope.png"], "visible")
    with pytest.raises(ValueError, match=r"tensor of shape \(64, 32\)"):
        fx([torch.zeros(64, 32, dtype=torch.uint8)], "visible")
    with pytest.raises(ValueError, match="precision 'fp16' is not one of fp32, bf16"):
        FeatureExtractor(world["path"], device="cpu", precision="fp16")


def test_release_checkpoint_is_read_with_its_layout(world, tmp_path):
    from test_release import release_model, to_their_naming

    # the authors' files carry no img_size / num_heads: the defaults the tensors cannot tell (256x128, C // 64)
    cfg, model = release_model(["model.img_size=[256,128]", "data.img_size=[256,128]", "model.num_heads=2"])
    path = tmp_path / "theirs.pth"
    torch.save(to_their_naming(model), path)
    fx = FeatureExtractor(path, device="cpu", flip=False)
    assert fx.model_info["layout"] == "release" and fx.img_size == (256, 128) and len(fx.model_info["sha256"]) == 64
    images = torch.randint(0, 256, (2, 3, 256, 128), dtype=torch.uint8)
    want = model.extract(torch.stack([fx.preprocess(i) for i in images]), torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert (fx(images, [0, 1], [1, 3]) - want).abs().max() <= 1e-6



def test_release_checkpoint_with_its_config_file(world, tmp_path):
    """The authors' file of a model at 128x64 with 4 heads (what its tensors cannot tell): read with the config
    file that says so, features equal the model's; without it the defaults (256x128) do not fit, and the error
    says which file gives them."""
    from test_release import release_model, to_their_naming

    from mip_dist.config import save_config

    cfg, model = release_model(["eval.flip=false"])
    path, config = tmp_path / "theirs.pth", tmp_path / "theirs.yaml"
    torch.save(to_their_naming(model), path)
    save_config(cfg, config)
    fx = FeatureExtractor(path, device="cpu", config=config)
    assert fx.img_size == (128, 64) and fx.model_info["config_sha256"] and not fx.flip
    images = torch.randint(0, 256, (2, 3, 128, 64), dtype=torch.uint8)
    want = model.extract(torch.stack([fx.preprocess(i) for i in images]), torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert (fx(images, [0, 1], [1, 3]) - want).abs().max() <= 1e-6
    with pytest.raises(CheckpointError, match=r"50 patch positions.*a config file \(--config\) gives"):
        FeatureExtractor(path, device="cpu")
    with pytest.raises(CheckpointError, match="exported model and carries its own config"):
        FeatureExtractor(world["path"], device="cpu", config=config)


def test_a_model_of_two_datasets_takes_the_cameras_of_the_named_one(world, tmp_path, capsys):
    """Trained on datasets a (cameras 1-6) and b (7-12 in its table): dataset b's camera 1 is row 6, as evaluation
    reads it; without a name the choice is refused, naming both (before, camera 1 silently meant a's)."""
    from mip_dist.engine.export import DatasetChoiceError, export_model

    cfg, n = world["cfg"], world["index"]["num_classes"]
    torch.manual_seed(2)
    model = build_model(cfg.model, cfg.attention, n, 12).eval()
    datasets = [{"name": name, "path": str(world["shards"]), "protocol": "sysu", "label_offset": 0,
                 "camera_offset": offset} for name, offset in (("a", 0), ("b", 6))]
    path = export_model(tmp_path / "two.pt", model.state_dict(), cfg, n, 12, datasets=datasets)
    with pytest.raises(DatasetChoiceError, match=r"trained on 2 datasets \(a, b\): pass --dataset NAME"):
        FeatureExtractor(path, device="cpu")
    with pytest.raises(DatasetChoiceError, match="trained on one dataset; drop --dataset"):
        FeatureExtractor(world["path"], device="cpu", dataset="a")
    fx = FeatureExtractor(path, device="cpu", dataset="b", flip=False)
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8)
    want = model.extract(torch.stack([fx.preprocess(i) for i in images]), torch.tensor([0, 1]), torch.tensor([6, 8]))
    assert (fx(images, [0, 1], [1, 3]) - want).abs().max() <= 1e-6
    assert cli.main(["--model", str(path), "--out", str(tmp_path / "f.safetensors"), "--device", "cpu",
                     "--modality", "visible", str(world["photos"])]) == 2
    _one_error_line(capsys, "trained on 2 datasets (a, b)")


def test_a_changed_model_file_is_refused_and_an_intact_one_gives_its_sidecar_hash(world, tmp_path):
    """The sidecar is checked by the loader before unpickling (the file hashed once); one flipped byte inside a
    tensor (zip intact) is named, and an intact file's recorded hash is the one the features carry."""
    import shutil

    from conftest import flip_inside_largest_tensor

    from mip_dist.engine.file_hash import read_sidecar, sha256_file, sidecar_path

    assert world["fx"].model_info["sha256"] == read_sidecar(world["path"]) == sha256_file(world["path"])
    bad = tmp_path / "model.pt"
    shutil.copy(world["path"], bad)
    shutil.copy(sidecar_path(world["path"]), sidecar_path(bad))
    flip_inside_largest_tensor(bad)
    with pytest.raises(CheckpointError, match="bytes hash to sha256"):
        FeatureExtractor(bad, device="cpu")

def _argv(world, out: Path, *extra: str) -> list[str]:
    return ["--model", str(world["path"]), "--out", str(out), "--device", "cpu", *extra]


def test_folder_end_to_end_skips_unreadable_and_reuses_its_output(world, tmp_path, capsys):
    folder = tmp_path / "gallery"
    folder.mkdir()
    for p in world["photos"].rglob("*.png"):
        target = folder / p.relative_to(world["photos"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.md").write_text("not an image")
    out = tmp_path / "feats" / "gallery.safetensors"
    assert cli.main([str(folder), *_argv(world, out, "--modality", "infrared", "--camera", "3")]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "4 features" not in captured.out and "5 features of dim 640" in captured.out
    assert "images/s" in captured.out and "1 skipped" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, captured.err  # the resize (once) and the skipped image
    assert "small.png is 60x30" in captured.err and "broken.jpg" in warnings[-1]
    ff = load_features(out)
    names = [Path(it["path"]).relative_to(folder).as_posix() for it in ff.items]
    assert names == ["p0.png", "p1.png", "p2.png", "p3.png", "sub/small.png"]
    assert all(it["modality"] == "infrared" and it["camera"] == 3 and it["pid"] is None for it in ff.items)
    assert [Path(s["path"]).name for s in ff.meta["skipped"]] == ["broken.jpg"]
    assert ff.model_sha256 == world["fx"].model_info["sha256"] and ff.meta["flip"] is True
    want = world["fx"]([folder / n for n in names], "infrared", camera=3)
    assert (ff.features - want).abs().max() <= 1e-6
    # the same command again: nothing recomputed
    before = out.stat().st_mtime_ns
    assert cli.main([str(folder), *_argv(world, out, "--modality", "infrared", "--camera", "3")]) == 0
    assert capsys.readouterr().out.startswith(f"up to date: {out}") and out.stat().st_mtime_ns == before
    # another camera, a changed image, or --force: recomputed
    for camera, extra in (("4", []), ("3", ["--force"])):
        assert cli.main([str(folder), *_argv(world, out, "--modality", "infrared", "--camera", camera, *extra)]) == 0
        assert "up to date" not in capsys.readouterr().out
    os.utime(folder / "p0.png", ns=(before, before + 10**9))
    assert cli.main([str(folder), *_argv(world, out, "--modality", "infrared", "--camera", "4")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_list_file_columns_give_each_image_its_labels(world, tmp_path, capsys):
    photos = world["photos"]
    lst = tmp_path / "queries.txt"
    lst.write_text(f"# path modality camera pid\n{photos / 'p0.png'} visible 2 17\n\n"
                   f"{photos / 'p1.png'} infrared - 18\n{photos / 'p2.png'}\n")
    out = tmp_path / "q.safetensors"
    assert cli.main([str(lst), *_argv(world, out, "--modality", "visible")]) == 0
    ff = load_features(out)
    assert [(it["modality"], it["camera"], it["pid"]) for it in ff.items] == [
        ("visible", 2, 17), ("infrared", None, 18), ("visible", None, None)]
    want = world["fx"]([photos / f"p{i}.png" for i in range(3)], ["visible", "infrared", "visible"], [2, 1, 1])
    assert (ff.features - want).abs().max() <= 1e-6
    lst.write_text(f"{photos / 'p0.png'} ultraviolet\n")
    assert cli.main([str(lst), *_argv(world, out)]) == 2
    _one_error_line(capsys, "queries.txt:1", "'ultraviolet'", "'visible' or 'infrared'")


def test_bad_inputs_are_one_error_line(world, tmp_path, capsys):
    photos = world["photos"]
    out = str(tmp_path / "f.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"garbage")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(world["path"].read_bytes()[:-10] + b"0123456789")
    (tmp_path / "damaged.pt.sha256").write_text(world["path"].with_name("model.pt.sha256").read_text())
    cases = [
        ([str(photos), "--model", str(world["path"]), "--out", out], ["--modality is required", "--modality visible"]),
        ([str(photos), "--modality", "rgb", "--model", str(world["path"]), "--out", out], ["--modality", "'rgb'"]),
        ([str(photos), "--modality", "visible", "--out", out], ["--model is required"]),
        ([str(photos), "--modality", "visible", "--model", str(world["path"])], ["--out is required"]),
        ([str(photos), "--modality", "visible", "--model", str(world["path"]), "--out", str(tmp_path / "f.pt")],
         ["--out", "f.pt", ".safetensors"]),
        ([str(photos), "--modality", "visible", "--model", str(tmp_path / "absent.pt"), "--out", out],
         ["model file not found", "absent.pt"]),
        ([str(photos), "--modality", "visible", "--model", str(damaged), "--out", out],
         ["damaged.pt", "damaged.pt.sha256", "changed or is damaged"]),
        ([str(empty), "--modality", "visible", "--model", str(world["path"]), "--out", out],
         ["no images found in", "empty"]),
        ([str(tmp_path / "nowhere"), "--modality", "visible", "--model", str(world["path"]), "--out", out],
         ["input not found", "nowhere"]),
        ([str(junk), "--modality", "visible", "--model", str(world["path"]), "--out", out],
         ["none of the 1 images could be read", "a.png"]),
        ([str(photos), "--modality", "visible", "--camera", "9", "--model", str(world["path"]), "--out", out],
         ["camera 9", "6 cameras"]),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(photos), "--modality", "visible", "--model", str(world["path"]), "--out", out, "--device",
                       "cuda"], ["device cuda", "no CUDA GPU"]))
    for argv, needles in cases:
        assert cli.main(argv) == 2, argv
        _one_error_line(capsys, *needles)
    assert not Path(out).exists()


def test_wrong_size_images_are_resized_with_one_warning(world, tmp_path, capsys):
    folder = tmp_path / "odd"
    rng = np.random.default_rng(2)
    for i in range(3):
        _noise(folder / f"o{i}.jpg", (200, 90), False, rng)
    out = tmp_path / "odd.safetensors"
    assert cli.main([str(folder), *_argv(world, out, "--modality", "visible")]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("warning:")] == [
        f"warning: {folder / 'o0.jpg'} is 200x90 (HxW), not the model's 128x64 input: resizing it, and any other "
        "such image, bicubic as evaluation does (warned once)"]
    assert "error" not in captured.err and "3 resized to 128x64" in captured.out
    assert load_features(out).features.shape == (3, world["fx"].dim)
