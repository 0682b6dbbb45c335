"""Shard writer: round trip (every record once, bytes identical), index schema, idempotence, corrupt images."""
import hashlib
import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mip_dist.data.grouping import image_key
from mip_dist.data.layouts import read_dataset, relative_path
from mip_dist.data.shards import ShardError, check_regdb_split, read_index, sample_key, write_shards
from test_data_layouts import make_regdb, make_sysu

INDEX_KEYS = {"version", "dataset", "regdb_split", "counts", "identity_map", "num_classes", "num_cameras",
              "shards", "test_records", "skipped", "fingerprint", "train_layout"}


def _read_tars(out: Path, index: dict) -> dict[str, dict]:
    """key -> {ext: bytes, "json": dict, "shard": name} over every shard of the index."""
    samples: dict[str, dict] = {}
    for s in index["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            members = tar.getmembers()
            assert len(members) == 2 * s["count"]
            for m in members:
                key, ext = m.name.split(".", 1)
                entry = samples.setdefault(key, {"shard": s["name"]})
                assert entry["shard"] == s["name"], f"{key} split across shards"
                data = tar.extractfile(m).read()
                entry[ext] = json.loads(data) if ext == "json" else data
    return samples


def _originals(samples: dict[str, dict]) -> dict[str, dict]:
    """The samples without chunk padding, after checking each padding copy (key~n) repeats its image."""
    repeats = {k: v for k, v in samples.items() if k != image_key(k)}
    for k, v in repeats.items():
        original = samples[image_key(k)]
        assert {e: b for e, b in v.items() if e not in ("json", "shard")} == \
            {e: b for e, b in original.items() if e not in ("json", "shard")}
        assert v["json"] == {**original["json"], "key": k}
    return {k: v for k, v in samples.items() if k not in repeats}


def _noisy_sysu(root: Path) -> Path:
    """SYSU tree whose images differ (so byte identity is meaningful), 6 train ids, 2 test ids."""
    make_sysu(root, train=(1, 2, 3, 4), val=(5, 6), test=(7, 8), per_cam=2)
    for i, p in enumerate(sorted(root.rglob("*.jpg"))):
        Image.effect_noise((16, 32), 20 + i % 50).convert("L" if p.parent.parent.name in ("cam3", "cam6") else "RGB")\
            .save(p, quality=80 + i % 15)
    return root


def test_sysu_round_trip_every_record_once_bytes_identical(tmp_path):
    root = _noisy_sysu(tmp_path / "sysu")
    out = tmp_path / "shards"
    index = write_shards("sysu", str(root), str(out), max_shard_samples=7, workers=2, progress=False,
                         chunk_instances=2)
    assert set(index) == INDEX_KEYS and index["version"] == 2 and index["regdb_split"] is None
    assert index["train_layout"] == {"kind": "identity_chunks", "chunk_instances": 2}
    records = read_dataset("sysu", str(root))
    samples = _read_tars(out, index)
    samples = _originals(samples)
    assert len(samples) == len(records)  # every record once, plus padding copies of training images
    train_pids = sorted({r.pid for r in records if r.split == "train"})
    assert index["identity_map"] == {str(p): i for i, p in enumerate(train_pids)}
    assert index["num_classes"] == 6 and index["num_cameras"] == 6
    for r in records:
        rel = relative_path(r, str(root))
        s = samples[sample_key(rel)]
        assert s["jpg"] == Path(r.path).read_bytes()
        meta = s["json"]
        assert meta == {"pid": r.pid, "camera": r.camera, "modality": r.modality, "path": rel,
                        "key": sample_key(rel), "label": index["identity_map"][str(r.pid)] if r.split == "train" else -1}
        assert s["shard"].startswith(r.split)
    counts = index["counts"]
    assert counts["train"]["total"] == 6 * 12 and counts["test"]["total"] == 2 * 12
    assert counts["train"]["by_modality"] == {"infrared": 6 * 4, "visible": 6 * 8}
    assert counts["test"]["by_camera"] == {str(c): 4 for c in range(1, 7)}
    assert {t["key"] for t in index["test_records"]} == {k for k, s in samples.items() if s["shard"].startswith("test")}
    for shard in index["shards"]:
        assert shard["count"] <= 7
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    # training order is shuffled (not the reader's order) but seeded
    train_keys = [k for s in index["shards"] if s["split"] == "train" for k in _tar_keys(out / s["name"])]
    reader_order = [sample_key(relative_path(r, str(root))) for r in records if r.split == "train"]
    assert sorted({image_key(k) for k in train_keys}) == sorted(reader_order) and train_keys != reader_order
    other = write_shards("sysu", str(root), str(tmp_path / "seed1"), max_shard_samples=7, seed=1, workers=1,
                         progress=False, chunk_instances=2)
    assert [k for s in other["shards"] if s["split"] == "train" for k in _tar_keys(tmp_path / "seed1" / s["name"])] \
        != train_keys


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]


def test_regdb_bmp_round_trip_and_size_bound(tmp_path):
    root = make_regdb(tmp_path / "regdb", n_ids=6, per_mod=3)
    for p in root.rglob("*.bmp"):  # 6 kB each
        Image.effect_noise((32, 64), 30).convert("L" if "Thermal" in p.parts else "RGB").save(p)
    out = tmp_path / "shards"
    bound = 40_000
    index = write_shards("regdb", str(root), str(out), regdb_split=2, max_shard_bytes=bound, workers=1,
                         progress=False, chunk_instances=1)  # chunks of 2 images (12 kB) fit the bound
    assert index["regdb_split"] == 2 and index["num_cameras"] == 2
    samples = _originals(_read_tars(out, index))
    records = read_dataset("regdb", str(root), 2)
    assert len(samples) == len(records)
    for r in records:
        assert samples[sample_key(relative_path(r, str(root)))]["bmp"] == Path(r.path).read_bytes()
    sizes = [(out / s["name"]).stat().st_size for s in index["shards"]]
    assert len(sizes) >= 4 and max(sizes) <= -(-bound // 10240) * 10240  # rounded up to tar's 10 KiB record
    check_regdb_split(read_index(str(out)), 2, str(out))
    with pytest.raises(ShardError, match=r"data.regdb_split=1, but the shards .* hold RegDB split 2"):
        check_regdb_split(read_index(str(out)), 1, str(out))


def test_idempotent_same_bytes_and_skips_unchanged_input(tmp_path, caplog):
    root = _noisy_sysu(tmp_path / "sysu")
    a, b = tmp_path / "a", tmp_path / "b"
    ia = write_shards("sysu", str(root), str(a), max_shard_samples=10, workers=2, progress=False)
    ib = write_shards("sysu", str(root), str(b), max_shard_samples=10, workers=1, progress=False)
    assert ia == ib and (a / "index.json").read_bytes() == (b / "index.json").read_bytes()
    for s in ia["shards"]:
        assert (a / s["name"]).read_bytes() == (b / s["name"]).read_bytes()
    stamp = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    with caplog.at_level(logging.INFO, logger="mip_dist.data.shards"):
        assert write_shards("sysu", str(root), str(a), max_shard_samples=10, progress=False) == ia
    assert "up to date" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == stamp  # nothing rewritten
    # new parameters: rewritten, and shards of the old, larger layout are removed
    ic = write_shards("sysu", str(root), str(a), max_shard_samples=40, progress=False)
    assert ic["fingerprint"] != ia["fingerprint"]
    assert sorted(p.name for p in a.glob("*.tar")) == sorted(s["name"] for s in ic["shards"])


def test_undecodable_images_are_reported_and_excluded(tmp_path, caplog):
    root = _noisy_sysu(tmp_path / "sysu")
    bad = root / "cam2" / "0003" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG
    (root / "cam6" / "0008" / "0002.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="mip_dist.data.shards"):
        index = write_shards("sysu", str(root), str(tmp_path / "out"), workers=2, progress=False)
    assert sorted(s["path"] for s in index["skipped"]) == ["cam2/0003/0001.jpg", "cam6/0008/0002.jpg"]
    assert all(s["reason"] for s in index["skipped"])
    assert "cam2/0003/0001.jpg" in caplog.text
    samples = _originals(_read_tars(tmp_path / "out", index))
    assert sample_key("cam2/0003/0001.jpg") not in samples and len(samples) == 8 * 12 - 2
    assert index["counts"]["test"]["total"] == 23
    assert "cam6_0008_0002" not in {t["key"] for t in index["test_records"]}


def test_read_index_errors_name_the_file(tmp_path):
    with pytest.raises(ShardError, match=r"no index\.json in .*nothing"):
        read_index(str(tmp_path / "nothing"))
    root = _noisy_sysu(tmp_path / "sysu")
    index = write_shards("sysu", str(root), str(tmp_path / "out"), workers=1, progress=False)
    assert read_index(str(tmp_path / "out")) == index
    (tmp_path / "out" / index["shards"][0]["name"]).unlink()
    with pytest.raises(ShardError, match=index["shards"][0]["name"] + ", which is missing"):
        read_index(str(tmp_path / "out"))


def test_make_shards_cli_generates_synthetic_and_shards(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_shards", Path(__file__).parent.parent / "launch" / "make_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--dataset", "synthetic", "--root", str(tmp_path / "syn"), "--out", str(tmp_path / "sh"),
            "--synthetic-ids", "4", "--synthetic-test-ids", "2", "--synthetic-images-per-camera", "1",
            "--workers", "1", "--quiet"]
    assert mod.main(args) == 0
    out = capsys.readouterr().out
    assert "24 train images (4 identities)" in out and "12 test images" in out
    assert read_index(str(tmp_path / "sh"))["dataset"] == "synthetic"


def test_training_shards_hold_identity_chunks(tmp_path):
    """Every training shard is a run of chunks of K visible then K infrared images of one identity,
    distinct within the chunk; shards are cut between chunks; index.json counts each shard's identities."""
    root = _noisy_sysu(tmp_path / "sysu")
    out = tmp_path / "shards"
    k = 2
    index = write_shards("sysu", str(root), str(out), max_shard_samples=9, workers=1, progress=False,
                         chunk_instances=k)
    labels_seen = set()
    for shard in (s for s in index["shards"] if s["split"] == "train"):
        samples = _read_tars(out, {"shards": [shard]})
        metas = [samples[key]["json"] for key in _tar_keys(out / shard["name"])]
        assert len(metas) % (2 * k) == 0 and len(metas) <= 8  # whole chunks only, under the bound of 9
        counted: dict[str, list[int]] = {}
        for c in range(0, len(metas), 2 * k):
            chunk = metas[c:c + 2 * k]
            assert len({m["label"] for m in chunk}) == 1
            assert [m["modality"] for m in chunk] == [1] * k + [0] * k  # visible first, then infrared
            assert len({image_key(m["key"]) for m in chunk}) == 2 * k  # distinct images within a chunk
            labels_seen.add(chunk[0]["label"])
            for m in chunk:
                counted.setdefault(str(m["label"]), [0, 0])[m["modality"]] += 1
        assert shard["identities"] == counted
    assert labels_seen == set(range(index["num_classes"]))


def test_write_progress_counts_images_and_padding_copies_apart(tmp_path, capsys):
    """The bar ends at images/images with the padding copies beside it (it read 1398img of 1063 before)."""
    root = make_sysu(tmp_path / "sysu")
    index = write_shards("sysu", str(root), str(tmp_path / "out"), workers=1, progress=True, chunk_instances=4)
    images = sum(index["counts"][split]["total"] for split in ("train", "test"))
    samples = sum(s["count"] for s in index["shards"])
    assert samples > images  # the fixture pads: the case the bar got wrong
    final = [part for part in capsys.readouterr().err.split("\r") if "writing shards" in part][-1]
    assert f"{images}/{images}" in final and f"padding_copies={samples - images}" in final, final
