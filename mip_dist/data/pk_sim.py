"""Metadata-only simulation of the PK batcher over a shard layout (no images): batch quality and cost.

Drives the stream's own `PKBuffer` / `form_pk_batch` with samples that carry only labels, so the
batch quality of a shard layout can be measured at any number of identities in seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mip_dist.config import DataConfig

from .grouping import Slot, identity_chunks, image_key, repeat_key
from .records import INFRARED, VISIBLE
from .pk_batch import PKBuffer, PKSource, form_pk_batch
from .shard_reader import RawSample


@dataclass
class PKStats:
    """Quality and cost of one simulated epoch (or window of batches)."""

    batches: int
    duplicate_fraction: float  # images per batch that repeat an image already in that batch
    short_identity_fraction: float  # picked identities with fewer than K distinct images of a modality
    identities_covered: float  # distinct identities seen / identities
    samples_read_per_batch: float
    unused_read_fraction: float  # samples read but never placed in a batch
    ms_per_batch: float  # buffer + batcher work only


def layout_order(ids: int, per_modality: int, k: int, layout: str, seed: int) -> list[list[Slot]]:
    """Written training order for `ids` identities with `per_modality` images of each modality:
    'shuffled' (one global permutation, the version-1 writer) or 'chunks' (identity chunks)."""
    labels = np.repeat(np.arange(ids), 2 * per_modality)
    modalities = np.tile(np.repeat([VISIBLE, INFRARED], per_modality), ids)
    if layout == "chunks":
        return identity_chunks(labels, modalities, k, seed)
    if layout == "shuffled":
        return [[Slot(int(i), 0)] for i in np.random.default_rng([seed, 4242]).permutation(len(labels))]
    raise ValueError(f"layout must be 'shuffled' or 'chunks', got {layout!r}")


def _samples(order: list[list[Slot]], per_modality: int, shard_samples: int, seed: int) -> Iterator[RawSample]:
    """Endless samples: the order cut into shards at chunk boundaries, shard order re-permuted per pass."""
    shards: list[list[Slot]] = [[]]
    for chunk in order:
        if shards[-1] and len(shards[-1]) + len(chunk) > shard_samples:
            shards.append([])
        shards[-1].extend(chunk)
    rng = np.random.default_rng([seed, 7])
    while True:
        for s in rng.permutation(len(shards)):
            for slot in shards[s]:
                label, within = divmod(slot.item, 2 * per_modality)
                modality = VISIBLE if within < per_modality else INFRARED
                key = repeat_key(str(slot.item), slot.repeat) if slot.repeat else str(slot.item)
                yield RawSample(key, "", "jpg", b"", label, label, 1, modality)


def simulate(ids: int, per_modality: int, *, layout: str, num_ids: int = 8, k: int = 4, chunk_k: int = 4,
             buffer_size: int = DataConfig.buffer_size, shard_samples: int = 1000, batches: int = 0,
             seed: int = 0) -> PKStats:
    """Run the batcher for `batches` batches (0: one epoch = all images / batch size) over shards of
    `shard_samples` samples, and measure."""
    order = layout_order(ids, per_modality, chunk_k, layout, seed)
    source = _samples(order, per_modality, shard_samples, seed)
    read = [0]

    def counted() -> Iterator[RawSample]:
        for s in source:
            read[0] += 1
            yield s

    stream = counted()
    buf = PKBuffer(max(buffer_size, 2 * num_ids * 2 * k), np.random.default_rng([seed, 1]))
    src = PKSource(stream, buf, lambda: 0)
    n = batches or max(1, ids * 2 * per_modality // (num_ids * 2 * k))
    dups = short = picked = 0
    seen_ids: set[int] = set()
    used = 0
    work = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        pairs = form_pk_batch([src], [num_ids], k, lambda s: 0, "simulation")
        work += time.perf_counter() - t0
        keys = [image_key(s.key) for s, _ in pairs]
        distinct = len(set(keys))
        dups += len(keys) - distinct
        used += distinct
        by_id: dict[tuple[int, int], set[str]] = {}
        for s, _ in pairs:
            by_id.setdefault((s.label, s.modality), set()).add(image_key(s.key))
            seen_ids.add(s.label)
        labels = {label for label, _ in by_id}
        picked += len(labels)
        short += sum(1 for label in labels if any(len(by_id.get((label, m), ())) < k for m in (VISIBLE, INFRARED)))
    images = n * num_ids * 2 * k
    return PKStats(batches=n, duplicate_fraction=dups / images, short_identity_fraction=short / max(picked, 1),
                   identities_covered=len(seen_ids) / ids, samples_read_per_batch=read[0] / n,
                   unused_read_fraction=max(0.0, 1 - used / max(read[0], 1)), ms_per_batch=1000 * work / n)
