"""Read training shards: samples of one tar, the shards each (rank, worker) slot reads, error budget.

Every (rank, DataLoader worker) pair is a *slot*. Per epoch and pass, a shard list is permuted with a
seed shared by all ranks and dealt to the slots (slot s gets shards s, s+S, ...), so in one
non-resampled pass every shard is read by exactly one slot. A slot that runs out starts its next pass
(a new permutation); in resampled mode each slot draws shards with replacement. A slot's source is
therefore endless. Corrupt images, bad metadata and truncated or missing shards are logged (shard,
key), counted and skipped; past `data.max_error_rate` the worker raises `DataError`.

Each shard is verified as it is read: the tar reader takes its bytes through a hash (the sha256 that
index.json lists), so verification costs no second read. A shard whose hash differs counts as one data
error when its end is reached (its samples have been used by then; the warning names it) and is never
kept as a clean read by the sample cache; evaluation (`strict`) refuses such a shard instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Optional
from urllib.parse import urlparse

import numpy as np
import webdataset as wds

from .records import INFRARED, VISIBLE
from .shard_index import ShardError
from .transforms import IMAGE_EXTS

if TYPE_CHECKING:
    from .sample_cache import SampleCache

log = logging.getLogger(__name__)

MIN_ERROR_DENOMINATOR = 1000  # error rate = errors / max(samples seen, this): a few early errors are not 100%
WINDOW_SAMPLES = 10_000  # the error rate is also checked over the last this many expected samples (sliding)
WINDOW_BUCKET = 1_000  # the window slides in steps of this many expected samples
MAX_LOGGED_ERRORS = 20  # per worker; later errors are only counted
HASH_BLOCK = 1 << 20  # bytes per read when hashing what the tar reader left unread (the end-of-archive padding)


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
    """Counts samples, errors and lost samples of one worker's epoch; logs the first few; raises past the rate.

    The rate is the fraction of expected samples not delivered: (bad samples + samples lost) / (samples seen +
    samples lost). A shard that cannot be read to its end loses the samples index.json lists for it beyond
    those read, so one unreadable shard of four is a quarter of the data, not one error. It is checked at every
    bad or lost sample, over two spans: the worker's epoch so far (one counter per worker and epoch, so the
    check at the last bad sample is the epoch's end-of-epoch rate) and the last `WINDOW_SAMPLES` expected
    samples (a burst late in a long epoch is not diluted by the clean start). Either denominator is at least
    `MIN_ERROR_DENOMINATOR`: a few early errors are not 100%."""

    def __init__(self, max_rate: float, where: str) -> None:
        self.max_rate = max_rate
        self.where = where
        self.seen = 0
        self.errors = 0
        self.lost = 0  # samples index.json lists that were never read (unreadable shards, cut-off shard ends)
        self.last: Optional[str] = None  # the latest error, for a message that ends the run
        self.bad_by_shard: dict[str, int] = {}  # url -> bad + lost samples, for the line that ends the run
        self._window: deque[list[int]] = deque([[0, 0]], maxlen=WINDOW_SAMPLES // WINDOW_BUCKET + 1)  # [bad, expected]

    def saw(self, n: int = 1) -> None:
        """`n` samples were read from a shard (good or bad)."""
        self.seen += n
        self._tick(0, n)

    def _tick(self, bad: int, expected: int) -> None:
        """Add to the window's newest bucket; start a new one every WINDOW_BUCKET expected samples."""
        self._window[-1][0] += bad
        while expected > 0:
            bucket = self._window[-1]
            step = min(expected, WINDOW_BUCKET - bucket[1])
            bucket[1] += step
            expected -= step
            if bucket[1] >= WINDOW_BUCKET:
                self._window.append([0, 0])

    def record(self, kind: str, url: Optional[str], key: Optional[str], exc: Any) -> None:
        """One bad sample or shard: log (shard, key), count, stop the run past the allowed rate."""
        self.errors += 1
        self._tick(1, 0)
        if url is not None:
            self.bad_by_shard[url] = self.bad_by_shard.get(url, 0) + 1
        self.last = f"{kind} error in shard {url} at sample {key}: {exc}"
        if self.errors <= MAX_LOGGED_ERRORS:
            log.warning("%s: %s error in shard %s at sample %s: %s", self.where, kind, url, key, exc)
        elif self.errors == MAX_LOGGED_ERRORS + 1:
            log.warning("%s: more data errors; counting without logging", self.where)
        self._check()

    def lose(self, url: str, read: int, listed: int) -> None:
        """A shard yielded `read` of the `listed` samples index.json lists for it: count the rest as lost."""
        if read >= listed:
            return
        self.lost += listed - read
        self._tick(listed - read, listed - read)
        self.bad_by_shard[url] = self.bad_by_shard.get(url, 0) + listed - read
        self.last = f"shard {url}: {read} of its {listed} samples read ({self.last or 'unreadable'})"
        self._check()

    def _check(self) -> None:
        """Raise DataError once the bad and lost samples pass data.max_error_rate of the expected ones, over the
        epoch so far or over the window."""
        expected = self.seen + self.lost
        window_bad = sum(b for b, _ in self._window)
        window_expected = sum(e for _, e in self._window)
        if self.errors + self.lost > self.max_rate * max(expected, MIN_ERROR_DENOMINATOR):
            span, bad, total = "of this epoch's", self.errors + self.lost, expected
        elif window_bad > self.max_rate * max(window_expected, MIN_ERROR_DENOMINATOR):
            span, bad, total = f"of the last {window_expected}", window_bad, window_expected
        else:
            return
        lost = f" and {self.lost} samples lost (unreadable shards or shard ends)" if self.lost else ""
        worst = sorted(self.bad_by_shard.items(), key=lambda kv: -kv[1])
        shards = ", ".join(f"{Path(url).name} ({n})" for url, n in worst[:4]) + (" ..." if len(worst) > 4 else "")
        raise DataError(f"{self.where}: {self.errors} data errors{lost} in {expected} samples exceed "
                        f"data.max_error_rate={self.max_rate}: {bad / max(total, 1):.1%} {span} expected samples "
                        f"not delivered; bad or lost per shard: {shards or 'none named'} (last: {self.last})")


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


class HashingReader:
    """A shard's byte stream that hashes whatever the tar reader takes from it: verified without a second read."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        """Read from the shard and hash the bytes."""
        data = self.raw.read(size)
        self.hash.update(data)
        return data

    def hexdigest(self) -> str:
        """The whole shard's sha256: the bytes after the tar's end marker (padding) are read and hashed first."""
        while self.read(HASH_BLOCK):
            pass
        return self.hash.hexdigest()

    def close(self) -> None:
        """Close the underlying stream (a pipe cut short may complain: the read's outcome is already known)."""
        try:
            self.raw.close()
        except Exception as exc:  # noqa: BLE001 - e.g. curl's exit status after an early close
            log.debug("closing %s: %s", self.raw, exc)

    def __str__(self) -> str:
        return str(self.raw)


def read_problem(exn: Exception) -> str:
    """A tar read error in words, without the stream and URL objects webdataset appends to its arguments."""
    first = str(exn.args[0]) if exn.args else str(exn)
    # gopen's Pipe (curl for http, pipe: commands) reports "((['curl', ...],), {...}): exit 7 (read)"
    pipe = re.match(r"\(\(\['([^']+)'.*\): exit (\d+) \(read\)", first)
    if pipe is not None:
        return f"{pipe[1]} exited with status {pipe[2]}"
    return f"{type(exn).__name__}: {first.split(' @ <')[0]}"  # tar_file_iterator appends " @ <stream>"


def changed_shard(url: str, problem: str) -> ShardError:
    """The error evaluation raises for a test shard that is not the one index.json lists."""
    return ShardError(f"test shard {url} {problem}: evaluation refuses it (its metrics would silently change); "
                      "restore the file or rewrite the shards with launch/make_shards.py --overwrite")


def hash_mismatch(got: str, expected: str) -> str:
    """Why a shard's bytes are not the ones index.json lists, in words."""
    return f"has sha256 {got[:16]}..., index.json lists {expected[:16]}... (changed after it was written)"


def iter_shard_samples(url: str, counter: ErrorCounter, expected_bytes: Optional[int] = None,
                       expected_sha256: Optional[str] = None, strict: bool = False) -> Iterator[RawSample]:
    """Samples of one shard via webdataset's tar reader, its bytes hashed on the way. A shard of the wrong
    size is skipped, read errors end the shard, and a hash that differs from `expected_sha256` is found at
    its end; each counts once against data.max_error_rate, or, with `strict`, a changed shard raises ShardError."""
    problem = shard_size_error(url, expected_bytes)
    if problem is not None:
        if strict:
            raise changed_shard(url, problem)
        counter.record("shard", url, None, problem)
        return
    state: dict[str, Any] = {"key": None, "failed": False, "over_budget": None}

    def handler(exn: Exception) -> bool:
        if not state["failed"]:  # a truncated tar raises once per layer; count it once
            state["failed"] = True
            try:
                counter.record("read", url, state["key"], read_problem(exn))
            except DataError as over:  # webdataset's outer stages would swallow it: re-raised below
                state["over_budget"] = over
        return True

    opened = list(wds.tariterators.url_opener([{"url": url}], handler=handler))
    if not opened:  # could not be opened: counted by the handler
        if state["over_budget"] is not None:
            raise state["over_budget"]
        return
    reader = HashingReader(opened[0]["stream"])
    try:
        yield from _samples(url, reader, counter, state, handler)
        if expected_sha256 and (strict or not state["failed"]):  # a read error is counted already
            _check_digest(url, reader, expected_sha256, counter, strict)
    finally:
        reader.close()


def _check_digest(url: str, reader: HashingReader, expected: str, counter: ErrorCounter, strict: bool) -> None:
    """Compare the shard's hash, once read to its end, with index.json's: count (or, strict, raise) a mismatch."""
    try:
        got = reader.hexdigest()
    except Exception as exc:  # noqa: BLE001 - the rest of the stream could not be read
        if strict:
            raise changed_shard(url, f"cannot be read to its end ({exc})") from exc
        counter.record("read", url, None, read_problem(exc))
        return
    if got != expected:
        if strict:
            raise changed_shard(url, hash_mismatch(got, expected))
        counter.record("checksum", url, None, hash_mismatch(got, expected))


def _samples(url: str, reader: HashingReader, counter: ErrorCounter, state: dict[str, Any],
             handler: Any) -> Iterator[RawSample]:
    """The valid samples of an opened shard; bad ones are counted and skipped."""
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": reader}], handler=handler)
    for s in wds.tariterators.group_by_keys(files, handler=handler):
        if state["over_budget"] is not None:
            raise state["over_budget"]
        key = s.get("__key__")
        state["key"] = key
        counter.saw()
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
    read completely without errors (its hash included) is replayed from memory on later passes and epochs."""

    def __init__(self, urls: list[str], counter: ErrorCounter, *, seed: int, epoch: int, rank: int,
                 world_size: int, worker: int, num_workers: int, resampled: bool,
                 sizes: Optional[dict[str, int]] = None, digests: Optional[dict[str, str]] = None,
                 counts: Optional[dict[str, int]] = None, label_offset: int = 0, camera_offset: int = 0, cache: Optional[SampleCache] = None) -> None:
        self.urls = urls
        self.counter = counter
        self.cache = cache
        self.sizes = sizes or {}
        self.digests = digests or {}  # url -> sha256 from index.json; shards without one are not verified
        self.counts = counts or {}  # url -> samples index.json lists: what a shard read short of has lost
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
                last = f" (last error: {self.counter.last})" if self.counter.last else ""
                raise DataError(f"{self.counter.where}: no readable samples in shards {shards[:4]}"
                                f"{' ...' if len(shards) > 4 else ''}{last}")

    def _shard_samples(self, url: str) -> Iterator[RawSample]:
        """One shard's samples: from the cache if it holds them, else read (and kept if read cleanly)."""
        cached = self.cache.shard(url) if self.cache is not None else None
        if cached is not None:
            for sample in cached:
                self.counter.saw()  # as a read would count them
                yield sample
            return
        errors_before, seen_before, read = self.counter.errors, self.counter.seen, []
        for sample in iter_shard_samples(url, self.counter, self.sizes.get(url), self.digests.get(url)):
            if self.cache is not None:
                read.append(sample)
            yield sample
        if url in self.counts:
            self.counter.lose(url, self.counter.seen - seen_before, self.counts[url])
        if self.cache is not None and self.counter.errors == errors_before:  # a hash mismatch is an error too
            self.cache.keep_shard(url, read)

    def __next__(self) -> RawSample:
        return next(self._it)

    def __iter__(self) -> "SlotSource":
        return self
