"""Dataset readers on fabricated trees in the exact SYSU-MM01 / RegDB / LLCM layouts, quirks included."""
import logging
from pathlib import Path

import pytest
from PIL import Image

from mip_dist.data.layouts import DatasetError, ReadReport, read_dataset
from mip_dist.data.records import INFRARED, VISIBLE


def _img(path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 8), 128).save(path)


def make_sysu(root: Path, train=(1, 2), val=(3,), test=(4, 5), per_cam=2, skip=()) -> Path:
    """SYSU tree: cam1..cam6/{pid:04d}/{n:04d}.jpg; `skip` = (pid, cam) folders left out."""
    (root / "exp").mkdir(parents=True)
    for name, ids in (("train_id", train), ("val_id", val), ("test_id", test)):
        (root / "exp" / f"{name}.txt").write_text(",".join(str(i) for i in ids) + "\n")
    for pid in (*train, *val, *test):
        for cam in range(1, 7):
            if (pid, cam) in skip:
                continue
            for n in range(per_cam):
                _img(root / f"cam{cam}" / f"{pid:04d}" / f"{n + 1:04d}.jpg", "L" if cam in (3, 6) else "RGB")
    for cam in range(1, 7):
        (root / f"cam{cam}").mkdir(exist_ok=True)
    return root


def make_regdb(root: Path, n_ids=6, per_mod=2, splits=(1, 2)) -> Path:
    """RegDB tree: Visible/, Thermal/, idx/{train,test}_{visible,thermal}_{t}.txt."""
    for pid in range(n_ids):
        for n in range(per_mod):
            _img(root / "Visible" / str(pid) / f"v_{pid}_{n}.bmp")
            _img(root / "Thermal" / str(pid) / f"t_{pid}_{n}.bmp", "L")
    (root / "idx").mkdir()
    for t in splits:
        order = list(range(n_ids))[t % n_ids:] + list(range(n_ids))[:t % n_ids]
        parts = {"train": order[: n_ids // 2], "test": order[n_ids // 2:]}
        for part, ids in parts.items():
            for folder, mod in (("Visible", "visible"), ("Thermal", "thermal")):
                pre = folder[0].lower()
                lines = [f"{folder}/{pid}/{pre}_{pid}_{n}.bmp {pid}" for pid in ids for n in range(per_mod)]
                (root / "idx" / f"{part}_{mod}_{t}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_llcm(root: Path, train_ids=(1, 2), test_ids=(7, 8)) -> Path:
    """LLCM tree: idx/train_{vis,nir}.txt with '<pid>_c<cam>_...' names, test_{vis,nir}/cam*/{pid:04d}/."""
    (root / "idx").mkdir(parents=True)
    for sub, mod in (("vis", "vis"), ("nir", "nir")):
        lines = []
        for label, pid in enumerate(train_ids):
            for cam in (1, 2):
                rel = f"{sub}/{pid:04d}/{pid:04d}_c{cam:02d}_s1_f{cam}_{mod}.jpg"
                _img(root / rel)
                lines.append(f"{rel} {label}")
        (root / "idx" / f"train_{sub}.txt").write_text("\n".join(lines) + "\n")
    (root / "idx" / "test_id.txt").write_text(",".join(str(i) for i in test_ids))
    for pid in test_ids:
        _img(root / "test_vis" / "cam1" / f"{pid:04d}" / "a.jpg")
        _img(root / "test_vis" / "cam9" / f"{pid:04d}" / "b.jpg")
        _img(root / "test_nir" / "cam4" / f"{pid:04d}" / "c.jpg", "L")
    return root


def test_sysu_reader_splits_modalities_and_cameras(tmp_path):
    recs = read_dataset("sysu", str(make_sysu(tmp_path / "sysu")))
    train = [r for r in recs if r.split == "train"]
    test = [r for r in recs if r.split == "test"]
    assert {r.pid for r in train} == {1, 2, 3}  # train + val
    assert {r.pid for r in test} == {4, 5}
    assert len(recs) == 5 * 6 * 2
    for r in recs:
        assert (r.modality == INFRARED) == (r.camera in (3, 6))
        assert Path(r.path).is_absolute() and Path(r.path).parent.parent.name == f"cam{r.camera}"
    # "synthetic" is the same layout
    assert read_dataset("synthetic", str(tmp_path / "sysu")) == recs


def test_sysu_id_missing_in_a_camera_is_a_counted_warning(tmp_path, caplog):
    root = make_sysu(tmp_path / "sysu", skip={(2, 3), (2, 5), (4, 1)})
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="mip_dist.data.layouts"):
        recs = read_dataset("sysu", str(root), report=report)
    assert report.warning_count == 3
    assert sorted(report.missing_camera_folders) == [(2, 3), (2, 5), (4, 1)]
    assert "3 (identity, camera) folders are missing" in caplog.text
    assert not any(r.pid == 2 and r.camera == 3 for r in recs)


def test_sysu_id_without_any_image_is_an_error(tmp_path):
    root = make_sysu(tmp_path / "sysu", skip={(5, c) for c in range(1, 7)})
    with pytest.raises(DatasetError, match=r"test_id\.txt: identity 5 has no images"):
        read_dataset("sysu", str(root))


def test_sysu_missing_train_list_names_the_path(tmp_path):
    root = make_sysu(tmp_path / "sysu")
    (root / "exp" / "train_id.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing id list .*exp/train_id\.txt"):
        read_dataset("sysu", str(root))


def test_sysu_bad_line_names_path_and_line(tmp_path):
    root = make_sysu(tmp_path / "sysu")
    (root / "exp" / "val_id.txt").write_text("\n3,x7\n")
    with pytest.raises(DatasetError, match=r"exp/val_id\.txt:2: 'x7' is not an integer"):
        read_dataset("sysu", str(root))


def test_sysu_id_in_train_and_test_is_an_error(tmp_path):
    root = make_sysu(tmp_path / "sysu")
    (root / "exp" / "test_id.txt").write_text("4,5,1")
    with pytest.raises(DatasetError, match=r"\[1\].*test_id\.txt"):
        read_dataset("sysu", str(root))


def test_regdb_reader_any_split(tmp_path):
    root = make_regdb(tmp_path / "regdb")
    for split in (1, 2):
        recs = read_dataset("regdb", str(root), regdb_split=split)
        assert len(recs) == 6 * 2 * 2
        for r in recs:
            assert r.camera == (1 if r.modality == VISIBLE else 2)
            assert ("Visible" in r.path) == (r.modality == VISIBLE)
        train_ids = {r.pid for r in recs if r.split == "train"}
        test_ids = {r.pid for r in recs if r.split == "test"}
        assert len(train_ids) == 3 and not train_ids & test_ids
    assert {r.pid for r in read_dataset("regdb", str(root), 1) if r.split == "train"} != \
        {r.pid for r in read_dataset("regdb", str(root), 2) if r.split == "train"}


def test_regdb_errors_name_file_and_line(tmp_path):
    root = make_regdb(tmp_path / "regdb")
    with pytest.raises(DatasetError, match=r"train_visible_3\.txt"):
        read_dataset("regdb", str(root), regdb_split=3)
    idx = root / "idx" / "test_thermal_1.txt"
    lines = idx.read_text().splitlines()
    lines[2] = lines[2].replace(" ", "\t") + " extra"
    idx.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"test_thermal_1\.txt:3: expected 'relative/path label'"):
        read_dataset("regdb", str(root), regdb_split=1)
    lines[2] = "Thermal/0/nope.bmp 0"
    idx.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"test_thermal_1\.txt:3: image .*nope\.bmp does not exist"):
        read_dataset("regdb", str(root), regdb_split=1)


def test_llcm_reader(tmp_path):
    root = make_llcm(tmp_path / "llcm")
    recs = read_dataset("llcm", str(root))
    train = [r for r in recs if r.split == "train"]
    test = [r for r in recs if r.split == "test"]
    assert len(train) == 2 * 2 * 2 and {r.pid for r in train} == {0, 1}
    assert {r.camera for r in train} == {1, 2}
    assert {(r.camera, r.modality) for r in test} == {(1, VISIBLE), (9, VISIBLE), (4, INFRARED)}
    assert {r.pid for r in test} == {7, 8}


def test_llcm_errors(tmp_path):
    root = make_llcm(tmp_path / "llcm")
    (root / "idx" / "test_id.txt").write_text("7,8,9")
    with pytest.raises(DatasetError, match=r"test_id\.txt: identity 9 has no images"):
        read_dataset("llcm", str(root))
    (root / "idx" / "test_id.txt").write_text("7,8")
    (root / "idx" / "train_nir.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing index file .*train_nir\.txt"):
        read_dataset("llcm", str(root))


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'market'"):
        read_dataset("market", str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset("sysu", str(tmp_path / "nope"))
