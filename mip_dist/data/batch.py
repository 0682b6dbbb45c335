"""Host-side checks of a training batch, done once before it moves to the device."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .records import INFRARED, VISIBLE


class BatchError(ValueError):
    """A batch carries a label outside the range the model was built for."""


def _first_bad(values: np.ndarray, low: int, high: int) -> Optional[int]:
    """Index of the first value outside [low, high), or None."""
    bad = np.flatnonzero((values < low) | (values >= high))
    return int(bad[0]) if bad.size else None


def check_batch(batch: dict[str, Any], num_classes: int, num_cameras: int) -> None:
    """Refuse labels the model would index out of range, naming the shard and sample key.

    Runs on the host tensors the loader produced (NumPy views, no dispatched op), so the model, the
    losses and the kernel read no label values on the device: a GPU step stays free of host syncs."""
    ranges = {"pid": (num_classes, "training label, index.json num_classes"),
              "camera": (num_cameras, "0-based camera, index.json num_cameras"),
              "modality": (VISIBLE + 1, f"{INFRARED} infrared / {VISIBLE} visible")}
    keys, shards = batch.get("key"), batch.get("shard")
    for name, (high, meaning) in ranges.items():
        t = batch.get(name)
        if t is None:
            continue
        if t.device.type != "cpu":
            raise BatchError(f"check_batch needs the host batch; '{name}' is already on {t.device}")
        values = np.asarray(t.tolist())  # a CPU tolist dispatches no op: no sync, nothing for a tracing mode
        i = _first_bad(values, 0, high)
        if i is not None:
            place = f" in shard {shards[i]}, sample {keys[i]}" if keys and shards else ""
            raise BatchError(f"batch '{name}' value {int(values[i])} is outside [0, {high}) ({meaning}){place}; "
                             "the shards disagree with their index.json: rewrite them with launch/make_shards.py")
