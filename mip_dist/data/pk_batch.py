"""Cross-modality PK batches from a bounded buffer of undecoded samples, one buffer per dataset.

A batch takes P identities that have both modalities buffered, K visible + K infrared images each
(distinct images first; with replacement only when an identity is short), decoded by the caller's
function. With several datasets, each has its own buffer and reader, and the batch's P identities
are allotted to the datasets in proportion to their weights (`allot_identities`), so a dataset is
read only as fast as it is used.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .grouping import image_key
from .records import INFRARED, VISIBLE
from .shard_reader import DataError, RawSample

Decode = Callable[[RawSample], Optional[torch.Tensor]]
Pair = tuple[RawSample, Optional[torch.Tensor]]


class PKBuffer:
    """Bounded buffer of undecoded samples indexed by (label, modality), oldest-first eviction."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self._items: dict[int, RawSample] = {}  # insertion ordered: first = oldest
        self._by_id: dict[int, tuple[list[int], list[int]]] = {}  # label -> (infrared seqs, visible seqs)
        self._images: dict[int, tuple[Counter, Counter]] = {}  # label -> buffered copies per image, per modality
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
        self._images.setdefault(s.label, (Counter(), Counter()))[s.modality][image_key(s.key)] += 1
        self._seq += 1

    def _remove(self, seq: int) -> RawSample:
        s = self._items.pop(seq)
        lists = self._by_id[s.label]
        lists[s.modality].remove(seq)
        copies = self._images[s.label][s.modality]
        image = image_key(s.key)
        copies[image] -= 1
        if not copies[image]:
            del copies[image]
        if not lists[0] and not lists[1]:
            del self._by_id[s.label], self._images[s.label]
        return s

    def evict_oldest(self) -> RawSample:
        """Drop the oldest sample (makes room when no identity has both modalities)."""
        return self._remove(next(iter(self._items)))

    def pick_identity(self, exclude: set[int], k: int = 1) -> Optional[int]:
        """An identity with both modalities buffered, chosen with probability ~ its buffered count.

        Preferred, in order: identities with k distinct images of each modality buffered; then k
        samples of each; then any. Distinct images first because what an identity's earlier batches
        left behind can hold an image and its padding copy (`key~n`), k samples but fewer images;
        such identities come next, before short ones, so those copies leave the buffer."""
        both = [l for l, (ir, vis) in self._by_id.items() if ir and vis and l not in exclude]
        distinct = [l for l in both if len(self._images[l][0]) >= k and len(self._images[l][1]) >= k]
        labels = sorted(distinct or [l for l in both if len(self._by_id[l][0]) >= k and len(self._by_id[l][1]) >= k]
                        or both)
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


@dataclass
class PKSource:
    """One dataset's side of a worker: its endless samples, its buffer, and how many passes it has read
    (the batcher gives up on a dataset whose buffer yields no identity after two more passes)."""

    samples: Iterator[RawSample]
    buffer: PKBuffer
    passes: Callable[[], int]
    max_identities: Optional[int] = None  # identities it holds, when known: a batch never asks it for more


def pick_identities(src: PKSource, n: int, k: int, decode: Decode, where: str,
                    batch_ids: int) -> list[tuple[int, list[Pair], list[Pair]]]:
    """n distinct identities of one dataset, each with K visible and K infrared (sample, image) pairs.
    Short modalities are filled with replacement; samples that fail to decode are replaced by
    decodable ones of the same identity and modality."""
    buf = src.buffer
    chosen: list[tuple[int, list[Pair], list[Pair]]] = []
    start_passes = src.passes()
    while len(chosen) < n:
        while not buf.full:
            buf.add(next(src.samples))
        label = buf.pick_identity({c[0] for c in chosen}, k)
        if label is None:
            if src.passes() - start_passes >= 2:
                raise DataError(f"{where}: cannot form a batch of {batch_ids} identities with both modalities "
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
    return chosen


def allot_identities(num_ids: int, weights: Sequence[float], caps: Sequence[Optional[int]],
                     rng: np.random.Generator) -> list[int]:
    """How many of a batch's identities each dataset gives: num_ids draws in proportion to the weights,
    a dataset leaving the draw once it gives all the identities it holds. One dataset: no draw."""
    if len(weights) == 1:
        return [num_ids]
    counts = [0] * len(weights)
    for _ in range(num_ids):
        w = np.array([wt if cap is None or c < cap else 0.0 for wt, cap, c in zip(weights, caps, counts)], np.float64)
        if w.sum() <= 0:
            raise DataError(f"the datasets hold {sum(counts)} identities, fewer than the {num_ids} a batch needs")
        counts[int(rng.choice(len(w), p=w / w.sum()))] += 1
    return counts


def form_pk_batch(sources: Sequence[PKSource], counts: Sequence[int], k: int, decode: Decode,
                  where: str) -> list[Pair]:
    """P = sum(counts) identities x (K visible + K infrared), counts[i] of them from sources[i]:
    visible block first (identity-major), then infrared in the same identity order."""
    batch_ids = sum(counts)
    chosen = [c for src, n in zip(sources, counts) if n
              for c in pick_identities(src, n, k, decode, where, batch_ids)]
    return [pair for c in chosen for pair in c[1]] + [pair for c in chosen for pair in c[2]]
