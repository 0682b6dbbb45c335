"""Stream webdataset shards into cross-modality PK batches, identically sized on every rank.

Layout of the work (open_clip style, made exact; `slot_shards` is the node *and* worker splitter,
so webdataset's own splitters, which refuse world_size > 1 unless set explicitly, are not involved):
- Every (rank, DataLoader worker) pair is a *slot* that reads its own shards of each dataset, pass
  after pass (shard_reader.py). Sources are therefore endless and every worker yields exactly its
  share of `steps_per_epoch` batches: no rank waits for another, whatever the shard sizes, and a
  dataset read up before the epoch ends (a high weight) starts its next pass.
- Each worker keeps, per dataset, a bounded buffer of undecoded samples; a batch allots its P
  identities to the datasets in proportion to their weights and takes K visible + K infrared images
  of each (pk_batch.py), then decodes and augments them. Labels and cameras are the run's joint ones
  (sources.py).
- Everything random is seeded by (seed, epoch, rank, worker[, batch]), so the epoch's batch sequence
  is a pure function of those numbers: the stream position is (epoch, batches consumed), and a
  restored stream regenerates the epoch and skips the consumed batches without augmenting them.
- Corrupt images, bad metadata and truncated or missing shards are logged (shard, key), counted and
  skipped; past `data.max_error_rate` the worker raises `DataError`, which ends the run. A shard whose
  bytes hash to another sha256 than index.json lists (hashed as they are read) counts as one such error.
- An error raised in a loader worker reaches the caller as the worker raised it (type and one-line
  message), not as torch's re-raise with the worker's traceback flattened into its message.
- With `data.cache_mb` (in-process loading only) shards read cleanly and decoded images stay in memory
  across passes and epochs (sample_cache.py): the same batches, without re-parsing tars and re-decoding.
- One DataLoader serves every epoch, its workers persistent: each iteration first writes (epoch, position)
  into a shared tensor that a worker reads when the loader restarts it, so the workers produce the batches
  a fresh loader would, without re-forking and re-importing every epoch.
- Images leave the workers as uint8 with the draws of the chain's float steps; `TrainStream.device_images`
  finishes them on the training device (transforms.finish_images): a third of the bytes to copy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mip_dist.config import DataConfig

from .eval_loader import LOADER_TIMEOUT_S, build_test_loader, next_batch  # noqa: F401  (callers import it from here)
from .pk_batch import PKBuffer, PKSource, allot_identities, form_pk_batch
from .records import VISIBLE
from .sample_cache import SampleCache
from .shard_index import read_index  # noqa: F401  (callers import it from here)
from .shard_reader import DataError, ErrorCounter, RawSample, SlotSource, mix_seed
from .sources import ResolvedSource, resolve_sources
from .transforms import IMAGE_OPS, TrainAugment, decode_rgb, finish_images, one_thread
from .urls import listed_per_url

log = logging.getLogger(__name__)

__all__ = ["DataError", "TrainStream", "build_train_stream", "build_test_loader", "read_index"]


@dataclass(frozen=True)
class _SourceSpec:
    """One dataset as a worker reads it (plain, picklable)."""

    urls: tuple[str, ...]
    weight: float
    label_offset: int
    camera_offset: int
    max_identities: Optional[int]  # its identities, when its index is known
    shard_bytes: tuple[tuple[str, int], ...] = ()  # sizes from index.json, checked when a shard is opened
    shard_sha256: tuple[tuple[str, str], ...] = ()  # hashes from index.json, checked as a shard is read
    shard_counts: tuple[tuple[str, int], ...] = ()  # samples index.json lists: a shard read short loses the rest


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker needs to regenerate its share of an epoch (plain, picklable)."""

    sources: tuple[_SourceSpec, ...]
    seed: int
    rank: int
    world_size: int
    steps_per_epoch: int
    num_ids: int
    num_instances: int
    buffer_size: int  # samples per dataset: a worker buffers up to this many undecoded samples of each
    img_size: tuple[int, int]
    resampled: bool
    channel_aug: bool
    max_error_rate: float
    augment: str = "paper"


def worker_share(steps: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` yields: the DataLoader takes batch i from worker i % num_workers."""
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


def worker_skip(position: int, worker: int, num_workers: int) -> int:
    """How many of its batches worker `worker` had delivered once `position` batches were consumed."""
    return 0 if position <= worker else (position - worker + num_workers - 1) // num_workers

class _EpochShare(IterableDataset):
    """One epoch of PK batches for the calling DataLoader worker, from the stream position in `where`.

    `where` ([epoch, position], int64) is shared with the loader's persistent workers: the main process
    writes it before each iteration, and a worker reads it when the loader (re)starts its iterator."""

    def __init__(self, spec: _StreamSpec, where: torch.Tensor, cache: Optional[SampleCache] = None) -> None:
        super().__init__()
        self.spec, self.where, self.cache = spec, where, cache

    def __iter__(self) -> Iterator[dict]:
        """Read the position now (when the loader restarts this worker), not at the first batch."""
        epoch, position = (int(v) for v in self.where.tolist())
        return self._batches(epoch, position)

    def _batches(self, epoch: int, position: int) -> Iterator[dict]:
        """This worker's batches of `epoch` from stream position `position`."""
        sp = self.spec
        info = get_worker_info()
        loader_id, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers round-robin starting at worker 0; after a
        # restore the first batch due is number `position`, owned by logical worker position % nw.
        w = (loader_id + position) % nw
        where = f"rank {sp.rank} worker {w}"
        counter = ErrorCounter(sp.max_error_rate, where)  # one error budget over all datasets
        sources = [self._source(i, src, counter, epoch, w, nw) for i, src in enumerate(sp.sources)]
        mix = np.random.default_rng(mix_seed(sp.seed, epoch, sp.rank, w, 3))
        weights = [src.weight for src in sp.sources]
        caps = [src.max_identities for src in sp.sources]
        augment = TrainAugment(sp.img_size, sp.augment, sp.channel_aug)

        def read_image(s: RawSample) -> Optional[torch.Tensor]:
            try:
                return decode_rgb(s.data, s.ext)
            except Exception as exc:  # corrupt bytes: many exception types
                counter.record("decode", s.url, s.key, exc)
                return None

        def decode(s: RawSample) -> Optional[torch.Tensor]:
            return read_image(s) if self.cache is None else self.cache.image(s, read_image)

        skip = worker_skip(position, w, nw)
        for j in range(worker_share(sp.steps_per_epoch, w, nw)):
            counts = allot_identities(sp.num_ids, weights, caps, mix)
            pairs = form_pk_batch(sources, counts, sp.num_instances, decode, where)
            if j < skip:
                continue  # consumed before the checkpoint: same selection, no augmentation
            with torch.random.fork_rng(devices=[]), one_thread():  # own RNG per batch; caller's untouched
                torch.default_generator.manual_seed(mix_seed(sp.seed, epoch, sp.rank, w, j, 2))  # CPU only:
                # torch.manual_seed would also reseed the GPU generators, which fork_rng(devices=[]) does not restore
                images, ops = augment.uint8([img for _, img in pairs], [s.modality == VISIBLE for s, _ in pairs])
            yield {
                "images": images,
                **ops,  # grey, erase_box, erase_fill: the float steps finish_images applies
                "pid": torch.tensor([s.label for s, _ in pairs], dtype=torch.int64),
                "camera": torch.tensor([s.camera - 1 for s, _ in pairs], dtype=torch.int64),
                "modality": torch.tensor([s.modality for s, _ in pairs], dtype=torch.int64),
                "key": [s.key for s, _ in pairs],  # for debugging, hard-example logging and naming a bad sample
                "shard": [s.url for s, _ in pairs],
                "_stats": {"worker": w, "errors": counter.errors},
            }

    def _source(self, i: int, src: _SourceSpec, counter: ErrorCounter, epoch: int, worker: int,
                num_workers: int) -> PKSource:
        """Dataset i's reader and buffer in this worker; dataset 0's seeds are the single-dataset ones, so a
        one-dataset run draws exactly what it drew before several datasets were supported."""
        sp = self.spec
        extra = (i,) if i else ()
        reader = SlotSource(list(src.urls), counter, seed=mix_seed(sp.seed, i) if i else sp.seed, epoch=epoch,
                            rank=sp.rank, world_size=sp.world_size, worker=worker, num_workers=num_workers,
                            resampled=sp.resampled, sizes=dict(src.shard_bytes), digests=dict(src.shard_sha256),
                            counts=dict(src.shard_counts), label_offset=src.label_offset,
                            camera_offset=src.camera_offset, cache=self.cache)
        buf = PKBuffer(sp.buffer_size, np.random.default_rng(mix_seed(sp.seed, epoch, sp.rank, worker, 1, *extra)))
        return PKSource(reader, buf, lambda: reader.passes, src.max_identities)


class TrainStream:
    """Iterable of training batches; exactly `steps_per_epoch` per epoch on every rank; resumable.

    Batches: images uint8 [B, 3, H, W] with the draws of the float steps (grey bool [B], erase_box int64
    [B, 4], erase_fill float32 [N]; transforms.IMAGE_OPS), which `device_images` turns into the normalised
    images (mean = std = 0.5) on the training device in the model's dtype; pid int64 contiguous train
    labels, camera int64 0-based (dataset camera - 1; both after the dataset's label / camera offset
    when several datasets train together), modality int64 (0 infrared, 1 visible); the
    first B/2 images are visible (P identities x K), the last B/2 infrared in the same identity order;
    key and shard: each sample's key and shard URL (lists of str; the trainer uses them only to name
    a bad sample).
    """

    def __init__(self, spec: _StreamSpec, workers: int, cache_bytes: int = 0) -> None:
        self.spec = spec
        self.workers = workers
        self.cache = SampleCache(cache_bytes) if cache_bytes else None  # workers=0 only (config.validate)
        self.steps_per_epoch = spec.steps_per_epoch
        self.epoch = 0
        self.position = 0  # batches of self.epoch already handed out
        self.error_count = 0
        self._where = torch.zeros(2, dtype=torch.int64)  # [epoch, position] for the loader's workers
        if workers > 0:
            self._where.share_memory_()
        self._loader: Optional[DataLoader] = None
        self._iteration = 0  # the newest iteration; an older one may no longer read the loader

    @staticmethod
    def device_images(batch: dict, device: Union[str, torch.device], dtype: torch.dtype) -> torch.Tensor:
        """The batch's images on `device` in `dtype`, normalised there (uint8 and the float steps' draws cross
        the bus); a batch with float images (finished on the host) is only moved."""
        ops = {k: batch[k] for k in IMAGE_OPS} if IMAGE_OPS[0] in batch else None
        return finish_images(batch["images"], ops, device, dtype)

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
        self._iteration += 1
        iteration = self._iteration
        self._where.copy_(torch.tensor([epoch, self.position]))  # before the loader (re)starts its workers
        loader = self._loader if self._loader is not None else self._make_loader()
        base_errors = self.error_count
        per_worker: dict[int, int] = {}
        batches = iter(loader)
        while True:
            if iteration != self._iteration:  # its next batch would be the newer iteration's
                raise RuntimeError("a newer iteration of this TrainStream restarted its loader; iterate one at a time")
            batch = next_batch(batches)
            if batch is None:
                break
            stats = batch.pop("_stats")
            per_worker[stats["worker"]] = stats["errors"]
            self.error_count = base_errors + sum(per_worker.values())
            self.position += 1
            yield batch
        if self.position >= self.steps_per_epoch and self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def _make_loader(self) -> DataLoader:
        """The stream's one DataLoader: workers persist across epochs; batches are pinned for a CUDA device."""
        self._loader = DataLoader(_EpochShare(self.spec, self._where, self.cache), batch_size=None,
                                  num_workers=self.workers, timeout=LOADER_TIMEOUT_S if self.workers > 0 else 0,
                                  pin_memory=torch.cuda.is_available(), persistent_workers=self.workers > 0,
                                  prefetch_factor=2 if self.workers > 0 else None)
        return self._loader

    def state_dict(self) -> dict:
        """Stream position and what it depends on (for the checkpoint's client state)."""
        return {"epoch": self.epoch, "batches": self.position, "seed": self.spec.seed, "rank": self.spec.rank,
                "world_size": self.spec.world_size, "workers": self.workers,
                "steps_per_epoch": self.steps_per_epoch, "error_count": self.error_count,
                "datasets": self._datasets()}

    def _datasets(self) -> list[list]:
        """[weight, identities] per dataset: another mix regenerates other batches at the same position."""
        return [[src.weight, src.max_identities] for src in self.spec.sources]

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; exact when seed, world size, workers and datasets are unchanged."""
        for k in ("epoch", "batches"):
            if k not in state:
                raise DataError(f"stream state lacks {k!r} (got keys {sorted(state)})")
        same = {k: (state.get(k), v) for k, v in (("seed", self.spec.seed), ("world_size", self.spec.world_size),
                                                   ("workers", self.workers),
                                                   ("steps_per_epoch", self.steps_per_epoch),
                                                   ("datasets", self._datasets()))
                if state.get(k, v) != v}
        if same:
            log.warning("stream state was saved with %s (saved, now): resuming at the same position, but the "
                        "batches will differ from an uninterrupted run", same)
        self.epoch = int(state["epoch"])
        self.position = min(int(state["batches"]), self.steps_per_epoch)
        self.error_count = int(state.get("error_count", 0))


def _warn_about_layout(src: ResolvedSource, k: int) -> None:
    """Say when a dataset's training layout costs batch quality: globally shuffled (version 1) shards,
    or identity chunks smaller than data.num_instances (an identity then needs two chunks buffered)."""
    if src.index is None:
        return
    layout = src.index.get("train_layout")
    if layout is None:
        log.warning("the shards of %s hold training samples globally shuffled (index version 1): PK batches may "
                    "repeat images; rewrite them with launch/make_shards.py --overwrite for identity chunks", src.name)
    elif layout.get("chunk_instances", k) < k:
        log.warning("the identity chunks of %s hold %d images per modality, data.num_instances=%d: an identity "
                    "needs two chunks in the buffer, so some batches repeat images; rewrite the shards with "
                    "make_shards.py --chunk-instances %d", src.name, layout["chunk_instances"], k, k)


def _digests(src: ResolvedSource) -> dict[str, str]:
    """The sha256 index.json lists for each of the source's shards (those it lists)."""
    return listed_per_url(list(src.urls), src.index, lambda s: s.get("sha256"), str)


def _counts(src: ResolvedSource) -> dict[str, int]:
    """The samples index.json lists in each of the source's shards (those it lists)."""
    return listed_per_url(list(src.urls), src.index, lambda s: s.get("count"), int)


def _steps_per_epoch(data_cfg: DataConfig, sources: list[ResolvedSource], world_size: int) -> int:
    """data.steps_per_epoch, else the training images of every dataset once over batch size x ranks."""
    if data_cfg.steps_per_epoch > 0:
        return data_cfg.steps_per_epoch
    totals = [s.total_images for s in sources]
    if any(t is None for t in totals):
        raise DataError("data.steps_per_epoch must be set when data.train_urls has no index.json beside it")
    return max(1, sum(totals) // (data_cfg.batch_size * world_size))


def build_train_stream(data_cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                       verify: bool = True) -> TrainStream:
    """The training stream of one rank over every training dataset (data.train_urls, else data.shards);
    `verify=False` skips the shard hashes (only bench_data.py, to measure what they cost)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size} is not a valid process position")
    sources = resolve_sources(data_cfg)
    b, num_ids = data_cfg.batch_size, data_cfg.num_identities
    steps = _steps_per_epoch(data_cfg, sources, world_size)
    if rank == 0:
        for src in sources:
            _warn_about_layout(src, data_cfg.num_instances)
    known = [s.num_classes for s in sources if s.num_classes is not None]
    if len(known) == len(sources) and sum(known) < num_ids:
        raise DataError(f"data.batch_size={b} needs {num_ids} identities per batch, but the training set "
                        f"has only {sum(known)}")
    buffer = max(data_cfg.buffer_size, 2 * b)
    if buffer != data_cfg.buffer_size:
        log.warning("data.buffer_size=%d is below two batches; using %d", data_cfg.buffer_size, buffer)
    specs = tuple(_SourceSpec(urls=s.urls, weight=s.weight, label_offset=s.label_offset, camera_offset=s.camera_offset,
                              max_identities=s.num_classes, shard_bytes=tuple(s.shard_bytes.items()),
                              shard_sha256=tuple(_digests(s).items()) if verify else (),
                              shard_counts=tuple(_counts(s).items())) for s in sources)
    spec = _StreamSpec(sources=specs, seed=seed, rank=rank, world_size=world_size, steps_per_epoch=steps,
                       num_ids=num_ids, num_instances=data_cfg.num_instances, buffer_size=buffer,
                       img_size=tuple(data_cfg.img_size), resampled=data_cfg.resampled,
                       channel_aug=data_cfg.channel_aug, max_error_rate=data_cfg.max_error_rate,
                       augment=data_cfg.augment)
    log.info("train stream rank %d/%d: %d shards, %d steps/epoch, batch %d = %d ids x (%d vis + %d ir), "
             "%d workers%s", rank, world_size, sum(len(s.urls) for s in sources), steps, b, num_ids,
             data_cfg.num_instances, data_cfg.num_instances, data_cfg.workers,
             ", resampled" if data_cfg.resampled else "")
    if len(sources) > 1:
        log.info("datasets (name: weight, identities, cameras): %s", ", ".join(
            f"{s.name}: {s.weight:g}, {s.num_classes}, {s.num_cameras}" for s in sources))
    return TrainStream(spec, data_cfg.workers, cache_bytes=data_cfg.cache_mb << 20)
