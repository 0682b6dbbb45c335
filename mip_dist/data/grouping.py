"""Training-sample order for the shard writer: identity chunks of K visible + K infrared images.

A PK batch needs K distinct visible and K distinct infrared images of each of its P identities. When
shards hold the training set globally shuffled, a bounded read buffer sees an identity's images spread
over the whole epoch, so batches repeat images (a quarter of every batch at SYSU-MM01's size, most of it
past a few thousand identities). Written as chunks instead, each chunk K visible + K infrared images of
one identity, shuffled chunk by chunk and cut into shards only between chunks, the buffer receives
identities complete, whatever their number.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .records import INFRARED, VISIBLE


REPEAT_MARK = "~"  # shard key of the n-th extra copy of an image: f"{key}{REPEAT_MARK}{n}" (keys never hold "~")


def image_key(sample_key: str) -> str:
    """The key of the image a sample holds (its own key, or the key it repeats)."""
    return sample_key.split(REPEAT_MARK, 1)[0]


def repeat_key(key: str, n: int) -> str:
    """Shard key of the n-th extra copy (n >= 1) of the image stored under `key`."""
    return f"{key}{REPEAT_MARK}{n}"


@dataclass(frozen=True)
class Slot:
    """One sample position in the written order: which item, and whether it repeats one written before
    (padding that completes an identity's last chunk)."""

    item: int
    repeat: int  # 0 for the item's first copy, n for its n-th extra copy


def _deal(items: list[int], k: int, chunks: int, rng: np.random.Generator) -> list[list[int]]:
    """`chunks` groups of k items drawn from `items`: each item at least once when there are enough
    groups, distinct within a group whenever len(items) >= k."""
    order = [items[i] for i in rng.permutation(len(items))]
    need = chunks * k
    while len(order) < need:  # padding: further shuffled passes over the identity's own items
        order += [items[i] for i in rng.permutation(len(items))]
    groups = [order[c * k:(c + 1) * k] for c in range(chunks)]
    if len(items) >= k:  # a group that drew an item twice across a pass boundary swaps with a later pick
        for g in groups:
            seen: set[int] = set()
            for j, it in enumerate(g):
                if it in seen:
                    g[j] = next(x for x in (items[i] for i in rng.permutation(len(items))) if x not in seen)
                seen.add(g[j])
    return groups


def identity_chunks(labels: Sequence[int], modalities: Sequence[int], k: int, seed: int) -> list[list[Slot]]:
    """The training items in chunks of k visible then k infrared samples of one identity, chunk order
    shuffled with `seed`. An identity gets max(ceil(V/k), ceil(I/k)) chunks, so every image is written
    at least once; its scarcer modality is padded with repeats of its own images (distinct within a chunk
    while it has at least k). Identities with one modality only become chunks of up to 2k images."""
    if k < 1:
        raise ValueError(f"chunk size k must be >= 1, got {k}")
    rng = np.random.default_rng([seed, 4243])
    by_id: dict[int, dict[int, list[int]]] = defaultdict(lambda: {INFRARED: [], VISIBLE: []})
    for i, (label, modality) in enumerate(zip(labels, modalities)):
        by_id[int(label)][int(modality)].append(i)
    chunks: list[list[int]] = []
    for label in sorted(by_id):
        vis, ir = by_id[label][VISIBLE], by_id[label][INFRARED]
        if not vis or not ir:
            alone = vis or ir
            chunks += [alone[j:j + 2 * k] for j in range(0, len(alone), 2 * k)]
            continue
        n = max(-(-len(vis) // k), -(-len(ir) // k))
        chunks += [v + r for v, r in zip(_deal(vis, k, n, rng), _deal(ir, k, n, rng))]
    copies: dict[int, int] = defaultdict(int)
    out: list[list[Slot]] = []
    for c in rng.permutation(len(chunks)):
        slots = []
        for item in chunks[c]:
            slots.append(Slot(item, copies[item]))
            copies[item] += 1
        out.append(slots)
    return out
