"""Streaming PK batches: composition, equal counts per rank, coverage, determinism, resume, bad data, URLs."""
import collections
import functools
import http.server
import io
import json
import logging
import shutil
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import same_batches, take_batches

from mip_dist.config import ConfigError, DataConfig
from mip_dist.data.grouping import image_key
from mip_dist.data.records import INFRARED, VISIBLE
from mip_dist.data.shards import read_index, shard_urls, write_shards
from mip_dist.data.shard_reader import ErrorCounter, iter_shard_samples, slot_shards
from mip_dist.data.stream import DataError, TrainStream, build_test_loader, build_train_stream
from mip_dist.demo.synthetic import generate_synthetic

P, K = 3, 2
B = P * 2 * K


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 train ids x 6 cameras x 3 images (216 samples) in 6 uneven train shards; 4 test ids."""
    base = tmp_path_factory.mktemp("stream")
    root = generate_synthetic(str(base / "syn"), num_train_ids=12, num_test_ids=4, images_per_camera=3,
                              img_size=(64, 32), seed=1, workers=2)
    write_shards("synthetic", str(root), str(base / "shards"), max_shard_samples=41, workers=2, progress=False,
                 chunk_instances=K)  # identity chunks of 2K samples: shards of 40, the last one shorter
    return base / "shards"


def cfg(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), batch_size=B, num_instances=K, img_size=(64, 32), workers=0,
                buffer_size=48, max_error_rate=0.01)
    base.update(kw)
    return DataConfig(**base)


def check_pk_batch(batch: dict, num_classes: int) -> None:
    """Every invariant of a cross-modality PK batch."""
    assert set(batch) == {"images", "grey", "erase_box", "erase_fill", "pid", "camera", "modality", "key", "shard"}
    assert len(batch["shard"]) == B and all(url.endswith(".tar") for url in batch["shard"])
    assert len(batch["key"]) == B and all(isinstance(k, str) for k in batch["key"])
    assert batch["images"].shape == (B, 3, 64, 32) and batch["images"].dtype == torch.uint8
    images = TrainStream.device_images(batch, "cpu", torch.float32)
    assert images.shape == (B, 3, 64, 32) and images.dtype == torch.float32 and torch.isfinite(images).all()
    for k in ("pid", "camera", "modality"):
        assert batch[k].shape == (B,) and batch[k].dtype == torch.int64
    mod, pid, cam = batch["modality"].tolist(), batch["pid"].tolist(), batch["camera"].tolist()
    assert mod == [VISIBLE] * (B // 2) + [INFRARED] * (B // 2)
    vis_ids = [pid[i * K] for i in range(P)]
    ir_ids = [pid[B // 2 + i * K] for i in range(P)]
    assert vis_ids == ir_ids and len(set(vis_ids)) == P
    for half in (0, B // 2):
        for i in range(P):
            assert pid[half + i * K: half + (i + 1) * K] == [vis_ids[i]] * K
    assert all(0 <= p < num_classes for p in pid)
    for m, c in zip(mod, cam):  # 0-based: SYSU cam3 / cam6 (infrared) are 2 / 5
        assert (c in (2, 5)) == (m == INFRARED) and 0 <= c <= 5


def slot_keys(urls: list[str], **slot) -> list[str]:
    """Sample keys of one pass of a slot's shards, no batching."""
    counter = ErrorCounter(0.0, "test")
    return [s.key for url in slot_shards(urls, pass_index=0, **slot) for s in iter_shard_samples(url, counter)]


def test_pk_composition_on_every_batch(shards):
    stream = build_train_stream(cfg(shards), seed=0, rank=0, world_size=1)
    assert stream.steps_per_epoch == 216 // B
    n = 0
    for batch in stream:
        check_pk_batch(batch, 12)
        n += 1
    assert n == stream.steps_per_epoch and stream.error_count == 0
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["batches"] == 0


def test_no_repeated_image_in_a_batch_when_identities_have_k_of_each(shards):
    """Every identity has 12 visible + 6 infrared images >= K: chunk padding repeats its infrared images
    in the shards, yet no batch may hold an image twice."""
    for workers in (0, 2):
        stream = build_train_stream(cfg(shards, workers=workers, steps_per_epoch=36), seed=2, rank=0, world_size=1)
        for batch in stream:
            images = [image_key(k) for k in batch["key"]]
            assert len(set(images)) == B, collections.Counter(images).most_common(2)


@pytest.mark.parametrize("resampled", [False, True])
def test_equal_batch_counts_two_ranks_two_workers_uneven_shards(shards, resampled):
    sizes = [s["count"] for s in read_index(str(shards))["shards"] if s["split"] == "train"]
    assert len(set(sizes)) > 1  # uneven shards
    counts = []
    for rank in (0, 1):
        stream = build_train_stream(cfg(shards, workers=2, resampled=resampled), seed=3, rank=rank, world_size=2)
        assert stream.steps_per_epoch == 216 // (B * 2)
        got = 0
        for batch in stream:
            check_pk_batch(batch, 12)
            got += 1
        counts.append(got)
    assert counts == [216 // (B * 2)] * 2


def test_one_non_resampled_pass_reads_every_sample_once_across_ranks(shards):
    urls = shard_urls(str(shards), "train")
    all_keys = []
    for rank in (0, 1):
        for worker in (0, 1):
            all_keys += slot_keys(urls, seed=5, epoch=2, rank=rank, world_size=2, worker=worker, num_workers=2)
    counts = collections.Counter(all_keys)
    listed = sum(s["count"] for s in read_index(str(shards))["shards"] if s["split"] == "train")
    assert len(counts) == listed and set(counts.values()) == {1}  # every sample (padding copies too) once
    assert len({image_key(k) for k in counts}) == 216  # every image
    # fewer shards than slots: every slot still gets a shard, every shard is read
    few = urls[:3]
    dealt = [slot_shards(few, seed=5, epoch=0, pass_index=0, rank=r, world_size=2, worker=w, num_workers=2)
             for r in (0, 1) for w in (0, 1)]
    assert all(dealt) and set(sum(dealt, [])) == set(few)
    # the deal changes with the epoch (shuffled shard order), identically on every rank
    e0 = slot_shards(urls, seed=5, epoch=0, pass_index=0, rank=0, world_size=2, worker=0, num_workers=2)
    e1 = [slot_shards(urls, seed=5, epoch=e, pass_index=0, rank=0, world_size=2, worker=0, num_workers=2)
          for e in range(1, 6)]
    assert any(x != e0 for x in e1)


@pytest.mark.parametrize("workers", [0, 2])
def test_test_loader_ranks_get_disjoint_complete_shares(shards, workers):
    index = read_index(str(shards))
    expected = {t["key"]: t for t in index["test_records"]}
    seen: dict[str, int] = {}
    for rank in (0, 1):
        loader = build_test_loader(cfg(shards, workers=workers), rank=rank, world_size=2, batch_size=16)
        keys = []
        for batch in loader:
            assert batch["images"].shape[1:] == (3, 64, 32)
            assert len(batch["key"]) == batch["pid"].shape[0] == batch["camera"].shape[0]
            for k, p, c, m in zip(batch["key"], batch["pid"].tolist(), batch["camera"].tolist(),
                                  batch["modality"].tolist()):
                assert (p, c, m) == (expected[k]["pid"], expected[k]["camera"], expected[k]["modality"])
                keys.append(k)
        assert len(keys) == len(range(rank, len(expected), 2))  # this rank's share: sample index % world_size
        again = [k for b in loader for k in b["key"]]
        assert again == keys  # deterministic order
        for k in keys:
            assert k not in seen
            seen[k] = rank
    assert set(seen) == set(expected)


def test_deterministic_per_seed_and_epoch(shards):
    c = cfg(shards, workers=2, steps_per_epoch=4)
    a = take_batches(build_train_stream(c, seed=7, rank=1, world_size=2))
    b = take_batches(build_train_stream(c, seed=7, rank=1, world_size=2))
    assert same_batches(a, b)
    other_seed = take_batches(build_train_stream(c, seed=8, rank=1, world_size=2))
    other_rank = take_batches(build_train_stream(c, seed=7, rank=0, world_size=2))
    s = build_train_stream(c, seed=7, rank=1, world_size=2)
    s.set_epoch(1)
    other_epoch = take_batches(s)
    for other in (other_seed, other_rank, other_epoch):
        assert not same_batches(a, other)


@pytest.mark.parametrize("consumed", [3, 4])
def test_restore_continues_with_the_batches_of_an_uninterrupted_run(shards, consumed):
    c = cfg(shards, workers=2, steps_per_epoch=7)
    ref = build_train_stream(c, seed=11, rank=0, world_size=1)
    epoch0 = take_batches(ref)
    epoch1 = take_batches(ref)  # the stream moves on to epoch 1 by itself
    first = build_train_stream(c, seed=11, rank=0, world_size=1)
    assert same_batches(take_batches(first, consumed), epoch0[:consumed])
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (0, consumed)
    resumed = build_train_stream(c, seed=11, rank=0, world_size=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    resumed.set_epoch(0)  # a trainer re-selecting the restored epoch keeps the position
    assert same_batches(take_batches(resumed), epoch0[consumed:])
    assert resumed.state_dict()["epoch"] == 1
    assert same_batches(take_batches(resumed), epoch1)


def test_persistent_workers_give_every_epoch_the_batches_of_fresh_workers(shards, monkeypatch):
    """One DataLoader whose two workers persist across epochs, a restore and an abandoned epoch, yet yields
    what the same stream yields with workers restarted for every iteration (persistent_workers=False): the
    workers are told the epoch and position each time."""
    import mip_dist.data.stream as stream_module
    real_loader, made = stream_module.DataLoader, []

    def walk(persistent: bool) -> list:
        monkeypatch.setattr(stream_module, "DataLoader", lambda *a, **kw: made.append(kw) or real_loader(
            *a, **{**kw, "persistent_workers": persistent and kw.get("persistent_workers", False)}))
        stream = build_train_stream(cfg(shards, workers=2, steps_per_epoch=5), seed=9, rank=0, world_size=1)
        got = [take_batches(stream), take_batches(stream)]  # epochs 0 and 1: the stream moves on by itself
        stream.set_epoch(3)
        take_batches(stream, 2)  # abandoned after 2 of 5 batches (a trainer cutting the epoch to grad_accum)
        stream.set_epoch(2)
        got.append(take_batches(stream))
        stream.load_state_dict({"epoch": 0, "batches": 3})
        return got + [take_batches(stream)]

    fresh = walk(persistent=False)
    made.clear()
    kept = walk(persistent=True)
    assert len(made) == 1 and made[0]["persistent_workers"]  # one loader for the whole walk
    assert [len(b) for b in kept] == [5, 5, 5, 2]
    for a, b in zip(kept, fresh):
        assert same_batches(a, b)
    assert not same_batches(kept[0], kept[1]) and same_batches(kept[3], kept[0][3:])


def _rewrite_tar(path: Path, corrupt_every: int) -> int:
    """Replace the image of every `corrupt_every`-th sample with garbage; returns how many."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    n = 0
    with tarfile.open(path, "w") as out:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".jpg") and (i // 2) % corrupt_every == 0:
                data, n = b"\xff\xd8\xff\xe0 broken", n + 1
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    return n


def test_corrupt_images_and_truncated_tar_are_counted_and_skipped(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    names = [s["name"] for s in read_index(str(bad))["shards"] if s["split"] == "train"]
    assert _rewrite_tar(bad / names[0], corrupt_every=2) > 5
    index = json.loads((bad / "index.json").read_text())  # the rewritten shard is listed at its new size
    next(s for s in index["shards"] if s["name"] == names[0])["bytes"] = (bad / names[0]).stat().st_size
    (bad / "index.json").write_text(json.dumps(index))
    tail = bad / names[1]
    tail.write_bytes(tail.read_bytes()[: tail.stat().st_size // 3])  # truncated mid-sample
    c = cfg(bad, max_error_rate=0.5, steps_per_epoch=25)
    stream = build_train_stream(c, seed=0, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="mip_dist.data.shard_reader"):
        for batch in stream:
            check_pk_batch(batch, 12)
    assert stream.error_count >= 3
    assert f"shard error in shard {tail} at sample None: " in caplog.text  # its size differs from index.json
    assert f"decode error in shard {bad / names[0]} at sample" in caplog.text
    strict = build_train_stream(replace(c, max_error_rate=0.0), seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"exceed data\.max_error_rate=0\.0"):
        take_batches(strict)


@pytest.mark.parametrize("sizes_listed", [True, False], ids=["size-check", "read-errors"])
def test_truncated_tars_alone_exceed_the_error_budget(shards, tmp_path, sizes_listed):
    """A shard of another size than index.json lists is skipped and counted when opened; without listed
    sizes, read errors count like decode errors (webdataset's outer stages used to swallow the error
    the budget raised). Either way the stream stops past the rate."""
    bad = tmp_path / "cut"
    shutil.copytree(shards, bad)
    index = json.loads((bad / "index.json").read_text())
    for s in index["shards"]:
        if s["split"] == "train":
            tar = bad / s["name"]
            with tarfile.open(tar) as t:  # cut inside a sample's image: every sample before it is complete,
                members = t.getmembers()  # so only the tar reader sees an error
            first = next(m for m in members[len(members) // 2:] if not m.name.endswith(".json"))
            tar.write_bytes(tar.read_bytes()[: first.offset_data + 10])
            if not sizes_listed:
                del s["bytes"]
    (bad / "index.json").write_text(json.dumps(index))
    c = cfg(bad, max_error_rate=0.001, steps_per_epoch=50, workers=0)
    with pytest.raises(DataError, match=r"read error in shard .*exceed data\.max_error_rate=0\.001|"
                                        r"data errors( and \d+ samples lost .*)? in \d+ samples exceed data\.max_error_rate=0\.001"):
        take_batches(build_train_stream(c, seed=0, rank=0, world_size=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_unreadable_shard_of_several_exceeds_the_default_rate(shards, tmp_path, workers):
    """The rate counts samples lost, not errors: one shard of six cut short (a sixth of the data unread) is one
    read error but about 30 lost samples, far past the default 1%; before, it trained on without it."""
    bad = tmp_path / "short"
    shutil.copytree(shards, bad)
    index = json.loads((bad / "index.json").read_text())
    first = next(s for s in index["shards"] if s["split"] == "train")
    tar = bad / first["name"]
    with tarfile.open(tar) as t:
        members = t.getmembers()
    cut = members[len(members) // 4]  # inside the tar, a quarter of the way: three quarters of its samples lost
    tar.write_bytes(tar.read_bytes()[: cut.offset_data + 10])
    del first["bytes"]  # no size to check on open: only reading finds the cut (sizes listed: covered above)
    (bad / "index.json").write_text(json.dumps(index))
    c = cfg(bad, steps_per_epoch=30, workers=workers)
    assert c.max_error_rate == 0.01
    with pytest.raises(DataError, match=rf"samples lost .*{first['name']}: \d+ of its {first['count']} samples read"):
        take_batches(build_train_stream(c, seed=0, rank=0, world_size=1))



def test_a_late_burst_of_errors_stops_the_run_over_the_sliding_window():
    """20,000 clean samples, then 150 bad ones among the next 1,000: 0.7% of the epoch (under the default 1%),
    but 1.5% of the last 10,000 expected samples. Before the window, the clean start hid the burst."""
    counter = ErrorCounter(0.01, "rank 0 worker 0")
    counter.saw(20_000)
    with pytest.raises(DataError) as err:
        for i in range(1000):
            counter.saw()
            if i % 6 == 0:
                counter.record("decode", "/data/shards/train-000007.tar", f"k{i}", "bad JPEG")
    assert 80 < counter.errors <= 150 and counter.errors / (counter.seen + counter.lost) < 0.01
    line = str(err.value)
    assert "of the last 10" in line and "expected samples not delivered" in line, line
    assert "train-000007.tar (" in line, line


def test_the_stop_line_names_the_fraction_and_the_shards():
    """The line that ends a run says which fraction was not delivered and which shards lost the samples."""
    counter = ErrorCounter(0.01, "rank 0 worker 1")
    counter.saw(3000)
    counter.record("decode", "/data/shards/train-000003.tar", "k1", "bad JPEG")
    with pytest.raises(DataError) as err:
        counter.lose("/data/shards/train-000001.tar", 0, 1500)
    line = str(err.value)
    assert "33.4% of this epoch's expected samples not delivered" in line, line  # (1 + 1500) / (3000 + 1500)
    assert "train-000001.tar (1500), train-000003.tar (1)" in line, line

def test_pipe_urls_refused_unless_allowed(shards):
    first = shard_urls(str(shards), "train")[0]
    c = cfg("", train_urls=f"pipe:cat {first}", steps_per_epoch=1, buffer_size=24)
    with pytest.raises(DataError, match=r"pipe:.*data\.allow_pipe=true"):
        build_train_stream(c, seed=0, rank=0, world_size=1)
    stream = build_train_stream(replace(c, allow_pipe=True), seed=0, rank=0, world_size=1)
    batches = take_batches(stream)
    assert len(batches) == 1
    check_pk_batch(batches[0], 12)


def test_local_brace_pattern_uses_the_index_beside_it(shards):
    stream = build_train_stream(cfg("", train_urls=str(shards / "train-{000000..000001}.tar")), seed=0, rank=0,
                                world_size=1)
    assert [len(s.urls) for s in stream.spec.sources] == [2] and stream.spec.sources[0].max_identities == 12
    images = [s["images"] for s in read_index(str(shards))["shards"] if s["split"] == "train"][:2]
    assert stream.steps_per_epoch == sum(images) // B  # the two selected shards' images, not the whole set
    assert len(take_batches(stream, 2)) == 2


def test_url_checks(shards, tmp_path):
    with pytest.raises(DataError, match=r"unsupported URL scheme 's3'"):
        build_train_stream(cfg("", train_urls="s3://bucket/a.tar", steps_per_epoch=1), seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"shard .*missing-000000\.tar does not exist"):
        build_train_stream(cfg("", train_urls=str(tmp_path / "missing-{000000..000001}.tar"), steps_per_epoch=1),
                           seed=0, rank=0, world_size=1)
    empty = tmp_path / "x.tar"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="data.steps_per_epoch must be set"):
        build_train_stream(cfg("", train_urls=str(empty)), seed=0, rank=0, world_size=1)
    with pytest.raises(Exception, match=r"no index\.json"):
        build_train_stream(cfg(tmp_path), seed=0, rank=0, world_size=1)


def test_brace_pattern_over_http(shards):
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) URLs through curl")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/train-{{000000..000005}}.tar"
        stream = build_train_stream(cfg("", train_urls=url, steps_per_epoch=2), seed=0, rank=0, world_size=1)
        assert [len(s.urls) for s in stream.spec.sources] == [6]
        batches = take_batches(stream)
        assert len(batches) == 2
        for b in batches:
            check_pk_batch(b, 12)
    finally:
        server.shutdown()


def test_impossible_batch_is_a_clear_error_not_a_hang(shards, tmp_path):
    """A shard with visible images only: no identity can ever fill its infrared half."""
    src = shard_urls(str(shards), "train")[0]
    only_vis = tmp_path / "vis-000000.tar"
    with tarfile.open(src) as tar, tarfile.open(only_vis, "w") as out:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        keep = {m.name.split(".")[0] for m, d in members if m.name.endswith(".json") and json.loads(d)["modality"] == 1}
        for m, d in members:
            if m.name.split(".")[0] in keep:
                out.addfile(m, io.BytesIO(d))
    stream = build_train_stream(cfg("", train_urls=str(only_vis), steps_per_epoch=1), seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="cannot form a batch of 3 identities with both modalities"):
        take_batches(stream)
    with pytest.raises(DataError, match="needs 26 identities per batch, but the training set has only 12"):
        build_train_stream(cfg(shards, batch_size=4 * 26, num_instances=2), seed=0, rank=0, world_size=1)


def test_channel_augmentation_option(shards):
    stream = build_train_stream(cfg(shards, channel_aug=True, steps_per_epoch=2), seed=0, rank=0, world_size=1)
    for batch in stream:
        check_pk_batch(batch, 12)


def _epochs(stream, n: int) -> list:
    """All batches of epochs 0..n-1."""
    out = []
    for epoch in range(n):
        stream.set_epoch(epoch)
        out += take_batches(stream)
    return out


@pytest.mark.parametrize("augment", ["paper", "light"])
def test_sample_cache_gives_the_same_batches_and_reads_each_shard_and_image_once(shards, monkeypatch, augment):
    import mip_dist.data.shard_reader as reader
    import mip_dist.data.stream as stream_module
    reads, decodes = collections.Counter(), collections.Counter()
    real_iter, real_decode = reader.iter_shard_samples, stream_module.decode_rgb

    def counting_iter(url, *args, **kwargs):
        reads[url] += 1
        return real_iter(url, *args, **kwargs)

    def counting_decode(data, ext="jpg"):
        decodes[data] += 1
        return real_decode(data, ext)

    monkeypatch.setattr(reader, "iter_shard_samples", counting_iter)
    monkeypatch.setattr(stream_module, "decode_rgb", counting_decode)
    plain = _epochs(build_train_stream(cfg(shards, augment=augment, channel_aug=True), seed=4, rank=0,
                                       world_size=1), 3)
    samples = sum(s["count"] for s in read_index(str(shards))["shards"] if s["split"] == "train")
    assert sum(reads.values()) >= 3 * len(reads) and sum(decodes.values()) > 2 * samples  # every epoch again
    reads.clear(), decodes.clear()
    cached = build_train_stream(cfg(shards, cache_mb=64, augment=augment, channel_aug=True), seed=4, rank=0,
                                world_size=1)
    assert same_batches(_epochs(cached, 3), plain)  # a cached image is never changed by the transforms
    # each shard once, plus the shard an epoch ended in (kept only once read to its end); each image once
    assert sum(reads.values()) <= len(reads) + 3 and sum(decodes.values()) <= samples
    assert 0 < cached.cache.used_bytes <= 64 << 20


def test_sample_cache_keeps_no_shard_with_errors_and_stops_at_its_budget(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    name = next(s["name"] for s in read_index(str(bad))["shards"] if s["split"] == "train")
    _rewrite_tar(bad / name, corrupt_every=3)
    index = json.loads((bad / "index.json").read_text())
    next(s for s in index["shards"] if s["name"] == name)["bytes"] = (bad / name).stat().st_size
    (bad / "index.json").write_text(json.dumps(index))
    errors = {}
    for mb in (0, 64):
        stream = build_train_stream(cfg(bad, max_error_rate=0.5, cache_mb=mb), seed=0, rank=0, world_size=1)
        _epochs(stream, 3)
        errors[mb] = stream.error_count
    assert errors[64] == errors[0] > 0  # its bad samples are met, and counted, on every pass as before
    assert str(bad / name) not in stream.cache._shards

    tiny = build_train_stream(cfg(shards, cache_mb=1), seed=0, rank=0, world_size=1)
    tiny.cache.budget_bytes = 200_000  # a few dozen 64x32 images
    with caplog.at_level(logging.INFO, logger="mip_dist.data.sample_cache"):
        _epochs(tiny, 2)
    assert 0 < tiny.cache.used_bytes <= 200_000
    assert caplog.text.count("is full") == 1


def test_sample_cache_needs_in_process_loading():
    with pytest.raises(ConfigError, match=r"data\.cache_mb.*needs data\.workers=0 \(got 2\)"):
        DataConfig(cache_mb=64, workers=2).validate()


def test_batches_reseed_only_the_cpu_generator(shards, monkeypatch):
    """torch.manual_seed would also reseed the GPU generators, which the batch's fork_rng(devices=[]) does not
    restore: every batch would reset the training process's dropout RNG on a GPU (with data.workers=0)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    take_batches(build_train_stream(cfg(shards), seed=0, rank=0, world_size=1), 2)
    assert reseeded == []


def test_bench_data_times_the_stream_per_worker_count_and_writes_json_rows(tmp_path):
    """The interface the GPU check calls: --workers ... --seconds S --json PATH, one row per worker count."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "launch/bench_data.py", "--work", str(tmp_path), "--ids", "6",
                        "--images-per-camera", "1", "--img-size", "32", "16", "--batch-size", "8",
                        "--num-instances", "2", "--workers", "0", "1", "--seconds", "0.3", "--json", str(out)],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["workers"] for row in rows] == [0, 1]
    for row in rows:
        assert set(row) == {"workers", "img_s", "img_s_per_worker", "batches", "seconds"}
        assert row["batches"] > 0 and row["seconds"] >= 0.3
        assert row["img_s"] == pytest.approx(row["batches"] * 8 / row["seconds"], rel=0.01)
        assert row["img_s_per_worker"] == pytest.approx(row["img_s"] / max(row["workers"], 1), abs=0.1)
    assert r.stdout.count("img/s per worker") == 2 and "MiB per batch to the device" in r.stdout
