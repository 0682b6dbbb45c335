"""Feature extraction (flip, camera indexing, ordering, 2-rank gather) and protocol evaluation from features."""
from __future__ import annotations

import os
import tempfile
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mip_dist.config import EvalConfig
from mip_dist.engine.evaluator import evaluate, evaluate_features, extract_features
from mip_dist.eval.metrics import pairwise_distance, rank_metrics
from mip_dist.eval.protocols import build_settings

SYSU_MODALITY = {1: 1, 2: 1, 3: 0, 4: 1, 5: 1, 6: 0}


class FakeReID(torch.nn.Module):
    """A tiny model with the MIP test interface: extract(images, modality, camera) -> L2-normalised [B, F]."""

    def __init__(self, dim: int = 12, num_cameras: int = 6):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 2, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 24, generator=gen))
            self.proj.bias.zero_()
        self.camera = torch.nn.Embedding(num_cameras, dim)
        self.modality = torch.nn.Embedding(2, dim)
        with torch.no_grad():  # same weights in every process
            self.camera.weight.copy_(torch.randn(num_cameras, dim, generator=gen))
            self.modality.weight.copy_(torch.randn(2, dim, generator=gen))
        self.drop = torch.nn.Dropout(0.5)  # must be off at test time
        self.cameras_seen: list[int] = []

    def extract(self, images, modality, camera):
        assert not self.training, "extract must run in eval mode"
        self.cameras_seen += camera.tolist()
        x = F.adaptive_avg_pool2d(images, (4, 2)).flatten(1)
        feat = self.drop(self.proj(x)) + 0.1 * self.camera(camera) + 0.1 * self.modality(modality)
        return F.normalize(feat, dim=1)


def sysu_like_index(n_ids: int = 6, per_cam: int = 3) -> dict:
    records = []
    for pid in range(1, n_ids + 1):
        for cam in range(1, 7):
            for n in range(per_cam):
                records.append({"key": f"c{cam}_{pid:04d}_{n}", "pid": pid, "camera": cam,
                                "modality": SYSU_MODALITY[cam], "path": f"/d/cam{cam}/{pid:04d}/{n}.jpg"})
    return {"dataset": "sysu", "test_records": records}


def image_of(record: dict) -> torch.Tensor:
    """A deterministic image per record: identity pattern + camera tint + noise seeded by the key."""
    gen = torch.Generator().manual_seed(zlib.crc32(record["key"].encode()))
    base = torch.Generator().manual_seed(record["pid"])
    img = torch.randn(3, 16, 8, generator=base) + 0.3 * torch.randn(3, 16, 8, generator=gen)
    img[:, :, :4] += 0.2 * record["camera"]  # asymmetric: the flip changes the feature
    return img


def fake_loader(records, batch_size=5, rank=0, world_size=1, duplicate_first=False):
    """Batches of this rank's share (records rank::world_size), optionally padded with a repeat."""
    share = records[rank::world_size]
    if duplicate_first:
        share = share + [records[0]]
    for s in range(0, len(share), batch_size):
        b = share[s:s + batch_size]
        yield {"images": torch.stack([image_of(r) for r in b]), "key": [r["key"] for r in b],
               "pid": torch.tensor([r["pid"] for r in b]), "camera": torch.tensor([r["camera"] for r in b]),
               "modality": torch.tensor([r["modality"] for r in b])}


def test_extract_orders_by_key_passes_zero_based_cameras_and_restores_mode():
    index = sysu_like_index(3, 2)
    records = index["test_records"][::-1]  # loader order differs from key order
    model = FakeReID()
    model.train()
    feats, keys = extract_features(model, fake_loader(records, 4), device="cpu")
    assert keys == sorted(r["key"] for r in records)
    assert feats.shape == (len(records), 12) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(records)))
    assert sorted(set(model.cameras_seen)) == [0, 1, 2, 3, 4, 5]
    assert model.training  # mode restored
    # each row is that key's image through the model
    by_key = {r["key"]: r for r in records}
    model.eval()
    r = by_key[keys[7]]
    one = model.extract(image_of(r)[None], torch.tensor([r["modality"]]), torch.tensor([r["camera"] - 1]))
    torch.testing.assert_close(feats[7], one[0])


def test_flip_averages_both_views():
    records = sysu_like_index(2, 2)["test_records"]
    model = FakeReID().eval()
    plain, _ = extract_features(model, fake_loader(records), device="cpu")
    flipped, keys = extract_features(model, fake_loader(records), device="cpu", flip=True)
    r = {x["key"]: x for x in records}[keys[3]]
    img, mod, cam = image_of(r)[None], torch.tensor([r["modality"]]), torch.tensor([r["camera"] - 1])
    expected = F.normalize(model.extract(img, mod, cam) + model.extract(img.flip(-1), mod, cam), dim=1)[0]
    torch.testing.assert_close(flipped[3], expected)
    assert not torch.allclose(flipped, plain)


def test_duplicates_are_counted_once():
    records = sysu_like_index(2, 2)["test_records"]
    feats, keys = extract_features(FakeReID(), fake_loader(records, duplicate_first=True), device="cpu")
    assert len(keys) == len(set(keys)) == len(records) and feats.shape[0] == len(records)


def test_evaluate_features_matches_direct_metrics():
    index = sysu_like_index(8, 12)
    records = index["test_records"]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(9, 16))
    feats = torch.tensor(np.stack([centres[r["pid"]] + 1.2 * rng.normal(size=16) for r in records]),
                         dtype=torch.float32)
    keys = [r["key"] for r in records]
    res = evaluate_features(feats, keys, index, ["sysu", "sysu_authors"], trials=3)
    settings = {s.name: s for s in build_settings(index, ["sysu", "sysu_authors"], trials=3)}
    assert set(settings) <= set(res)
    for name in ("all_single", "indoor_multi", "authors_all_single"):
        s = settings[name]
        per = []
        for g in s.galleries:
            d = pairwise_distance(feats[s.query], feats[g])
            per.append(rank_metrics(d, [records[i]["pid"] for i in s.query], [records[i]["pid"] for i in g],
                                    [records[i]["camera"] for i in s.query], [records[i]["camera"] for i in g],
                                    protocol=s.metric))
        r = res[name]
        assert r["trials"] == len(s.galleries) and r["seeds"] == s.seeds and r["metric"] == s.metric
        assert r["mAP"] == pytest.approx(100 * np.mean([m["mAP"] for m in per]), abs=1e-9)
        assert r["mAP_std"] == pytest.approx(100 * np.std([m["mAP"] for m in per]), abs=1e-9)
        assert r["mINP"] == pytest.approx(100 * np.mean([m["mINP"] for m in per]), abs=1e-9)
        for k in (1, 10, 20):
            assert r[f"R{k}"] == pytest.approx(100 * np.mean([m["cmc"][k - 1] for m in per]), abs=1e-9)
        assert res[f"{name}/mAP"] == r["mAP"] and len(r["cmc"]) == 20
    assert res["authors_all_single"]["trials"] == 1 and 0 < res["all_single"]["R1"] <= 100


def test_evaluate_features_perfect_features_and_missing_keys():
    index = sysu_like_index(5, 3)
    records = index["test_records"]
    feats = F.one_hot(torch.tensor([r["pid"] for r in records])).float()
    res = evaluate_features(feats, [r["key"] for r in records], index, ["sysu"], trials=2)
    for name in ("all_single", "all_multi", "indoor_single", "indoor_multi"):
        assert res[name]["R1"] == 100.0 and res[name]["mAP"] == 100.0 and res[name]["mINP"] == 100.0
    with pytest.raises(ValueError, match="have no feature"):
        evaluate_features(feats[:-1], [r["key"] for r in records][:-1], index, ["sysu"], trials=1)


def test_evaluate_runs_model_and_protocols_from_config():
    index = sysu_like_index(4, 3)
    cfg = EvalConfig(batch_size=7, flip=True, protocols=["sysu"], trials=2)
    res = evaluate(FakeReID(), None, cfg, index, device="cpu", loader=fake_loader(index["test_records"], 7))
    assert {"all_single/mAP", "indoor_multi/R1", "all_multi/mINP"} <= set(res)
    assert res["all_single"]["seeds"] == [0, 1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One CPU rank: extract this rank's share (rank 1 also re-yields an image) and save the gathered result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        records = sysu_like_index(3, 3)["test_records"]
        loader = fake_loader(records, 4, rank=rank, world_size=world, duplicate_first=rank == 1)
        feats, keys = extract_features(FakeReID(), loader, device="cpu", flip=True)
        torch.save({"feats": feats, "keys": keys}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_cpu_ranks_give_the_same_features_as_one():
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records = sysu_like_index(3, 3)["test_records"]
    single, single_keys = extract_features(FakeReID(), fake_loader(records, 4), device="cpu", flip=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, port, tmp), nprocs=2, join=True)
        for rank in (0, 1):
            got = torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=True)
            assert got["keys"] == single_keys
            torch.testing.assert_close(got["feats"], single, rtol=0, atol=1e-6)
