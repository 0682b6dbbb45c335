"""Stream webdataset shards into cross-modality PK batches, identically sized on every rank.

Layout of the work (open_clip style, made exact; `slot_shards` is the node *and* worker splitter,
so webdataset's own splitters, which refuse world_size > 1 unless set explicitly, are not involved):
- Every (rank, DataLoader worker) pair is a *slot*. Per epoch and pass, the shard list is permuted
  with a seed shared by all ranks and dealt to the slots (slot s gets shards s, s+S, ...), so in one
  non-resampled pass every shard is read by exactly one slot. A slot that runs out starts its next
  pass (a new permutation); in resampled mode each slot draws shards with replacement. Sources are
  therefore endless and every worker yields exactly its share of `steps_per_epoch` batches: no rank
  waits for another, whatever the shard sizes.
- Each worker keeps a bounded buffer of undecoded samples. A batch takes P identities that have
  both modalities in the buffer (chosen with probability proportional to their buffered samples,
  which drains the buffer evenly), K visible + K infrared images each (with replacement when an
  identity is short), decodes and augments them.
- Everything random is seeded by (seed, epoch, rank, worker[, batch]), so the epoch's batch sequence
  is a pure function of those numbers: the stream position is (epoch, batches consumed), and a
  restored stream regenerates the epoch and skips the consumed batches without augmenting them.
- Corrupt images, bad metadata and truncated or missing shards are logged (shard, key), counted and
  skipped; past `data.max_error_rate` the worker raises `DataError`, which ends the run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mip_dist.config import DataConfig
from mip_dist.data.grouping import image_key
from mip_dist.data.records import INFRARED, VISIBLE
from mip_dist.data.shards import INDEX_NAME, ShardError, check_split_keys, read_index, shard_urls
from mip_dist.data.transforms import IMAGE_EXTS, RandomChannel, decode_rgb, eval_transform, train_transform

log = logging.getLogger(__name__)

LOADER_TIMEOUT_S = 600  # a worker silent this long is a hang: the DataLoader raises instead of waiting
MIN_ERROR_DENOMINATOR = 1000  # error rate = errors / max(samples seen, this): a few early errors are not 100%
MAX_LOGGED_ERRORS = 20  # per worker; later errors are only counted
ALLOWED_SCHEMES = ("", "file", "http", "https", "pipe")

__all__ = ["DataError", "TrainStream", "TestLoader", "build_train_stream", "build_test_loader", "read_index",
           "slot_shards", "iter_slot_samples", "PKBuffer", "check_urls"]


class DataError(RuntimeError):
    """The data cannot be streamed: bad URLs, too many corrupt samples, or no batch can be formed."""


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Per-image transforms are tiny ops: intra-op threads only contend (DataLoader workers already
    run single-threaded; this does the same when the stream runs in the main process)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python runs)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


# ----------------------------------------------------------------------------------- urls


def check_urls(urls: list[str], allow_pipe: bool, key: str = "data.train_urls") -> list[str]:
    """Refuse `pipe:` (a shell command) unless allowed, unknown schemes, and missing local files."""
    if not urls:
        raise DataError(f"{key}: no shard URLs")
    for url in urls:
        scheme = urlparse(url).scheme if not url.startswith("pipe:") else "pipe"
        if len(scheme) == 1:  # a Windows drive letter, not a scheme
            scheme = ""
        if scheme == "pipe" and not allow_pipe:
            raise DataError(f"{key}: {url!r} is a 'pipe:' URL, which runs a shell command; "
                            f"set data.allow_pipe=true to allow it")
        if scheme not in ALLOWED_SCHEMES:
            raise DataError(f"{key}: unsupported URL scheme {scheme!r} in {url!r}; use a local path, "
                            f"file://, http(s):// or (with data.allow_pipe) pipe:")
        if scheme in ("", "file"):
            path = urlparse(url).path if scheme == "file" else url
            if not Path(path).is_file():
                raise DataError(f"{key}: shard {path} does not exist")
    return urls


def expand_urls(spec: str) -> list[str]:
    """Brace patterns (`train-{000000..000009}.tar`) and `::`-separated lists -> URL list."""
    return list(wds.shardlists.expand_urls(spec))


def resolve_train_urls(data_cfg: DataConfig) -> tuple[list[str], Optional[dict], Optional[dict[str, int]]]:
    """Train shard URLs (data.train_urls, else data.shards/index.json), the index if one is found,
    and per-URL sample counts where the index knows them."""
    index: Optional[dict] = None
    if data_cfg.train_urls:
        urls = expand_urls(data_cfg.train_urls)
        index_dir = data_cfg.shards
        if not index_dir and urlparse(urls[0]).scheme in ("", "file"):
            index_dir = str(Path(urlparse(urls[0]).path).parent)
        if index_dir and (Path(index_dir) / INDEX_NAME).is_file():
            index = read_index(index_dir)
        key = "data.train_urls"
    else:
        if not data_cfg.shards:
            raise DataError("data.shards (a folder with index.json) or data.train_urls must be set")
        index = read_index(data_cfg.shards)
        urls = shard_urls(data_cfg.shards, "train", index)
        key = "data.shards"
    check_urls(urls, data_cfg.allow_pipe, key)
    # images, not samples: chunk padding repeats some images, and an epoch covers each image once
    counts = listed_per_url(urls, index, lambda s: s.get("images", s["count"])) if index is not None else None
    return urls, index, counts


def listed_per_url(urls: list[str], index: Optional[dict], field: Callable[[dict], Optional[int]]) -> dict[str, int]:
    """`field` of each url's train shard entry in index.json, for the urls the index lists (and has it)."""
    if index is None:
        return {}
    by_name = {s["name"]: field(s) for s in index["shards"] if s["split"] == "train"}
    return {u: int(by_name[name]) for u in urls
            if by_name.get(name := Path(urlparse(u).path).name) is not None}


# ----------------------------------------------------------------------------------- reading


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
        rng = np.random.default_rng(_seed(seed, epoch, pass_index, rank, worker, 11))
        return [urls[i] for i in rng.integers(len(urls), size=max(1, math.ceil(len(urls) / slots)))]
    order: list[str] = []
    k = 0
    while len(order) < slots or k == 0:
        perm = np.random.default_rng(_seed(seed, epoch, pass_index, k, 13)).permutation(len(urls))
        order.extend(urls[i] for i in perm)
        k += 1
    return order[slot::slots]


class SlotSource:
    """Endless samples of one slot: pass after pass of its shards; an empty pass is an error."""

    def __init__(self, urls: list[str], counter: ErrorCounter, *, seed: int, epoch: int, rank: int,
                 world_size: int, worker: int, num_workers: int, resampled: bool,
                 sizes: Optional[dict[str, int]] = None) -> None:
        self.urls = urls
        self.counter = counter
        self.sizes = sizes or {}
        self.kw = dict(seed=seed, epoch=epoch, rank=rank, world_size=world_size, worker=worker,
                       num_workers=num_workers, resampled=resampled)
        self.passes = 0
        self._it = self._generate()

    def _generate(self) -> Iterator[RawSample]:
        while True:
            shards = slot_shards(self.urls, pass_index=self.passes, **self.kw)
            got = 0
            for url in shards:
                for sample in iter_shard_samples(url, self.counter, self.sizes.get(url)):
                    got += 1
                    yield sample
            self.passes += 1
            if got == 0:
                raise DataError(f"{self.counter.where}: no readable samples in shards {shards[:4]}"
                                f"{' ...' if len(shards) > 4 else ''}")

    def __next__(self) -> RawSample:
        return next(self._it)

    def __iter__(self) -> "SlotSource":
        return self


def iter_slot_samples(urls: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                      num_workers: int, resampled: bool = False, max_error_rate: float = 0.0) -> Iterator[RawSample]:
    """One pass of a slot's samples, no batching (for coverage checks and tools)."""
    counter = ErrorCounter(max_error_rate, f"rank {rank} worker {worker}")
    for url in slot_shards(urls, seed=seed, epoch=epoch, pass_index=0, rank=rank, world_size=world_size,
                           worker=worker, num_workers=num_workers, resampled=resampled):
        yield from iter_shard_samples(url, counter)


# ----------------------------------------------------------------------------------- PK buffer


class PKBuffer:
    """Bounded buffer of undecoded samples indexed by (label, modality), oldest-first eviction."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self._items: dict[int, RawSample] = {}  # insertion ordered: first = oldest
        self._by_id: dict[int, tuple[list[int], list[int]]] = {}  # label -> (infrared seqs, visible seqs)
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        """True when no more samples should be added before a batch is taken."""
        return len(self._items) >= self.capacity

    def add(self, s: RawSample) -> None:
        """Buffer one sample."""
        self._items[self._seq] = s
        self._by_id.setdefault(s.label, ([], []))[s.modality].append(self._seq)
        self._seq += 1

    def _remove(self, seq: int) -> RawSample:
        s = self._items.pop(seq)
        lists = self._by_id[s.label]
        lists[s.modality].remove(seq)
        if not lists[0] and not lists[1]:
            del self._by_id[s.label]
        return s

    def evict_oldest(self) -> RawSample:
        """Drop the oldest sample (makes room when no identity has both modalities)."""
        return self._remove(next(iter(self._items)))

    def pick_identity(self, exclude: set[int], k: int = 1) -> Optional[int]:
        """An identity with both modalities buffered, chosen with probability ~ its buffered count;
        identities with k of each buffered first (a complete chunk gives k distinct images of each)."""
        both = [l for l, (ir, vis) in self._by_id.items() if ir and vis and l not in exclude]
        full = [l for l in both if len(self._by_id[l][0]) >= k and len(self._by_id[l][1]) >= k]
        labels = sorted(full or both)
        if not labels:
            return None
        weights = np.array([len(self._by_id[l][0]) + len(self._by_id[l][1]) for l in labels], np.float64)
        return labels[int(self.rng.choice(len(labels), p=weights / weights.sum()))]

    def take(self, label: int, modality: int, k: int) -> list[RawSample]:
        """Up to k samples of (label, modality), removed from the buffer: distinct images first (a
        padding copy written to complete a chunk shares its image's key before REPEAT_MARK)."""
        seqs = self._by_id[label][modality]
        picks = [seqs[i] for i in self.rng.permutation(len(seqs))]
        images: set[str] = set()
        first, rest = [], []
        for q in picks:
            image = image_key(self._items[q].key)
            (rest if image in images else first).append(q)
            images.add(image)
        chosen = sorted((first + rest)[:k])
        return [self._remove(q) for q in chosen]

    def num_identities_with_both(self) -> int:
        """How many identities could enter a batch now."""
        return sum(1 for ir, vis in self._by_id.values() if ir and vis)


def form_pk_batch(buf: PKBuffer, source: Iterator[RawSample], num_ids: int, k: int,
                  decode: Callable[[RawSample], Optional[torch.Tensor]], stall_passes: Callable[[], int],
                  where: str) -> list[tuple[RawSample, Optional[torch.Tensor]]]:
    """P identities x (K visible + K infrared): visible block first (identity-major), then infrared
    in the same identity order. Short modalities are filled with replacement; samples that fail to
    decode are replaced by decodable ones of the same identity and modality."""
    chosen: list[tuple[int, list, list]] = []
    start_passes = stall_passes()
    while len(chosen) < num_ids:
        while not buf.full:
            buf.add(next(source))
        label = buf.pick_identity({c[0] for c in chosen}, k)
        if label is None:
            if stall_passes() - start_passes >= 2:
                raise DataError(f"{where}: cannot form a batch of {num_ids} identities with both modalities "
                                f"after reading this worker's shards twice (buffer of {buf.capacity} holds "
                                f"{buf.num_identities_with_both()} such identities); use fewer identities per "
                                f"batch (data.batch_size / (2 * data.num_instances)) or a larger "
                                f"data.buffer_size")
            buf.evict_oldest()
            continue
        groups = []
        for modality in (VISIBLE, INFRARED):
            ok = [(s, img) for s in buf.take(label, modality, k) for img in [decode(s)] if img is not None]
            groups.append(ok)
        if not groups[0] or not groups[1]:
            continue  # every sample of one modality failed to decode; pick another identity
        for ok in groups:
            base = list(ok)
            while len(ok) < k:
                ok.append(base[int(buf.rng.integers(len(base)))])
        chosen.append((label, groups[0], groups[1]))
    return [pair for c in chosen for pair in c[1]] + [pair for c in chosen for pair in c[2]]


# ----------------------------------------------------------------------------------- train stream


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker needs to regenerate its share of an epoch (plain, picklable)."""

    urls: tuple[str, ...]
    seed: int
    rank: int
    world_size: int
    steps_per_epoch: int
    num_ids: int
    num_instances: int
    buffer_size: int
    img_size: tuple[int, int]
    resampled: bool
    channel_aug: bool
    max_error_rate: float
    augment: str = "paper"
    shard_bytes: tuple[tuple[str, int], ...] = ()  # sizes from index.json, checked when a shard is opened


def worker_share(steps: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` yields: the DataLoader takes batch i from worker i % num_workers."""
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


def worker_skip(position: int, worker: int, num_workers: int) -> int:
    """How many of its batches worker `worker` had delivered once `position` batches were consumed."""
    return 0 if position <= worker else (position - worker + num_workers - 1) // num_workers


class _EpochShare(IterableDataset):
    """One epoch of PK batches for the calling DataLoader worker, starting at a stream position."""

    def __init__(self, spec: _StreamSpec, epoch: int, position: int) -> None:
        super().__init__()
        self.spec, self.epoch, self.position = spec, epoch, position

    def __iter__(self) -> Iterator[dict]:
        sp = self.spec
        info = get_worker_info()
        loader_id, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers round-robin starting at worker 0; after a
        # restore the first batch due is number `position`, owned by logical worker position % nw.
        w = (loader_id + self.position) % nw
        where = f"rank {sp.rank} worker {w}"
        counter = ErrorCounter(sp.max_error_rate, where)
        source = SlotSource(list(sp.urls), counter, seed=sp.seed, epoch=self.epoch, rank=sp.rank,
                            world_size=sp.world_size, worker=w, num_workers=nw, resampled=sp.resampled,
                            sizes=dict(sp.shard_bytes))
        rng = np.random.default_rng(_seed(sp.seed, self.epoch, sp.rank, w, 1))
        buf = PKBuffer(sp.buffer_size, rng)
        tf = train_transform(sp.img_size, sp.augment)
        channel = RandomChannel(0.5) if sp.channel_aug else None

        def decode(s: RawSample) -> Optional[torch.Tensor]:
            try:
                return decode_rgb(s.data, s.ext)
            except Exception as exc:  # corrupt bytes: many exception types
                counter.record("decode", s.url, s.key, exc)
                return None

        skip = worker_skip(self.position, w, nw)
        for j in range(worker_share(sp.steps_per_epoch, w, nw)):
            pairs = form_pk_batch(buf, source, sp.num_ids, sp.num_instances, decode, lambda: source.passes, where)
            if j < skip:
                continue  # consumed before the checkpoint: same selection, no augmentation
            with torch.random.fork_rng(devices=[]), _one_thread():  # own RNG per batch; caller's untouched
                torch.manual_seed(_seed(sp.seed, self.epoch, sp.rank, w, j, 2))
                images = []
                for s, img in pairs:
                    if channel is not None and s.modality == VISIBLE:
                        img = channel(img)
                    images.append(tf(img))
            yield {
                "images": torch.stack(images),
                "pid": torch.tensor([s.label for s, _ in pairs], dtype=torch.int64),
                "camera": torch.tensor([s.camera - 1 for s, _ in pairs], dtype=torch.int64),
                "modality": torch.tensor([s.modality for s, _ in pairs], dtype=torch.int64),
                "key": [s.key for s, _ in pairs],  # for debugging, hard-example logging and naming a bad sample
                "shard": [s.url for s, _ in pairs],
                "_stats": {"worker": w, "errors": counter.errors, "seen": counter.seen},
            }


class TrainStream:
    """Iterable of training batches; exactly `steps_per_epoch` per epoch on every rank; resumable.

    Batches: images float32 [B, 3, H, W] (normalised, mean = std = 0.5), pid int64 contiguous train
    labels, camera int64 0-based (dataset camera - 1), modality int64 (0 infrared, 1 visible); the
    first B/2 images are visible (P identities x K), the last B/2 infrared in the same identity order;
    key and shard: each sample's key and shard URL (lists of str; the trainer uses them only to name
    a bad sample).
    """

    def __init__(self, spec: _StreamSpec, workers: int, index: Optional[dict]) -> None:
        self.spec = spec
        self.workers = workers
        self.index = index
        self.num_classes: Optional[int] = index["num_classes"] if index else None
        self.steps_per_epoch = spec.steps_per_epoch
        self.epoch = 0
        self.position = 0  # batches of self.epoch already handed out
        self.error_count = 0
        self.samples_seen = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (a restored position is kept for it)."""
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch; afterwards the stream moves to the next epoch."""
        epoch = self.epoch
        if self.position >= self.steps_per_epoch:
            return
        dataset = _EpochShare(self.spec, epoch, self.position)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.workers,
                            timeout=LOADER_TIMEOUT_S if self.workers > 0 else 0,
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=2 if self.workers > 0 else None)
        base_errors, base_seen = self.error_count, self.samples_seen
        per_worker: dict[int, tuple[int, int]] = {}
        for batch in loader:
            stats = batch.pop("_stats")
            per_worker[stats["worker"]] = (stats["errors"], stats["seen"])
            self.error_count = base_errors + sum(e for e, _ in per_worker.values())
            self.samples_seen = base_seen + sum(s for _, s in per_worker.values())
            self.position += 1
            yield batch
        if self.position >= self.steps_per_epoch and self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> dict:
        """Stream position and what it depends on (for the checkpoint's client state)."""
        return {"epoch": self.epoch, "batches": self.position, "seed": self.spec.seed, "rank": self.spec.rank,
                "world_size": self.spec.world_size, "workers": self.workers,
                "steps_per_epoch": self.steps_per_epoch, "error_count": self.error_count}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; exact when seed, world size and workers are unchanged."""
        for k in ("epoch", "batches"):
            if k not in state:
                raise DataError(f"stream state lacks {k!r} (got keys {sorted(state)})")
        same = {k: (state.get(k), v) for k, v in (("seed", self.spec.seed), ("world_size", self.spec.world_size),
                                                   ("workers", self.workers),
                                                   ("steps_per_epoch", self.steps_per_epoch))
                if state.get(k, v) != v}
        if same:
            log.warning("stream state was saved with %s (saved, now): resuming at the same position, but the "
                        "batches will differ from an uninterrupted run", same)
        self.epoch = int(state["epoch"])
        self.position = min(int(state["batches"]), self.steps_per_epoch)
        self.error_count = int(state.get("error_count", 0))


def _warn_about_layout(index: Optional[dict], k: int, rank: int) -> None:
    """Say when the shards' training layout costs batch quality: globally shuffled (version 1) shards,
    or identity chunks smaller than data.num_instances (an identity then needs two chunks buffered)."""
    if index is None or rank != 0:
        return
    layout = index.get("train_layout")
    if layout is None:
        log.warning("these shards hold training samples globally shuffled (index version 1): PK batches may "
                    "repeat images; rewrite them with launch/make_shards.py --overwrite for identity chunks")
    elif layout.get("chunk_instances", k) < k:
        log.warning("the shards' identity chunks hold %d images per modality, data.num_instances=%d: an "
                    "identity needs two chunks in the buffer, so some batches repeat images; rewrite the shards "
                    "with make_shards.py --chunk-instances %d", layout["chunk_instances"], k, k)


def build_train_stream(data_cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> TrainStream:
    """The training stream of one rank (data.train_urls, else the train shards in data.shards)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size} is not a valid process position")
    urls, index, counts = resolve_train_urls(data_cfg)
    b = data_cfg.batch_size
    if data_cfg.steps_per_epoch > 0:
        steps = data_cfg.steps_per_epoch
    elif index is not None:  # the selected shards' samples when the index knows them all
        total = sum(counts.values()) if counts and len(counts) == len(urls) else index["counts"]["train"]["total"]
        steps = max(1, total // (b * world_size))
    else:
        raise DataError("data.steps_per_epoch must be set when data.train_urls has no index.json beside it")
    num_ids = data_cfg.num_identities
    _warn_about_layout(index, data_cfg.num_instances, rank)
    if index is not None and index["num_classes"] < num_ids:
        raise DataError(f"data.batch_size={b} needs {num_ids} identities per batch, but the training set "
                        f"has only {index['num_classes']}")
    buffer = max(data_cfg.buffer_size, 2 * b)
    if buffer != data_cfg.buffer_size:
        log.warning("data.buffer_size=%d is below two batches; using %d", data_cfg.buffer_size, buffer)
    spec = _StreamSpec(urls=tuple(urls), seed=seed, rank=rank, world_size=world_size, steps_per_epoch=steps,
                       num_ids=num_ids, num_instances=data_cfg.num_instances, buffer_size=buffer,
                       img_size=tuple(data_cfg.img_size), resampled=data_cfg.resampled,
                       channel_aug=data_cfg.channel_aug, max_error_rate=data_cfg.max_error_rate,
                       augment=data_cfg.augment, shard_bytes=tuple(listed_per_url(urls, index, lambda s: s.get("bytes")).items()))
    log.info("train stream rank %d/%d: %d shards, %d steps/epoch, batch %d = %d ids x (%d vis + %d ir), "
             "%d workers%s", rank, world_size, len(urls), steps, b, num_ids, data_cfg.num_instances,
             data_cfg.num_instances, data_cfg.workers, ", resampled" if data_cfg.resampled else "")
    return TrainStream(spec, data_cfg.workers, index)


# ----------------------------------------------------------------------------------- test loader


class _TestShare(IterableDataset):
    """This rank's test samples (global sample index % world_size == rank), shards dealt to workers."""

    def __init__(self, shards: list[tuple[str, int]], rank: int, world_size: int, batch_size: int,
                 img_size: tuple[int, int], max_error_rate: float) -> None:
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.img_size, self.max_error_rate = batch_size, img_size, max_error_rate

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = ErrorCounter(self.max_error_rate, f"test rank {self.rank} worker {w}")
        tf = eval_transform(self.img_size)
        offsets = np.concatenate([[0], np.cumsum([c for _, c in self.shards])]).astype(int)
        items: list[tuple[RawSample, torch.Tensor]] = []
        for i, (url, _) in enumerate(self.shards):
            if i % nw != w:
                continue
            for j, s in enumerate(iter_shard_samples(url, counter)):
                if (offsets[i] + j) % self.world_size != self.rank:
                    continue
                try:
                    img = decode_rgb(s.data, s.ext)
                except Exception as exc:
                    counter.record("decode", url, s.key, exc)
                    continue
                with _one_thread():
                    items.append((s, tf(img)))
                if len(items) == self.batch_size:
                    yield self._collate(items, counter, w)
                    items = []
        if items:
            yield self._collate(items, counter, w)

    @staticmethod
    def _collate(items: list[tuple[RawSample, torch.Tensor]], counter: ErrorCounter, worker: int) -> dict:
        return {"images": torch.stack([t for _, t in items]),
                "key": [s.key for s, _ in items],
                "pid": torch.tensor([s.pid for s, _ in items], dtype=torch.int64),
                "camera": torch.tensor([s.camera for s, _ in items], dtype=torch.int64),
                "modality": torch.tensor([s.modality for s, _ in items], dtype=torch.int64),
                "_stats": {"worker": worker, "errors": counter.errors}}


class TestLoader:
    """Iterable of test batches for one rank: images, key (list[str]), pid (dataset id), camera
    (dataset's 1-based number), modality. Every test image goes to exactly one rank."""

    __test__ = False  # not a pytest test class

    def __init__(self, dataset: _TestShare, workers: int, num_samples: int) -> None:
        self.dataset = dataset
        self.workers = workers
        self.num_samples = num_samples  # this rank's share
        self.error_count = 0

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            timeout=LOADER_TIMEOUT_S if self.workers > 0 else 0,
                            prefetch_factor=2 if self.workers > 0 else None)
        base = self.error_count
        errors: dict[int, int] = {}
        for batch in loader:
            stats = batch.pop("_stats")
            errors[stats["worker"]] = stats["errors"]
            self.error_count = base + sum(errors.values())
            yield batch


def build_test_loader(data_cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                      batch_size: int = 128) -> TestLoader:
    """Test images of data.shards, this rank's disjoint share (sample index modulo world_size)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size} is not a valid process position")
    if not data_cfg.shards:
        raise DataError("data.shards (a folder with index.json) must be set to evaluate")
    index = read_index(data_cfg.shards)
    check_split_keys(data_cfg.shards, "test", index)  # one key per image: features are matched by key
    shards = [(str(Path(data_cfg.shards) / s["name"]), int(s["count"])) for s in index["shards"]
              if s["split"] == "test"]
    if not shards:
        raise ShardError(f"{Path(data_cfg.shards) / INDEX_NAME}: no test shards listed")
    total = sum(c for _, c in shards)
    share = len(range(rank, total, world_size))
    dataset = _TestShare(shards, rank, world_size, batch_size, tuple(data_cfg.img_size), data_cfg.max_error_rate)
    return TestLoader(dataset, min(data_cfg.workers, len(shards)), share)

