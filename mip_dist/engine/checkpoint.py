"""DeepSpeed checkpoints with a completion marker, keep-last-k pruning, resume lookup, RNG state and
the consolidated fp32 model export used for evaluation and inference."""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mip_dist.config import Config, to_dict

from .distributed import barrier

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written by rank 0 after every rank has finished writing the tag
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    """Checkpoint tag of optimizer step `step` (sorts by name and by number)."""
    return f"step{step:08d}"


def step_of(tag_dir: Path) -> int:
    """Optimizer step encoded in a tag directory name."""
    m = _TAG.match(tag_dir.name)
    if not m:
        raise ValueError(f"{tag_dir} is not a checkpoint tag directory (expected stepNNNNNNNN)")
    return int(m.group(1))


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint tags under `ckpt_dir`, oldest first; half-written ones are ignored."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags, key=step_of)


def latest_tag(ckpt_dir: Path) -> Optional[Path]:
    """Newest finished tag, or None."""
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def resolve_resume(arg: str, run_dir: Optional[Path], output_dir: Path) -> Optional[Path]:
    """`--resume auto|PATH` -> a finished tag directory (auto: None when there is nothing to resume).

    auto: newest tag of the named run; without a run name, of the most recently written run under
    output_dir. PATH: a tag directory, a run directory or its checkpoints/ folder.
    """
    if arg == "auto":
        if run_dir is not None:
            return latest_tag(run_dir / "checkpoints")
        candidates = [t for t in (latest_tag(d / "checkpoints") for d in output_dir.glob("*") if d.is_dir()) if t]
        return max(candidates, key=lambda t: (t / COMPLETE).stat().st_mtime) if candidates else None
    path = Path(arg)
    if not path.exists():
        raise FileNotFoundError(f"--resume {arg}: no such file or directory")
    if _TAG.match(path.name):
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"--resume {arg}: checkpoint is incomplete (no {COMPLETE} marker)")
        return path
    for ckpt_dir in (path / "checkpoints", path):
        tag = latest_tag(ckpt_dir)
        if tag is not None:
            return tag
    raise FileNotFoundError(f"--resume {arg}: no finished checkpoint (stepNNNNNNNN/{COMPLETE}) found there")


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
        """Collective: every rank writes its shard; rank 0 marks the tag complete and prunes old ones."""
        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state)
        barrier()
        if self.is_main:
            (self.dir / tag / COMPLETE).write_text(f"{step}\n")
            self._prune()
        barrier()
        self.last_saved_step = step
        log.info("saved checkpoint %s", self.dir / tag)
        return self.dir / tag

    def _prune(self) -> None:
        """Delete all but the newest keep_last finished tags."""
        for old in complete_tags(self.dir)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s", old)

    @staticmethod
    def load(engine: Any, tag_dir: Path) -> dict[str, Any]:
        """Load model, optimizer and client state from a finished tag directory."""
        load_path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        return client_state


def consolidated_state_dict(engine: Any, tag_dir: Optional[Path], zero_stage: int, fp32_engine: bool,
                            strip_prefix: str = "") -> Optional[dict]:
    """The full fp32 model state on rank 0 (None elsewhere), keys without `strip_prefix`.

    ZeRO-3 (and ZeRO-1/2 with 16-bit weights) read the fp32 master weights back from a saved tag with
    DeepSpeed's zero_to_fp32; otherwise the engine's own (already full) module state is used, with the
    16-bit optimizer's fp32 master copies in place of 16-bit parameters.
    """
    if engine.global_rank != 0:
        return None
    if zero_stage == 3 or (zero_stage > 0 and not fp32_engine):
        if tag_dir is None:
            raise ValueError("a ZeRO checkpoint is needed to consolidate fp32 weights")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        sd = dict(engine.module.state_dict())
        masters = _fp32_masters(engine.optimizer)
        for name, p in engine.module.named_parameters():
            if id(p) in masters:
                sd[name] = masters[id(p)]
    out = {}
    for k, v in sd.items():
        if strip_prefix and k.startswith(strip_prefix):
            k = k[len(strip_prefix):]
        v = v.detach().cpu()
        out[k] = v.float().clone() if v.is_floating_point() else v.clone()
    return out


def _fp32_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(16-bit param) -> its fp32 master copy, from DeepSpeed's non-ZeRO 16-bit optimizer wrappers
    (FP16_UnfusedOptimizer keeps per-param masters, FP16_Optimizer flat ones); {} for anything else."""
    groups16 = getattr(optimizer, "fp16_groups", None)
    if not groups16:
        return {}
    per_param = getattr(optimizer, "fp32_groups", None)
    if per_param is not None and len(per_param) == len(groups16):
        return {id(p): m for g16, g32 in zip(groups16, per_param) for p, m in zip(g16, g32)}
    flats = getattr(optimizer, "fp32_groups_flat", None)
    if flats is not None and len(flats) == len(groups16):
        from torch._utils import _unflatten_dense_tensors

        return {id(p): m for g16, flat in zip(groups16, flats)
                for p, m in zip(g16, _unflatten_dense_tensors(flat, g16))}
    return {}


def export_model(path: Path, state_dict: dict, cfg: Config, num_classes: int, num_cameras: int) -> Path:
    """Write the evaluation/inference file: {"model", "config", "num_classes", "num_cameras"} (atomic)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": state_dict, "config": to_dict(cfg), "num_classes": num_classes,
                "num_cameras": num_cameras}, tmp)
    tmp.replace(path)
    log.info("exported fp32 model to %s", path)
    return path


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by `export_model`, checking its keys."""
    blob = torch.load(path, map_location=map_location, weights_only=False)
    missing = {"model", "config", "num_classes", "num_cameras"} - set(blob)
    if missing:
        raise ValueError(f"{path}: not an exported mip-dist model (missing {', '.join(sorted(missing))})")
    return blob
