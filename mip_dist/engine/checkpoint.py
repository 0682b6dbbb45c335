"""DeepSpeed checkpoints with a completion marker, keep-last-k pruning, resume lookup, RNG state and
the consolidated fp32 model export used for evaluation and inference.

Every checkpoint file is unpickled with `torch.load(weights_only=True)` (DeepSpeed's own loads included,
through `WeightsOnlyLoading`), allowing only the few non-tensor types the files hold, so a checkpoint from
elsewhere cannot run code. The completion marker lists the tag's files and sizes; a damaged newest tag is
skipped by `--resume auto` in favour of the newest good one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mip_dist.config import Config, to_dict

from .distributed import barrier

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written by rank 0 after every rank has finished writing the tag
_TAG = re.compile(r"^step(\d+)$")
_LEGACY_MARKER = re.compile(r"\s*\d+\s*")  # COMPLETE as written before it held a manifest: just the step
_MIN_FREE = 64 * 2**20  # below this much free space a failed write is reported as a full disk


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unsafe, damaged, incomplete); the message names the file or tag."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle calls something weights_only=True does not allow: loading it could run code."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file or tag that is missing, truncated, overwritten or not a torch.save file at all."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (usually a full disk); the message names the folder and its free space."""


def _gist(exc: BaseException) -> str:
    """The informative first sentence of a (often multi-paragraph) torch error, on one line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.split(r"(?<=\.)\s", line, maxsplit=1)[0]
    return f"{type(exc).__name__}: {line[:200]}" if line else type(exc).__name__


def _refused_name(exc: BaseException) -> Optional[str]:
    """The global or type weights_only=True refused, if that is why unpickling failed."""
    m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
    if m:
        return m.group(1)
    m = re.search(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>", str(exc))
    return m.group(1) if m else None


def numpy_globals() -> list[Any]:
    """The NumPy pieces of `np.random.get_state()` (in the client state's RNG) that weights_only=True must allow."""
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def deepspeed_globals() -> list[Any]:
    """DeepSpeed's own non-tensor objects in its state files: ZeRO stage enum, loss scalers, fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def training_globals() -> list[Any]:
    """Everything beyond tensors and plain containers that a tag written by `Checkpointer.save` holds."""
    return numpy_globals() + deepspeed_globals()


def safe_torch_load(path: str | Path, map_location: Any = "cpu", allow: Iterable[Any] = (),
                    mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` allowing only `allow` beyond tensors and plain containers, so a file
    from elsewhere cannot run code; failures become one-line CheckpointErrors naming the file."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError as exc:
        raise DamagedCheckpointError(f"{path}: file not found") from exc
    except pickle.UnpicklingError as exc:
        name = _refused_name(exc)
        if name is not None:
            raise UnsafeCheckpointError(
                f"{path}: refused to load with weights_only=True: unpickling it would call {name}, which is not "
                "allowed (only tensors and plain containers load; a file from elsewhere could run code this way)"
            ) from exc
        raise DamagedCheckpointError(f"{path}: not a readable torch.save file ({_gist(exc)})") from exc
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError) as exc:
        raise DamagedCheckpointError(f"{path}: not a readable torch.save file ({_gist(exc)})") from exc


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


def read_manifest(tag_dir: Path) -> Optional[dict[str, int]]:
    """{file: size} recorded in the tag's COMPLETE marker; None for a marker written before manifests existed."""
    marker = tag_dir / COMPLETE
    try:
        text = marker.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedCheckpointError(f"{marker}: unreadable completion marker ({_gist(exc)})") from exc
    if _LEGACY_MARKER.fullmatch(text):
        return None
    try:
        files = json.loads(text)["files"]
        return {str(k): int(v) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedCheckpointError(f"{marker}: damaged completion marker (not the JSON manifest the "
                                     "checkpointer writes)") from exc


def _write_manifest(tag_dir: Path, step: int) -> None:
    """Mark the tag complete with {step, files: {name: size}} (atomic), so a later resume can check it."""
    files = {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and not p.name.startswith(COMPLETE)}
    tmp = tag_dir / f"{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    tmp.replace(tag_dir / COMPLETE)


def _model_states_file(tag_dir: Path) -> Path:
    """The tag's rank-0 model-states file (ZeRO-3 writes one per rank, others a single one)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise DamagedCheckpointError(f"{tag_dir}: no model states file (mp_rank_00_model_states.pt or "
                                 "zero_pp_rank_0_mp_rank_00_model_states.pt)")


def expected_files(meta: dict[str, Any]) -> list[str]:
    """Files a DeepSpeed tag must hold, from the world sizes, ZeRO stage and precision in its model states."""
    ds = meta.get("ds_config") or {}
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    bf16 = bool((ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled", False))
    dp, mp = int(meta.get("dp_world_size", 1)), int(meta.get("mp_world_size", 1))
    names = []
    for m in range(mp):
        if stage == 3:
            names += [f"zero_pp_rank_{r}_mp_rank_{m:02d}_model_states.pt" for r in range(dp)]
        else:
            names.append(f"mp_rank_{m:02d}_model_states.pt")
        if stage >= 1:
            names += [f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt" for r in range(dp)]
    return names


def _quick_load(path: Path) -> Any:
    """Unpickle a tag file with weights_only=True, memory-mapping zip files so tensor data is not read."""
    return safe_torch_load(path, "cpu", training_globals(), mmap=zipfile.is_zipfile(path))


def verify_tag(tag_dir: Path) -> None:
    """Raise a CheckpointError unless the tag is complete and intact: every file it should hold (manifest and
    DeepSpeed's naming) is there at its recorded size and unpickles with weights_only=True. Cheap: tensor
    data is memory-mapped, not read."""
    if not (tag_dir / COMPLETE).is_file():
        raise DamagedCheckpointError(f"{tag_dir}: checkpoint is incomplete (no {COMPLETE} marker)")
    manifest = read_manifest(tag_dir) or {}
    for name, size in manifest.items():
        f = tag_dir / name
        if not f.is_file():
            raise DamagedCheckpointError(f"{f}: missing (the checkpoint was written with it)")
        if f.stat().st_size != size:
            raise DamagedCheckpointError(f"{f}: {f.stat().st_size} bytes but {size} when written (truncated or "
                                         "overwritten)")
    states = _model_states_file(tag_dir)
    meta = _quick_load(states)
    if not isinstance(meta, dict) or "module" not in meta:
        raise DamagedCheckpointError(f"{states}: not a DeepSpeed model states file (no 'module' entry)")
    for name in expected_files(meta):
        if not (tag_dir / name).is_file():
            raise DamagedCheckpointError(f"{tag_dir / name}: missing (DeepSpeed wrote one per rank)")
    for f in sorted(({tag_dir / n for n in manifest if n.endswith(".pt")} | set(tag_dir.glob("*.pt"))) - {states}):
        _quick_load(f)


def newest_good_tag(ckpt_dir: Path) -> Optional[Path]:
    """Newest finished tag that passes `verify_tag`, warning about each damaged newer one; None if there is
    no finished tag, an error if none of them is usable (never a silent fresh start)."""
    tags = complete_tags(ckpt_dir)
    problems = []
    for tag in reversed(tags):
        try:
            if read_manifest(tag) is None:  # written before manifests: trusted here, verified when loaded
                return tag
            verify_tag(tag)
        except CheckpointError as exc:
            log.warning("checkpoint %s cannot be used, not resuming from it: %s", tag, exc)
            problems.append(tag.name)
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint (skipped %s)", tag, ", ".join(problems))
        return tag
    if tags:
        raise DamagedCheckpointError(f"{ckpt_dir}: none of the finished checkpoints can be used ("
                                     f"{', '.join(problems)}: see the warnings above)")
    return None


def resolve_resume(arg: str, run_dir: Optional[Path], output_dir: Path) -> Optional[Path]:
    """`--resume auto|PATH` -> a finished, intact tag directory (auto: None when there is nothing to resume).

    auto: newest intact tag of the named run; without a run name, of the most recently written run under
    output_dir. PATH: a tag directory (used only if intact), a run directory or its checkpoints/ folder.
    A damaged newest tag is logged and skipped in favour of the newest intact one.
    """
    if arg == "auto":
        if run_dir is not None:
            return newest_good_tag(run_dir / "checkpoints")
        candidates = [t for t in (latest_tag(d / "checkpoints") for d in output_dir.glob("*") if d.is_dir()) if t]
        if not candidates:
            return None
        return newest_good_tag(max(candidates, key=lambda t: (t / COMPLETE).stat().st_mtime).parent)
    path = Path(arg)
    if not path.exists():
        raise FileNotFoundError(f"--resume {arg}: no such file or directory")
    if _TAG.match(path.name):
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"--resume {arg}: checkpoint is incomplete (no {COMPLETE} marker)")
        try:
            legacy = read_manifest(path) is None  # written before manifests: verified when loaded
        except CheckpointError:
            legacy = False
        if not legacy:
            _verify_named(path, arg)
        return path
    for ckpt_dir in (path / "checkpoints", path):
        if latest_tag(ckpt_dir) is not None:
            return newest_good_tag(ckpt_dir)
    raise FileNotFoundError(f"--resume {arg}: no finished checkpoint (stepNNNNNNNN/{COMPLETE}) found there")


def _verify_named(tag: Path, arg: str) -> None:
    """`verify_tag` for a tag named on the command line: no fallback, but point at the newest intact sibling."""
    try:
        verify_tag(tag)
    except CheckpointError as exc:
        older = [t for t in complete_tags(tag.parent) if t != tag]
        good = None
        for t in reversed(older):
            with contextlib.suppress(CheckpointError):
                verify_tag(t)
                good = t
                break
        hint = f"; the newest intact one beside it is {good}" if good else ""
        raise type(exc)(f"--resume {arg}: cannot use this checkpoint: {exc}{hint}") from exc


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
        files) and prunes old ones. A failed write raises CheckpointWriteError and leaves no marker."""
        tag_dir = self.dir / tag_for(step)
        if self.is_main:  # a re-save of this step must not look finished while half-overwritten; DeepSpeed's
            (tag_dir / COMPLETE).unlink(missing_ok=True)  # opening barrier holds the other ranks until here
        try:
            engine.save_checkpoint(str(self.dir), tag=tag_dir.name, client_state=client_state)
        except (OSError, RuntimeError) as exc:
            raise self._write_failure(tag_dir, exc) from exc
        barrier()
        if self.is_main:
            try:
                _write_manifest(tag_dir, step)
            except OSError as exc:
                raise self._write_failure(tag_dir, exc) from exc
            self._prune()
        barrier()
        self.last_saved_step = step
        log.info("saved checkpoint %s", tag_dir)
        return tag_dir

    def _write_failure(self, tag_dir: Path, exc: BaseException) -> CheckpointWriteError:
        """The one-line error for a failed write (folder, free space, cause); rank 0 drops the partial tag."""
        free = free_bytes(self.dir)
        previous = latest_tag(self.dir)
        need = tag_bytes(previous) if previous is not None and previous != tag_dir else 0
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            free is not None and free < max(need, _MIN_FREE))
        if self.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)  # never marked complete; frees the space it took
        cause = "no space left on the disk" if full else "the write failed"
        size = f"; the previous checkpoint took {_human(need)}" if need else ""
        return CheckpointWriteError(
            f"could not write checkpoint {tag_dir}: {cause} ({_gist(exc)}); {_human(free)} free in {self.dir}"
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
                raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it into this engine "
                                      f"({_gist(exc)})") from exc
        if load_path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it (no model states file for this rank)")
        return client_state


class WeightsOnlyLoading:
    """Stands in for a DeepSpeed engine's `checkpoint_engine` while loading: everything is the wrapped
    engine's except `load`, which uses weights_only=True with `training_globals()` (DeepSpeed 0.19 passes
    weights_only=False, which runs whatever code a pickle names)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        """DeepSpeed's load hook, made safe."""
        return safe_torch_load(path, map_location, training_globals())

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


@contextlib.contextmanager
def weights_only_loading(engine: Any) -> Iterator[None]:
    """Route the engine's checkpoint reads through `WeightsOnlyLoading` for the duration of a load."""
    if not hasattr(engine, "checkpoint_engine"):
        raise RuntimeError("this DeepSpeed engine has no checkpoint_engine to load through; cannot guarantee "
                           "weights_only=True loading")
    original = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoading(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


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

        verify_tag(tag_dir)  # zero_to_fp32 unpickles with weights_only=False: only after every file passed True
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
    """Read a file written by `export_model` with weights_only=True (it holds only tensors and plain values),
    checking its keys; CheckpointError (a ValueError) names the file otherwise."""
    blob = safe_torch_load(path, map_location)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: not an exported mip-dist model (a {type(blob).__name__}, not a dict)")
    missing = {"model", "config", "num_classes", "num_cameras"} - set(blob)
    if missing:
        raise CheckpointError(f"{path}: not an exported mip-dist model (missing {', '.join(sorted(missing))})")
    return blob
