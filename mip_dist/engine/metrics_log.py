"""Rank-0 training telemetry: metrics.jsonl, TensorBoard scalars, a log line, and throughput timing."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Drop records with step > max_step (a resumed run rewrites what the killed run logged after its
    checkpoint); returns how many records were kept."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if rec.get("step", -1) <= max_step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))
    return len(kept)


class MetricsLogger:
    """Appends records to metrics.jsonl and mirrors numeric ones to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._file = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._file = self.path.open("a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        except ImportError as exc:  # tensorboard is a declared dependency; keep training if it is broken
            log.warning("TensorBoard disabled: %s", exc)

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """One JSON line plus a TensorBoard scalar per finite number (tagged prefix/key)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key in ("step", "epoch", "kind") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close the file and the TensorBoard writer."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class StepTimer:
    """Accumulates data-wait and total time between log lines to report img/s and the wait fraction."""

    def __init__(self) -> None:
        self.reset()
        self.start = time.perf_counter()
        self.steps_done = 0
        self.seconds_done = 0.0
        self.images_done = 0

    def reset(self) -> None:
        """Start a new logging window."""
        self.window_start = time.perf_counter()
        self.excluded = 0.0
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0

    def add(self, data_wait: float, images: int, optimizer_steps: int) -> None:
        """Record one micro-batch's wait time and size (images on this rank)."""
        self.data_wait += data_wait
        self.images += images
        self.steps += optimizer_steps

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (checkpoints, evaluation) out of the throughput."""
        self.excluded += seconds

    def window(self, world_size: int, steps_left: int) -> dict[str, float]:
        """Throughput of the window ending now, and the ETA from the mean step time so far."""
        now = time.perf_counter()
        elapsed = max(now - self.window_start - self.excluded, 1e-9)
        self.steps_done += self.steps
        self.seconds_done += elapsed
        self.images_done += self.images
        per_step = self.seconds_done / max(1, self.steps_done)
        per_rank = self.images / elapsed
        return {
            "img_s": per_rank * world_size,
            "img_s_rank": per_rank,
            "data_wait": self.data_wait / elapsed,
            "step_time": elapsed / max(1, self.steps),
            "eta_min": per_step * steps_left / 60.0,
        }

    def steps_so_far(self) -> int:
        """Optimizer steps timed since the start, the open window included."""
        return self.steps_done + self.steps

    def rate_so_far(self, world_size: int) -> tuple[float, float]:
        """(img/s over all ranks, seconds per optimizer step) since the start, the open window included."""
        seconds = self.seconds_done + max(time.perf_counter() - self.window_start - self.excluded, 1e-9)
        images = self.images_done + self.images
        return images * world_size / seconds, seconds / max(1, self.steps_so_far())


_TIMING_KEYS = ("kind", "step", "epoch", "lr", "img_s", "img_s_rank", "data_wait", "step_time", "eta_min",
                "bad_steps_total")


def format_train_record(record: dict[str, Any], total_steps: int) -> str:
    """One log line for a training window: step, losses, LR, throughput, data wait and ETA."""
    parts = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k not in _TIMING_KEYS)
    return (f"step {record['step']}/{total_steps} ep {record['epoch']:.2f} {parts} lr={record['lr']:.3e} "
            f"img/s={record['img_s']:.1f} ({record['img_s_rank']:.1f}/rank) data_wait={100 * record['data_wait']:.0f}% "
            f"eta={record['eta_min']:.1f}min")
