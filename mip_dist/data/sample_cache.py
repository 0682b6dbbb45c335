"""Training samples kept in memory after their first read (data.cache_mb): a small dataset, such as the
demo's, is parsed from its tars and decoded once instead of on every pass.

What is kept is exactly what a new read would give: a shard's samples only after a complete read that
recorded no error (a shard with a bad sample is read, and its errors counted, every pass as before),
and an image only once it decoded. The cache changes no batch; it stops growing at its budget.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .shard_reader import RawSample

log = logging.getLogger(__name__)


class SampleCache:
    """Shard contents and decoded images of one reading process, up to `budget_bytes` in all."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._shards: dict[str, list[RawSample]] = {}
        self._images: dict[tuple[str, str], torch.Tensor] = {}
        self._full_logged = False

    def shard(self, url: str) -> Optional[list[RawSample]]:
        """The samples of a shard read before, in order, or None."""
        return self._shards.get(url)

    def keep_shard(self, url: str, samples: list[RawSample]) -> None:
        """Keep a shard's samples (call only after a complete read without errors)."""
        if url not in self._shards and self._fits(sum(len(s.data) for s in samples)):
            self._shards[url] = samples

    def image(self, sample: RawSample, decode: Callable[[RawSample], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """The sample's decoded image, decoded on the first request; None (not kept) when decoding fails."""
        key = (sample.url, sample.key)
        img = self._images.get(key)
        if img is None:
            img = decode(sample)
            if img is not None and self._fits(img.numel() * img.element_size()):
                self._images[key] = img
        return img

    def _fits(self, nbytes: int) -> bool:
        """Charge nbytes to the budget if they fit; say once when the cache is full."""
        if self.used_bytes + nbytes <= self.budget_bytes:
            self.used_bytes += nbytes
            return True
        if not self._full_logged:
            self._full_logged = True
            log.info("data.cache_mb=%d is full (%.0f MiB held); later shards and images are read from disk",
                     self.budget_bytes >> 20, self.used_bytes / 2**20)
        return False
