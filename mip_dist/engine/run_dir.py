"""Where a run writes: a new timestamped or named directory, or the one a resumed checkpoint belongs to;
a finished run is never overwritten silently."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from mip_dist.config import Config

from . import checkpoint as ckpt
from .distributed import broadcast_object

FINISHED = "FINISHED"  # marker (with the summary) written by rank 0 when a run completes


class RunDirError(RuntimeError):
    """The run directory exists and resuming was not asked for."""


def resolve_run_dir(cfg: Config, resume: Optional[str]) -> tuple[Path, Optional[Path]]:
    """(run directory, checkpoint tag to resume from). Refuses to reuse a non-empty run directory
    unless resuming, so a finished run is never overwritten silently."""
    output_dir = Path(cfg.train.output_dir)
    named = output_dir / cfg.train.run_name if cfg.train.run_name else None
    tag = ckpt.resolve_resume(resume, named, output_dir) if resume else None
    if tag is not None:
        return tag.parent.parent, tag
    if named is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        named = output_dir / stamp
        n = 1
        while named.exists():
            named, n = output_dir / f"{stamp}-{n}", n + 1
    elif named.exists() and any(named.iterdir()) and resume != "auto":
        state = "a finished run" if (named / FINISHED).exists() else "an earlier run"
        raise RunDirError(f"train.run_name: {named} already holds {state}; pass --resume auto to continue it "
                          "or choose another train.run_name")
    return named, None


def agree_run_dir(cfg: Config, resume: Optional[str], is_main: bool) -> tuple[Path, Optional[Path]]:
    """Rank 0 picks the run directory (timestamps, existence checks); every rank follows or fails alike."""
    decision: Any = None
    if is_main:
        try:
            decision = resolve_run_dir(cfg, resume)
        except (RunDirError, FileNotFoundError, ValueError) as exc:
            decision = exc
    decision = broadcast_object(decision)
    if isinstance(decision, Exception):
        raise decision
    return decision
