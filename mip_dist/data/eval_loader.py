"""Test images of a shard folder for evaluation: every image to exactly one rank, in a fixed order.

A test shard is read only as index.json lists it (size, and the sha256 of its bytes, hashed as they are read):
a changed shard stops the evaluation with a ShardError naming it, since its metrics would silently change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mip_dist.cli import unwrap_worker_error
from mip_dist.config import DataConfig

from .shard_index import INDEX_NAME, ShardError, check_split_keys, read_index
from .shard_reader import DataError, ErrorCounter, RawSample, iter_shard_samples
from .transforms import decode_rgb, eval_transform, one_thread

LOADER_TIMEOUT_S = 600  # a worker silent this long is a hang: the DataLoader raises instead of waiting


class ListedShard(NamedTuple):
    """A test shard as index.json lists it: what is read, and what its bytes must be."""

    url: str
    count: int
    bytes: Optional[int]
    sha256: Optional[str]


class _TestShare(IterableDataset):
    """This rank's test samples (global sample index % world_size == rank), shards dealt to workers."""

    def __init__(self, shards: list[ListedShard], rank: int, world_size: int, batch_size: int,
                 img_size: tuple[int, int], max_error_rate: float) -> None:
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.img_size, self.max_error_rate = batch_size, img_size, max_error_rate

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = ErrorCounter(self.max_error_rate, f"test rank {self.rank} worker {w}")
        tf = eval_transform(self.img_size)
        offsets = np.concatenate([[0], np.cumsum([s.count for s in self.shards])]).astype(int)
        items: list[tuple[RawSample, torch.Tensor]] = []
        for i, shard in enumerate(self.shards):
            if i % nw != w:
                continue
            url = shard.url
            for j, s in enumerate(iter_shard_samples(url, counter, shard.bytes, shard.sha256, strict=True)):
                if (offsets[i] + j) % self.world_size != self.rank:
                    continue
                try:
                    img = decode_rgb(s.data, s.ext)
                except Exception as exc:
                    counter.record("decode", url, s.key, exc)
                    continue
                with one_thread():
                    items.append((s, tf(img)))
                if len(items) == self.batch_size:
                    yield self._collate(items)
                    items = []
        if items:
            yield self._collate(items)

    @staticmethod
    def _collate(items: list[tuple[RawSample, torch.Tensor]]) -> dict:
        return {"images": torch.stack([t for _, t in items]),
                "key": [s.key for s, _ in items],
                "pid": torch.tensor([s.pid for s, _ in items], dtype=torch.int64),
                "camera": torch.tensor([s.camera for s, _ in items], dtype=torch.int64),
                "modality": torch.tensor([s.modality for s, _ in items], dtype=torch.int64)}


def next_batch(batches: Iterator[dict]) -> Optional[dict]:
    """A loader's next batch (None at its end); an error raised in a worker is raised as the worker raised it."""
    try:
        return next(batches, None)
    except Exception as exc:
        original = unwrap_worker_error(exc)
        if original is None:
            raise
        # torch's frames in its traceback hold the loader in a reference cycle: its workers would then stop only
        # when the garbage collector runs, after a 5 s join each; the worker's traceback stays in its message
        exc.__traceback__ = None
        try:
            raise original from exc  # --debug shows the wrapped one, with the worker's traceback, as the cause
        finally:
            original = None  # nor a cycle through this frame


class _TestLoader(DataLoader):
    """The test DataLoader; an error raised in one of its workers is raised as the worker raised it."""

    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]
        batches = super().__iter__()
        while (batch := next_batch(batches)) is not None:
            yield batch


def eval_folder(data_cfg: DataConfig, shards: Optional[str] = None) -> str:
    """The shard folder to evaluate: `shards`, else data.shards when it names one dataset."""
    if shards:
        return shards
    sources = data_cfg.sources()
    if len(sources) > 1:
        raise DataError(f"data.shards lists {len(sources)} datasets ({', '.join(s.name for s in sources)}); "
                        "evaluate each on its own test shards (pass shards=<folder>)")
    if not sources:
        raise DataError("data.shards (a folder with index.json) must be set to evaluate")
    return sources[0].path


def build_test_loader(data_cfg: DataConfig, *, rank: int = 0, world_size: int = 1, batch_size: int = 128,
                      shards: Optional[str] = None) -> DataLoader:
    """Test images of one shard folder (`shards`, else data.shards), this rank's disjoint share (sample
    index modulo world_size). Batches: images, key (list[str]), pid (dataset id), camera (dataset's
    1-based number), modality; the same order on every pass."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size} is not a valid process position")
    folder = eval_folder(data_cfg, shards)
    index = read_index(folder)
    check_split_keys(folder, "test", index)  # one key per image: features are matched by key
    listed = [ListedShard(str(Path(folder) / s["name"]), int(s["count"]), s.get("bytes"), s.get("sha256"))
              for s in index["shards"] if s["split"] == "test"]
    if not listed:
        raise ShardError(f"{Path(folder) / INDEX_NAME}: no test shards listed")
    dataset = _TestShare(listed, rank, world_size, batch_size, tuple(data_cfg.img_size), data_cfg.max_error_rate)
    workers = min(data_cfg.workers, len(listed))
    return _TestLoader(dataset, batch_size=None, num_workers=workers, timeout=LOADER_TIMEOUT_S if workers > 0 else 0,
                       prefetch_factor=2 if workers > 0 else None)
