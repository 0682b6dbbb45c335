"""Never destroy a user's data: the demo's synthetic preparation, make_shards --out, sample keys, index paths."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mip_dist.config import ConfigError, load_config
from mip_dist.data.layouts import DatasetError, read_dataset
from mip_dist.data.shards import ShardError, read_index, write_shards
from test_data_layouts import make_llcm, make_regdb, make_sysu

REPO = Path(__file__).resolve().parent.parent


def _load(script: str):
    """A launch/ script as a module (its main() runs in this process)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / "launch" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _snapshot(folder: Path) -> dict:
    """relative path -> (sha256, size, mtime_ns) of every file under `folder`: equal means untouched."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                                               p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _real_shards(tmp_path: Path, name: str = "real") -> Path:
    """A folder of real (SYSU-layout) shards written by the shard writer."""
    out = tmp_path / name
    write_shards("sysu", str(make_sysu(tmp_path / f"{name}_tree")), str(out), workers=1, progress=False)
    return out


def _demo_cfg(tmp_path: Path, root: str, shards: Path):
    """The tiny config with data.dataset left at its default 'synthetic' and data.shards set by the user."""
    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.root={root}", f"data.shards={shards}", "data.synthetic_ids=4",
                        "data.synthetic_test_ids=2", "data.synthetic_images_per_camera=1",
                        f"train.output_dir={tmp_path / 'runs'}", "train.epochs=1"])


# ----------------------------------------------------------------------------------- case 1: demo preparation


def test_demo_refuses_shards_of_another_dataset_and_keeps_them(tmp_path):
    real = _real_shards(tmp_path)
    before = _snapshot(real)
    cfg = _demo_cfg(tmp_path, str(tmp_path / "syn"), real)
    with pytest.raises(ConfigError, match=rf"data\.shards: {real} holds sysu shards.*data\.dataset=sysu"):
        _load("train.py").preflight(cfg, 1, None)
    assert _snapshot(real) == before
    assert read_index(str(real))["dataset"] == "sysu"
    assert not (tmp_path / "syn").exists()  # nothing generated before the check


def test_demo_without_root_keeps_the_real_index(tmp_path):
    real = _real_shards(tmp_path)
    before = _snapshot(real)
    cfg = _demo_cfg(tmp_path, "", real)
    with pytest.raises(ConfigError, match=rf"{real} holds sysu shards"):
        _load("train.py").preflight(cfg, 1, None)
    assert _snapshot(real) == before and (real / "index.json").is_file()


def test_demo_refuses_a_root_holding_a_real_dataset_tree(tmp_path):
    tree = make_regdb(tmp_path / "RegDB")
    before = _snapshot(tree)
    cfg = _demo_cfg(tmp_path, str(tree), tmp_path / "sh")
    with pytest.raises(ConfigError, match=rf"data\.root: {tree} holds a regdb dataset tree.*data\.dataset=regdb"):
        _load("train.py").preflight(cfg, 1, None)
    assert _snapshot(tree) == before
    assert not (tmp_path / "sh").exists()


def test_demo_refuses_a_non_empty_shards_folder_without_index(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train-000000.tar").write_bytes(b"someone's shard")
    cfg = _demo_cfg(tmp_path, str(tmp_path / "syn"), folder)
    with pytest.raises(ConfigError, match=rf"data\.shards: {folder} .*no index\.json"):
        _load("train.py").preflight(cfg, 1, None)
    assert (folder / "train-000000.tar").read_bytes() == b"someone's shard"


def test_train_cli_exits_2_with_one_error_line_and_touches_nothing(tmp_path):
    real = _real_shards(tmp_path)
    before = _snapshot(real)
    r = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", f"data.shards={real}",
                        f"data.root={tmp_path / 'syn'}", "data.synthetic_ids=4", "data.synthetic_test_ids=2",
                        "data.synthetic_images_per_camera=1", f"train.output_dir={tmp_path / 'runs'}",
                        "train.epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(real) in lines[0] and "data.dataset" in lines[0]
    assert _snapshot(real) == before and not (tmp_path / "runs").exists()


def test_demo_remakes_its_own_shards_after_a_setting_change(tmp_path):
    import dataclasses

    from mip_dist.demo.prepare import ensure_synthetic_shards, synthetic_shards_ready

    cfg = _demo_cfg(tmp_path, str(tmp_path / "syn"), tmp_path / "sh").data
    cfg = dataclasses.replace(cfg, img_size=(32, 16))
    first = ensure_synthetic_shards(cfg, workers=1, progress=False)
    bigger = dataclasses.replace(cfg, synthetic_ids=5)
    assert not synthetic_shards_ready(bigger)
    second = ensure_synthetic_shards(bigger, workers=1, progress=False)
    assert synthetic_shards_ready(bigger) and second["num_classes"] == 5 != first["num_classes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sh", "syn"]  # no temporary folders left


# ----------------------------------------------------------------------------------- case 2: make_shards --out


def _make_shards(capsys, *args: str) -> tuple[int, str, str]:
    """Run launch/make_shards.py in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = _load("make_shards.py").main([*args, "--workers", "1", "--quiet"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_make_shards_refuses_an_out_holding_another_dataset(tmp_path, capsys):
    regdb, sysu, out = make_regdb(tmp_path / "regdb"), make_sysu(tmp_path / "sysu"), tmp_path / "out"
    assert _make_shards(capsys, "--dataset", "regdb", "--root", str(regdb), "--out", str(out))[0] == 0
    before = _snapshot(out)
    code, _, err = _make_shards(capsys, "--dataset", "sysu", "--root", str(sysu), "--out", str(out))
    line = _one_error_line(err)
    assert code == 2 and str(out) in line and "regdb shards of RegDB split 1" in line and "--overwrite" in line
    assert _snapshot(out) == before


def test_make_shards_refuses_other_settings_and_stays_idempotent(tmp_path, capsys):
    sysu, out = make_sysu(tmp_path / "sysu"), tmp_path / "out"
    assert _make_shards(capsys, "--dataset", "sysu", "--root", str(sysu), "--out", str(out))[0] == 0
    before = _snapshot(out)
    assert _make_shards(capsys, "--dataset", "sysu", "--root", str(sysu), "--out", str(out))[0] == 0
    assert _snapshot(out) == before  # unchanged input: nothing rewritten
    code, _, err = _make_shards(capsys, "--dataset", "sysu", "--root", str(sysu), "--out", str(out), "--seed", "1")
    assert code == 2 and "sysu shards" in _one_error_line(err)
    assert _snapshot(out) == before


def test_make_shards_overwrite_replaces_and_leaves_no_temporary_folder(tmp_path, capsys):
    regdb, sysu, out = make_regdb(tmp_path / "regdb"), make_sysu(tmp_path / "sysu"), tmp_path / "out"
    assert _make_shards(capsys, "--dataset", "regdb", "--root", str(regdb), "--out", str(out))[0] == 0
    code, _, err = _make_shards(capsys, "--dataset", "sysu", "--root", str(sysu), "--out", str(out), "--overwrite")
    assert code == 0, err
    index = read_index(str(out))
    assert index["dataset"] == "sysu"
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json", *(s["name"] for s in index["shards"])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "regdb", "sysu"]


def test_interrupted_overwrite_leaves_the_old_shards_intact(tmp_path, capsys, monkeypatch):
    import mip_dist.data.shards as shards

    regdb, sysu, out = make_regdb(tmp_path / "regdb"), make_sysu(tmp_path / "sysu"), tmp_path / "out"
    assert _make_shards(capsys, "--dataset", "regdb", "--root", str(regdb), "--out", str(out))[0] == 0
    before = _snapshot(out)
    real_write, calls = shards._write_one_shard, []

    def dies_on_second_shard(path, items):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")
        return real_write(path, items)

    monkeypatch.setattr(shards, "_write_one_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _load("make_shards.py").main(["--dataset", "sysu", "--root", str(sysu), "--out", str(out), "--overwrite",
                                      "--max-shard-samples", "5", "--workers", "1", "--quiet"])
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "regdb", "sysu"]


def test_files_added_to_out_during_a_write_are_kept(tmp_path, capsys, monkeypatch):
    import mip_dist.data.shards as shards

    regdb, sysu, out = make_regdb(tmp_path / "regdb"), make_sysu(tmp_path / "sysu"), tmp_path / "out"
    assert _make_shards(capsys, "--dataset", "regdb", "--root", str(regdb), "--out", str(out))[0] == 0
    real_check = shards._check_all

    def user_writes_meanwhile(*args, **kwargs):
        (out / "notes.txt").write_text("written during the run")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(shards, "_check_all", user_writes_meanwhile)
    assert _make_shards(capsys, "--dataset", "sysu", "--root", str(sysu), "--out", str(out), "--overwrite")[0] == 0
    assert read_index(str(out))["dataset"] == "sysu"
    (kept,) = tmp_path.glob(".out.old-*")
    assert (kept / "notes.txt").read_text() == "written during the run"


def test_make_shards_never_replaces_files_that_are_not_shards(tmp_path, capsys):
    sysu, out = make_sysu(tmp_path / "sysu"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for extra in ((), ("--overwrite",)):
        code, _, err = _make_shards(capsys, "--dataset", "sysu", "--root", str(sysu), "--out", str(out), *extra)
        assert code == 2 and "notes.txt" in _one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


# ----------------------------------------------------------------------------------- case 9: unique keys


def _tar_keys(out: Path, index: dict, split: str) -> list[str]:
    """Sample keys of every member of the split's shards, duplicates kept."""
    keys = []
    for s in index["shards"]:
        if s["split"] == split:
            with tarfile.open(out / s["name"]) as tar:
                keys += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


def _alike_names(root: Path, names=("__1.jpg", "ä.jpg", "ö.jpg")) -> None:
    """Distinct images whose names sanitise to colliding keys, in a test folder and a train folder."""
    for i, name in enumerate(names):
        for folder in (root / "cam1" / "0004", root / "cam2" / "0001"):
            Image.effect_noise((4, 8), 30 + 25 * i).convert("RGB").save(folder / name)


def test_names_that_sanitise_alike_get_distinct_stable_keys(tmp_path):
    root = make_sysu(tmp_path / "sysu", per_cam=1)
    _alike_names(root)
    out = tmp_path / "out"
    index = write_shards("sysu", str(root), str(out), workers=1, progress=False)
    for split in ("train", "test"):
        keys = _tar_keys(out, index, split)
        assert len(keys) == len(set(keys)), f"duplicate {split} keys"
    test_keys = [r["key"] for r in index["test_records"]]
    assert len(test_keys) == len(set(test_keys))
    by_key = {}
    for s in index["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    by_key[m.name[:-4]] = tar.extractfile(m).read()
    for r in index["test_records"]:  # each record's key finds its own image
        assert by_key[r["key"]] == (root / r["path"]).read_bytes(), r["path"]
    # stable: a key depends on its own path, not on which other names happen to be present
    root2 = make_sysu(tmp_path / "sysu2", per_cam=1)
    _alike_names(root2, ("ä.jpg", "ö.jpg"))
    other = write_shards("sysu", str(root2), str(tmp_path / "out2"), workers=1, progress=False)
    key_of = lambda idx: {r["path"]: r["key"] for r in idx["test_records"]}  # noqa: E731
    assert key_of(other)["cam1/0004/ä.jpg"] == key_of(index)["cam1/0004/ä.jpg"]


def test_read_index_refuses_duplicate_test_keys(tmp_path, capsys):
    out = _real_shards(tmp_path)
    index = json.loads((out / "index.json").read_text())
    index["test_records"][1]["key"] = index["test_records"][0]["key"]  # as written by the old key scheme
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=rf"index\.json: .*key {index['test_records'][0]['key']!r}"):
        read_index(str(out))
    # the advice in the message works: the same input and settings are rewritten, not "up to date"
    assert _make_shards(capsys, "--dataset", "sysu", "--root", str(tmp_path / "real_tree"), "--out", str(out),
                        "--overwrite")[0] == 0
    assert len({r["key"] for r in read_index(str(out))["test_records"]}) == len(index["test_records"])


def test_training_on_shards_with_duplicate_test_keys_fails_in_preflight(tmp_path):
    out = _real_shards(tmp_path)
    index = json.loads((out / "index.json").read_text())
    index["test_records"][1]["key"] = index["test_records"][0]["key"]
    (out / "index.json").write_text(json.dumps(index))
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.dataset=sysu", f"data.shards={out}",
                                                       f"train.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"data\.shards: .*index\.json: test_records hold key"):
        _load("train.py").preflight(cfg, 1, None)


def test_make_shards_synthetic_refuses_a_real_tree(tmp_path, capsys):
    tree = make_sysu(tmp_path / "sysu")
    before = _snapshot(tree)
    code, _, err = _make_shards(capsys, "--dataset", "synthetic", "--root", str(tree), "--out", str(tmp_path / "o"))
    assert code == 2 and "not written by the synthetic generator" in _one_error_line(err)
    assert _snapshot(tree) == before and not (tmp_path / "o").exists()


def test_check_split_keys_refuses_duplicate_keys_across_shards(tmp_path):
    from mip_dist.data.shards import check_split_keys

    out = _real_shards(tmp_path)
    index = read_index(str(out))
    check_split_keys(str(out), "test", index)
    src = next(s for s in index["shards"] if s["split"] == "test")
    with tarfile.open(out / src["name"]) as tar, tarfile.open(out / "test-000009.tar", "w") as dup:
        for m in tar.getmembers()[:2]:  # one sample (image + json) under the same key
            dup.addfile(m, tar.extractfile(m))
    index["shards"].append({**src, "name": "test-000009.tar", "count": 1})
    with pytest.raises(ShardError, match=r"test-000009\.tar.*" + src["name"].replace(".", r"\.")):
        check_split_keys(str(out), "test", index)


def test_unchanged_test_shards_are_scanned_for_keys_once(tmp_path, monkeypatch):
    from mip_dist.data import shard_index

    out = _real_shards(tmp_path)
    index = read_index(str(out))
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(shard_index.tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for _ in range(3):  # e.g. one evaluation per epoch
        shard_index.check_split_keys(str(out), "test", index)
    tests = [s for s in index["shards"] if s["split"] == "test"]
    assert len(opened) == len(tests)
    src = out / tests[0]["name"]
    src.write_bytes(src.read_bytes())  # rewritten in place: a new modification time
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 1_000_000_000))
    shard_index.check_split_keys(str(out), "test", index)
    assert len(opened) == 2 * len(tests)


# ----------------------------------------------------------------------------------- case 10: paths in index files


@pytest.mark.parametrize("escape", ["../outside/x.bmp", "ABSOLUTE"])
def test_regdb_index_lines_outside_the_root_are_refused(tmp_path, capsys, escape):
    root = make_regdb(tmp_path / "regdb")
    outside = tmp_path / "outside" / "x.bmp"
    outside.parent.mkdir()
    Image.new("RGB", (4, 8), 10).save(outside)
    rel = str(outside) if escape == "ABSOLUTE" else escape
    idx = root / "idx" / "train_visible_1.txt"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([*lines, f"{rel} 0"]) + "\n")
    with pytest.raises(DatasetError, match=rf"train_visible_1\.txt:{len(lines) + 1}: {rel!r} .*outside"):
        read_dataset("regdb", str(root), regdb_split=1)
    code, _, err = _make_shards(capsys, "--dataset", "regdb", "--root", str(root), "--out", str(tmp_path / "out"))
    assert code == 2 and f"train_visible_1.txt:{len(lines) + 1}" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_llcm_index_lines_outside_the_root_are_refused(tmp_path):
    root = make_llcm(tmp_path / "llcm")
    Image.new("L", (4, 8), 10).save(tmp_path / "0001_c01_s1_f1_nir.jpg")
    idx = root / "idx" / "train_nir.txt"
    idx.write_text(idx.read_text() + "nir/../../0001_c01_s1_f1_nir.jpg 0\n")
    with pytest.raises(DatasetError, match=r"train_nir\.txt:5: 'nir/\.\./\.\./0001_c01_s1_f1_nir\.jpg' .*outside"):
        read_dataset("llcm", str(root))
