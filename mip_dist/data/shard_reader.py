"""Read training shards: samples of one tar, the shards each (rank, worker) slot reads, error budget.

Every (rank, DataLoader worker) pair is a *slot*. Per epoch and pass, a shard list is permuted with a
seed shared by all ranks and dealt to the slots (slot s gets shards s, s+S, ...), so in one
non-resampled pass every shard is read by exactly one slot. A slot that runs out starts its next pass
(a new permutation); in resampled mode each slot draws shards with replacement. A slot's source is
therefore endless. Corrupt images, bad metadata and truncated or missing shards are logged (shard,
key), counted and skipped; past `data.max_error_rate` the worker raises `DataError`.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional
from urllib.parse import urlparse

import numpy as np
import webdataset as wds

from .records import INFRARED, VISIBLE
from .transforms import IMAGE_EXTS

if TYPE_CHECKING:
    from .sample_cache import SampleCache

log = logging.getLogger(__name__)

MIN_ERROR_DENOMINATOR = 1000  # error rate = errors / max(samples seen, this): a few early errors are not 100%
MAX_LOGGED_ERRORS = 20  # per worker; later errors are only counted


class DataError(RuntimeError):
    """The data cannot be streamed: bad URLs, too many corrupt samples, or no batch can be formed."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python runs)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample from a shard."""

    key: str
    url: str
    ext: str
    data: bytes
    label: int
    pid: int
    camera: int  # dataset's 1-based camera
    modality: int


class ErrorCounter:
    """Counts samples and errors of one worker; logs the first few; raises past the error rate."""

    def __init__(self, max_rate: float, where: str) -> None:
        self.max_rate = max_rate
        self.where = where
        self.seen = 0
        self.errors = 0

    def record(self, kind: str, url: Optional[str], key: Optional[str], exc: Any) -> None:
        """One bad sample or shard: log (shard, key), count, stop the run past the allowed rate."""
        self.errors += 1
        if self.errors <= MAX_LOGGED_ERRORS:
            log.warning("%s: %s error in shard %s at sample %s: %s", self.where, kind, url, key, exc)
        elif self.errors == MAX_LOGGED_ERRORS + 1:
            log.warning("%s: more data errors; counting without logging", self.where)
        if self.errors > self.max_rate * max(self.seen, MIN_ERROR_DENOMINATOR):
            raise DataError(f"{self.where}: {self.errors} data errors in {self.seen} samples exceed "
                            f"data.max_error_rate={self.max_rate} (last: {kind} in shard {url} at sample "
                            f"{key}: {exc})")


def shard_size_error(url: str, expected_bytes: Optional[int]) -> Optional[str]:
    """Why a local shard cannot be the one index.json lists (missing, or another size), else None.
    One stat per shard open; remote URLs are not checked."""
    parsed = urlparse(url)
    if expected_bytes is None or parsed.scheme not in ("", "file"):
        return None
    path = Path(parsed.path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    return None if size == expected_bytes else f"{size} bytes, index.json lists {expected_bytes} (truncated or replaced)"


def iter_shard_samples(url: str, counter: ErrorCounter, expected_bytes: Optional[int] = None) -> Iterator[RawSample]:
    """Samples of one shard via webdataset's tar reader; a shard of the wrong size is skipped and read
    errors end the shard, each counted once against data.max_error_rate."""
    problem = shard_size_error(url, expected_bytes)
    if problem is not None:
        counter.record("shard", url, None, problem)
        return
    state: dict[str, Any] = {"key": None, "failed": False, "over_budget": None}

    def handler(exn: Exception) -> bool:
        if not state["failed"]:  # a truncated tar raises once per layer; count it once
            state["failed"] = True
            try:
                counter.record("read", url, state["key"], exn)
            except DataError as over:  # webdataset's outer stages would swallow it: re-raised below
                state["over_budget"] = over
        return True

    for s in wds.tariterators.tarfile_samples([{"url": url}], handler=handler):
        if state["over_budget"] is not None:
            raise state["over_budget"]
        key = s.get("__key__")
        state["key"] = key
        counter.seen += 1
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        if ext is None or "json" not in s:
            counter.record("incomplete sample", url, key, f"has {sorted(k for k in s if not k.startswith('__'))}")
            continue
        try:
            meta = json.loads(s["json"])
            sample = RawSample(key, url, ext, s[ext], int(meta["label"]), int(meta["pid"]),
                               int(meta["camera"]), int(meta["modality"]))
        except (ValueError, KeyError, TypeError) as exc:
            counter.record("metadata", url, key, exc)
            continue
        if sample.modality not in (INFRARED, VISIBLE) or sample.camera < 1:
            counter.record("metadata", url, key, f"modality {sample.modality}, camera {sample.camera}")
            continue
        yield sample
    if state["over_budget"] is not None:
        raise state["over_budget"]


def slot_shards(urls: list[str], *, seed: int, epoch: int, pass_index: int, rank: int, world_size: int,
                worker: int, num_workers: int, resampled: bool = False) -> list[str]:
    """The shards slot (rank, worker) reads in one pass of one epoch.

    Non-resampled: a permutation shared by all ranks, dealt round-robin over the world_size x
    num_workers slots (repeated, re-permuted, when there are fewer shards than slots, so no slot is
    empty). Resampled: ceil(shards / slots) draws with replacement, seeded per slot."""
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    if resampled:
        rng = np.random.default_rng(mix_seed(seed, epoch, pass_index, rank, worker, 11))
        return [urls[i] for i in rng.integers(len(urls), size=max(1, math.ceil(len(urls) / slots)))]
    order: list[str] = []
    k = 0
    while len(order) < slots or k == 0:
        perm = np.random.default_rng(mix_seed(seed, epoch, pass_index, k, 13)).permutation(len(urls))
        order.extend(urls[i] for i in perm)
        k += 1
    return order[slot::slots]


class SlotSource:
    """Endless samples of one slot: pass after pass of its shards; an empty pass is an error.

    label_offset / camera_offset move one dataset's labels and cameras into a run's shared label and
    camera spaces when several datasets train together (0 for a single dataset). With a cache, a shard
    read completely without errors is replayed from memory on later passes and epochs."""

    def __init__(self, urls: list[str], counter: ErrorCounter, *, seed: int, epoch: int, rank: int,
                 world_size: int, worker: int, num_workers: int, resampled: bool,
                 sizes: Optional[dict[str, int]] = None, label_offset: int = 0, camera_offset: int = 0,
                 cache: Optional[SampleCache] = None) -> None:
        self.urls = urls
        self.counter = counter
        self.cache = cache
        self.sizes = sizes or {}
        self.label_offset, self.camera_offset = label_offset, camera_offset
        self.kw = dict(seed=seed, epoch=epoch, rank=rank, world_size=world_size, worker=worker,
                       num_workers=num_workers, resampled=resampled)
        self.passes = 0
        self._it = self._generate()

    def _generate(self) -> Iterator[RawSample]:
        while True:
            shards = slot_shards(self.urls, pass_index=self.passes, **self.kw)
            got = 0
            shift = self.label_offset or self.camera_offset
            for url in shards:
                for sample in self._shard_samples(url):
                    got += 1
                    yield (replace(sample, label=sample.label + self.label_offset,
                                   camera=sample.camera + self.camera_offset) if shift else sample)
            self.passes += 1
            if got == 0:
                raise DataError(f"{self.counter.where}: no readable samples in shards {shards[:4]}"
                                f"{' ...' if len(shards) > 4 else ''}")

    def _shard_samples(self, url: str) -> Iterator[RawSample]:
        """One shard's samples: from the cache if it holds them, else read (and kept if read cleanly)."""
        cached = self.cache.shard(url) if self.cache is not None else None
        if cached is not None:
            for sample in cached:
                self.counter.seen += 1  # as a read would count them
                yield sample
            return
        errors_before, read = self.counter.errors, []
        for sample in iter_shard_samples(url, self.counter, self.sizes.get(url)):
            if self.cache is not None:
                read.append(sample)
            yield sample
        if self.cache is not None and self.counter.errors == errors_before:
            self.cache.keep_shard(url, read)

    def __next__(self) -> RawSample:
        return next(self._it)

    def __iter__(self) -> "SlotSource":
        return self
