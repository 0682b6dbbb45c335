"""Several datasets in one run: one label space, each dataset's own cameras, weighted identity draws, resume."""
import collections
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import same_batches, take_batches

from mip_dist.config import DataConfig, ShardSource
from mip_dist.data.batch import check_batch
from mip_dist.data.pk_batch import allot_identities
from mip_dist.data.records import INFRARED, VISIBLE
from mip_dist.data.shard_reader import DataError
from mip_dist.data.shards import read_index, write_shards
from mip_dist.data.sources import label_space, resolve_sources
from mip_dist.data.stream import build_train_stream
from mip_dist.demo.synthetic import generate_synthetic

P, K = 4, 2
B = P * 2 * K
IDS = {"a": 12, "b": 8}  # training identities of the two synthetic "datasets"


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> dict[str, Path]:
    """Two synthetic shard sets from different seeds: 12 and 8 training ids, 6 cameras, uneven shards."""
    base = tmp_path_factory.mktemp("sources")
    out = {}
    for (name, ids), seed, cap in zip(IDS.items(), (1, 2), (41, 33)):
        root = generate_synthetic(str(base / f"syn_{name}"), num_train_ids=ids, num_test_ids=2, images_per_camera=2,
                                  img_size=(64, 32), seed=seed, workers=2)
        write_shards("synthetic", str(root), str(base / name), max_shard_samples=cap, workers=2, progress=False,
                     chunk_instances=K)
        out[name] = base / name
    return out


def cfg(sets: dict[str, Path], weights=(1.0, 1.0), **kw) -> DataConfig:
    base = dict(shards=[ShardSource(path=str(sets[n]), weight=w) for n, w in zip(IDS, weights)], batch_size=B,
                num_instances=K, img_size=(64, 32), workers=0, buffer_size=48, max_error_rate=0.0)
    base.update(kw)
    return DataConfig(**base)


def shard_meta(folder: Path) -> dict[tuple[str, str], dict]:
    """(shard path, sample key) -> the sample's json, read straight from the tars."""
    meta = {}
    for s in read_index(str(folder))["shards"]:
        if s["split"] != "train":
            continue
        with tarfile.open(folder / s["name"]) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta[(str(folder / s["name"]), m.name[:-5])] = json.loads(tar.extractfile(m).read())
    return meta


def test_label_space_offsets_identities_and_cameras(two_sets):
    num_classes, num_cameras, sources = label_space(cfg(two_sets))
    assert (num_classes, num_cameras) == (12 + 8, 6 + 6)
    assert [(s.name, s.dataset, s.label_offset, s.camera_offset, s.num_classes, s.num_cameras) for s in sources] == [
        ("a", "synthetic", 0, 0, 12, 6), ("b", "synthetic", 12, 6, 8, 6)]
    index_b = read_index(str(two_sets["b"]))
    assert sources[1].total_images == index_b["counts"]["train"]["total"]
    one = label_space(DataConfig(shards=str(two_sets["b"])))  # a plain folder: one source, its own labels
    assert one[:2] == (8, 6) and (one[2][0].label_offset, one[2][0].camera_offset) == (0, 0)
    twice = DataConfig(shards=[ShardSource(path=str(two_sets["a"])), ShardSource(path=str(two_sets["a"]), name="x")])
    with pytest.raises(DataError, match=r"data\.shards\[1\]: .* is already listed as dataset 'a'"):
        resolve_sources(twice)


def test_batches_relabel_identities_and_keep_each_datasets_cameras(two_sets):
    meta = {**shard_meta(two_sets["a"]), **shard_meta(two_sets["b"])}
    num_classes, num_cameras, _ = label_space(cfg(two_sets))
    stream = build_train_stream(cfg(two_sets), seed=0, rank=0, world_size=1)
    index = {n: read_index(str(two_sets[n])) for n in IDS}
    assert stream.steps_per_epoch == sum(i["counts"]["train"]["total"] for i in index.values()) // B
    from_b = 0
    for batch in stream:
        check_batch(batch, num_classes, num_cameras)  # the trainer's range check on the joint spaces
        pid, cam, mod = batch["pid"].tolist(), batch["camera"].tolist(), batch["modality"].tolist()
        assert mod == [VISIBLE] * (B // 2) + [INFRARED] * (B // 2)
        ids = [pid[i * K] for i in range(P)]
        assert len(set(ids)) == P and [pid[B // 2 + i * K] for i in range(P)] == ids
        for i, (shard, key) in enumerate(zip(batch["shard"], batch["key"])):
            m = meta[(shard, key)]
            in_b = shard.startswith(str(two_sets["b"]))
            from_b += in_b
            assert pid[i] == m["label"] + (12 if in_b else 0)
            assert cam[i] == m["camera"] - 1 + (6 if in_b else 0)  # SIE sees dataset b's cameras as 6..11
            assert (m["camera"] in (3, 6)) == (mod[i] == INFRARED)
    assert from_b > 0


def test_identities_are_drawn_in_proportion_to_the_weights(two_sets):
    rng = np.random.default_rng(0)
    counts = np.array([allot_identities(8, [3.0, 1.0, 4.0], [None, None, None], rng) for _ in range(4000)])
    assert (counts.sum(axis=1) == 8).all()
    np.testing.assert_allclose(counts.sum(axis=0) / counts.sum(), [3 / 8, 1 / 8, 4 / 8], atol=0.01)
    capped = [allot_identities(8, [1.0, 100.0], [None, 3], rng) for _ in range(50)]
    assert all(c == [5, 3] for c in capped)  # a dataset never gives more identities than it holds
    with pytest.raises(DataError, match="hold 5 identities, fewer than the 8"):
        allot_identities(8, [1.0, 1.0], [2, 3], rng)
    assert allot_identities(8, [2.5], [None], rng) == [8]

    # the stream itself, with the small dataset weighted 3:1, so it is read up and starts new passes mid-epoch
    stream = build_train_stream(cfg(two_sets, weights=(1.0, 3.0), steps_per_epoch=30), seed=1, rank=0, world_size=1)
    per_set = collections.Counter()
    for batch in stream:
        for i in range(P):
            per_set["b" if batch["pid"][i * K] >= 12 else "a"] += 1
    assert sum(per_set.values()) == 30 * P
    assert 0.65 <= per_set["b"] / (30 * P) <= 0.85  # expected 0.75 (binomial sd 0.04)


def test_restore_is_exact_with_two_datasets(two_sets):
    c = cfg(two_sets, weights=(2.0, 1.0), workers=2, steps_per_epoch=7)
    ref = build_train_stream(c, seed=11, rank=0, world_size=1)
    epoch0, epoch1 = take_batches(ref), take_batches(ref)
    first = build_train_stream(c, seed=11, rank=0, world_size=1)
    assert same_batches(take_batches(first, 3), epoch0[:3])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_train_stream(c, seed=11, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert same_batches(take_batches(resumed), epoch0[3:])
    assert same_batches(take_batches(resumed), epoch1)
    assert {p >= 12 for b in epoch0 for p in b["pid"].tolist()} == {False, True}


def test_two_ranks_two_workers_two_uneven_datasets_yield_equal_counts(two_sets):
    sizes = [s["count"] for n in IDS for s in read_index(str(two_sets[n]))["shards"] if s["split"] == "train"]
    assert len(set(sizes)) > 1
    c = cfg(two_sets, weights=(1.0, 2.0), workers=2)
    counts = []
    for rank in (0, 1):
        stream = build_train_stream(c, seed=3, rank=rank, world_size=2)
        counts.append(sum(1 for _ in stream))
        assert stream.state_dict()["epoch"] == 1
    assert counts[0] == counts[1] == stream.steps_per_epoch > 0
