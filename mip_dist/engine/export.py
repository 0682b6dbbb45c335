"""The exported model file ({"model", "config", "num_classes", "num_cameras"}): the full fp32 weights gathered
from a DeepSpeed engine, written atomically, and the one loader that reads it back (weights_only=True) for
evaluation, release conversion and fine-tuning."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from mip_dist.config import Config, to_dict

from .file_hash import check_sidecar, sha256_file, sidecar_path, write_sidecar
from .safe_load import CheckpointError, numpy_globals, safe_torch_load
from .tags import verify_tag

log = logging.getLogger(__name__)

EXPORTED_KEYS = ("model", "config", "num_classes", "num_cameras")
EXPECTED = "expected an exported model such as model_final.pt / model_best.pt from the run folder"
# files DeepSpeed writes into a checkpoint tag (runs/<name>/checkpoints/stepNNNNNNNN/)
_DEEPSPEED_FILE = re.compile(r"^(bf16_)?(zero_pp_rank_\d+_)?mp_rank_\d+_(model|optim)_states\.pt$")


def consolidated_state_dict(engine: Any, tag_dir: Optional[Path], zero_stage: int, fp32_engine: bool,
                            strip_prefix: str = "") -> Optional[dict]:
    """The full fp32 model state on rank 0 (None elsewhere), keys without `strip_prefix`. Every rank calls it.

    ZeRO-3 (and ZeRO-1/2 with 16-bit weights) read the fp32 master weights back from a saved tag with
    DeepSpeed's zero_to_fp32; otherwise the engine's own (already full) module state is used, with the
    16-bit optimizer's fp32 master copies in place of 16-bit parameters (BF16_Optimizer's are gathered
    from their partitions, which zero_to_fp32 cannot read).
    """
    bf16_masters = _bf16_optimizer_masters(engine)  # a collective: before rank 0 leaves the others
    if engine.global_rank != 0:
        return None
    if zero_stage == 3 or (zero_stage > 0 and not fp32_engine and bf16_masters is None):
        if tag_dir is None:
            raise ValueError("a ZeRO checkpoint is needed to consolidate fp32 weights")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_tag(tag_dir)  # zero_to_fp32 unpickles with weights_only=False: only after every file passed True
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        sd = dict(engine.module.state_dict())
        masters = bf16_masters if bf16_masters is not None else _fp32_masters(engine.optimizer)
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


def _bf16_optimizer_masters(engine: Any) -> Optional[dict[int, torch.Tensor]]:
    """id(bf16 param) -> its full fp32 master, assembled from DeepSpeed's BF16_Optimizer partitions (an
    all-reduce per parameter over the data-parallel group); None when the engine runs another optimizer."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.utils import safe_get_full_fp32_param

    if not isinstance(engine.optimizer, BF16_Optimizer):
        return None
    masters = {id(p): safe_get_full_fp32_param(p) for p in engine.module.parameters() if p.requires_grad}
    return {k: v for k, v in masters.items() if v is not None}


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


def export_model(path: Path, state_dict: dict, cfg: Config, num_classes: int, num_cameras: int,
                 datasets: Optional[list[dict]] = None) -> Path:
    """Write the evaluation/inference file: {"model", "config", "num_classes", "num_cameras"} (atomic), plus
    "datasets" for a model trained on several: each one's name, path, protocol and label/camera offsets; and
    its `<file>.sha256` sidecar, which every loader checks."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    blob = {"model": state_dict, "config": to_dict(cfg), "num_classes": num_classes, "num_cameras": num_cameras}
    if datasets:
        blob["datasets"] = datasets
    torch.save(blob, tmp)
    digest = sha256_file(tmp)
    sidecar_path(path).unlink(missing_ok=True)  # a crash between the two renames leaves no stale sidecar
    tmp.replace(path)
    write_sidecar(path, digest)
    log.info("exported fp32 model to %s (sha256 %s..., in %s)", path, digest[:12], sidecar_path(path).name)
    return path


class DatasetChoiceError(ValueError):
    """--dataset missing, unknown, or given for a model trained on one dataset; names the choices."""


def trained_dataset_entry(blob: dict[str, Any], name: Optional[str], what: str) -> Optional[dict[str, Any]]:
    """The `datasets` entry (name, path, protocol, label/camera offsets) named `name` of a model trained on several
    datasets; None for a model trained on one. `what` names the model file in errors."""
    datasets = blob.get("datasets") or []
    if len(datasets) <= 1:
        if name is not None:
            raise DatasetChoiceError(f"--dataset {name}: {what} was trained on one dataset; drop --dataset")
        return None
    names = [d["name"] for d in datasets]
    if name not in names:
        raise DatasetChoiceError(f"{what} was trained on {len(names)} datasets ({', '.join(names)}): pass --dataset "
                                 "NAME to pick the one whose cameras and test set apply"
                                 + (f"; {name!r} is not one of them" if name else ""))
    return datasets[names.index(name)]


def _exported_beside(file: Path) -> str:
    """What to pass instead of a DeepSpeed tag file: the run's exported models that exist, else their names."""
    run = file.parent.parent.parent if file.parent.parent.name == "checkpoints" else file.parent
    found = [str(run / n) for n in ("model_final.pt", "model_best.pt") if (run / n).is_file()]
    return " or ".join(found) if found else "the run's model_final.pt / model_best.pt (written by the trainer)"


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by `export_model` with weights_only=True (tensors and plain values only: a file
    from elsewhere cannot run code), checking its keys. Anything else (a folder, a DeepSpeed tag file, a
    foreign pickle, garbage) is a one-line CheckpointError naming the file and what to pass instead; so is a
    file whose bytes differ from its `.sha256` sidecar."""
    file = Path(path)
    if file.is_dir():
        raise CheckpointError(f"{file} is a folder; {EXPECTED}")
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    if _DEEPSPEED_FILE.match(file.name):
        raise CheckpointError(f"{file} is a DeepSpeed training checkpoint file, not an exported model; "
                              f"pass {_exported_beside(file)}")
    check_sidecar(file)  # a changed byte is named here, before any weights are used
    try:  # NumPy arrays allowed only so that a renamed DeepSpeed file (its RNG state) is recognised below
        blob = safe_torch_load(file, map_location, allow=numpy_globals())
    except CheckpointError as exc:  # unpickling refused or not a torch.save file: keep the subclass
        raise type(exc)(f"{exc}; {EXPECTED}") from exc
    if not isinstance(blob, dict):
        raise CheckpointError(f"{file}: holds a {type(blob).__name__}, not an exported model dict; {EXPECTED}")
    if "module" in blob and "ds_version" in blob:
        raise CheckpointError(f"{file} is a DeepSpeed training checkpoint file, not an exported model; "
                              f"pass {_exported_beside(file)}")
    missing = set(EXPORTED_KEYS) - set(blob)
    if missing:
        raise CheckpointError(f"{file}: not an exported mip-dist model (missing {', '.join(sorted(missing))}); "
                              "export one with the trainer (model_best.pt / model_final.pt)")
    return blob
