"""DeepSpeed checkpoints of a run: `Checkpointer` saves a tag (every rank's shard, then rank 0's COMPLETE
marker with a file manifest), keeps the last k and loads a verified tag back with weights_only=True; the RNG
state that travels in the client state; one clear error when a write fails (usually a full disk).

The other checkpoint parts live beside it, one job each: `safe_load` (weights_only=True unpickling), `tags`
(tag names, manifests, integrity, `--resume` lookup) and `export` (the consolidated fp32 model file and its one
loader); the names of theirs that the trainer and the entry points use are re-exported here (`__all__`).
"""
from __future__ import annotations

import errno
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .distributed import CollectiveTimeoutError, barrier, peers_named
from .export import consolidated_state_dict, export_model, load_exported
from .safe_load import CheckpointError, error_gist, safe_torch_load, weights_only_loading
from .tags import COMPLETE, complete_tags, resolve_resume, tag_for, verify_tag, write_manifest

__all__ = ["COMPLETE", "LATEST", "CheckpointError", "CheckpointWriteError", "Checkpointer", "CollectiveTimeoutError",
           "capture_rng", "consolidated_state_dict", "export_model", "free_bytes", "load_exported", "resolve_resume", "restore_rng",
           "safe_torch_load", "tag_bytes", "tag_for"]

log = logging.getLogger(__name__)

LATEST = "latest"  # DeepSpeed's pointer to the newest tag; written here, only once that tag is complete
_MIN_FREE = 64 * 2**20  # below this much free space a failed write is reported as a full disk


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (usually a full disk); the message names the folder and its free space."""


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) generator states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generator states saved by `capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves DeepSpeed checkpoints under run_dir/checkpoints/stepNNNNNNNN and keeps the last k."""

    def __init__(self, run_dir: Path, keep_last: int, is_main: bool) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.is_main = is_main
        self.last_saved_step = -1

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank writes its shard; rank 0 marks the tag complete (with a manifest of its
        files), then points `latest` at it and prunes old ones. A failed write raises CheckpointWriteError and
        leaves no marker; a peer rank that does not answer raises CollectiveTimeoutError (not a disk error)."""
        tag_dir = self.dir / tag_for(step)
        if self.is_main:  # a re-save of this step must not look finished while half-overwritten; DeepSpeed's
            (tag_dir / COMPLETE).unlink(missing_ok=True)  # opening barrier holds the other ranks until here
        try:  # DeepSpeed's own `latest` would name the tag before the other ranks and the marker are done
            with peers_named(f"checkpoint {tag_dir}: DeepSpeed's save_checkpoint (its barriers and gathers "
                              "between ranks)"):
                engine.save_checkpoint(str(self.dir), tag=tag_dir.name, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, CollectiveTimeoutError):
                raise
            raise self._write_failure(tag_dir, exc) from exc
        with peers_named(f"checkpoint {tag_dir}: the barrier after every rank wrote its files"):
            barrier()
        if self.is_main:
            try:
                write_manifest(tag_dir, step)
                _write_latest(self.dir, tag_dir.name)
            except OSError as exc:
                raise self._write_failure(tag_dir, exc) from exc
            self._prune()
        with peers_named(f"checkpoint {tag_dir}: the barrier after rank 0 marked it complete"):
            barrier()
        self.last_saved_step = step
        log.info("saved checkpoint %s", tag_dir)
        return tag_dir

    def _write_failure(self, tag_dir: Path, exc: BaseException) -> CheckpointWriteError:
        """The one-line error for a failed write (folder, free space, cause); rank 0 drops the partial tag."""
        free = free_bytes(self.dir)
        previous = next((t for t in reversed(complete_tags(self.dir)) if t != tag_dir), None)
        need = tag_bytes(previous) if previous is not None else 0
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            free is not None and free < max(need, _MIN_FREE))
        if self.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)  # never marked complete; frees the space it took
            if previous is not None:  # `latest` names an intact tag, or none
                _write_latest(self.dir, previous.name, missing_ok=True)
            else:
                (self.dir / LATEST).unlink(missing_ok=True)
        cause = "no space left on the disk" if full else "the write failed"
        size = f"; the previous checkpoint took {_human(need)}" if need else ""
        return CheckpointWriteError(
            f"could not write checkpoint {tag_dir}: {cause} ({error_gist(exc)}); {_human(free)} free in {self.dir}"
            f"{size}; free space there or set train.output_dir to a larger disk, then continue with --resume auto")

    def _prune(self) -> None:
        """Delete all but the newest keep_last finished tags."""
        for old in complete_tags(self.dir)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s", old)

    @staticmethod
    def load(engine: Any, tag_dir: Path) -> dict[str, Any]:
        """Load model, optimizer and client state from a finished tag after `verify_tag`, every file
        unpickled with weights_only=True (DeepSpeed's own loads too), so a foreign checkpoint runs no code."""
        verify_tag(tag_dir)
        if getattr(engine, "load_universal_checkpoint", lambda: False)():
            raise CheckpointError(f"{tag_dir}: DeepSpeed universal checkpoints are not supported (DeepSpeed reads "
                                  "them with weights_only=False); remove load_universal_checkpoint from the config")
        with weights_only_loading(engine):
            try:
                load_path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            except CheckpointError:
                raise
            except (RuntimeError, OSError, EOFError, KeyError, AssertionError, ValueError) as exc:
                gist = error_gist(exc).replace(" for DictOutput", "")  # the engine's wrapper means nothing here
                raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it into this engine ({gist}); "
                                      "were the model.* keys changed since it was written?") from exc
        if load_path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it (no model states file for this rank)")
        return client_state


def _write_latest(ckpt_dir: Path, tag: str, missing_ok: bool = False) -> None:
    """Point DeepSpeed's `latest` file at a complete tag (atomic: never half-written, never ahead of COMPLETE)."""
    if missing_ok and not ckpt_dir.is_dir():
        return
    tmp = ckpt_dir / f"{LATEST}.tmp"
    try:
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / LATEST)
    except OSError:
        if not missing_ok:
            raise


def free_bytes(folder: Path) -> Optional[int]:
    """Free bytes on the disk holding `folder` (or its nearest existing parent); None if unknown."""
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def tag_bytes(tag_dir: Path) -> int:
    """Total size of the files in a tag (what the next checkpoint will need, roughly)."""
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def _human(n: Optional[int]) -> str:
    """Bytes for a message: '3.2 GiB', '512.0 MiB', 'unknown'."""
    if n is None:
        return "unknown space"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
