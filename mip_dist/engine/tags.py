"""Checkpoint tags on disk: naming (stepNNNNNNNN), the COMPLETE marker with its file manifest, integrity
checks, and which tag `--resume auto|PATH` continues from (a damaged newest tag is skipped for the newest
intact one, never a silent fresh start)."""
from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional

from .file_hash import sha256_file
from .safe_load import CheckpointError, DamagedCheckpointError, error_gist, safe_torch_load, training_globals

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written by rank 0 after every rank has finished writing the tag
_TAG = re.compile(r"^step(\d+)$")
_LEGACY_MARKER = re.compile(r"\s*\d+\s*")  # COMPLETE as written before it held a manifest: just the step


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


class ManifestEntry(NamedTuple):
    """One file of a tag as the checkpointer wrote it: its size and (manifests since integrity hashes) sha256."""

    bytes: int
    sha256: Optional[str]


def read_manifest(tag_dir: Path) -> Optional[dict[str, ManifestEntry]]:
    """{file: (size, sha256)} recorded in the tag's COMPLETE marker (sha256 None in manifests written before
    hashes were); None for a marker written before manifests existed."""
    marker = tag_dir / COMPLETE
    try:
        text = marker.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedCheckpointError(f"{marker}: unreadable completion marker ({error_gist(exc)})") from exc
    if _LEGACY_MARKER.fullmatch(text):
        return None
    try:
        files = json.loads(text)["files"]
        return {str(k): ManifestEntry(int(v), None) if isinstance(v, int)
                else ManifestEntry(int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedCheckpointError(f"{marker}: damaged completion marker (not the JSON manifest the "
                                     "checkpointer writes)") from exc


def write_manifest(tag_dir: Path, step: int) -> None:
    """Mark the tag complete with {step, files: {name: {bytes, sha256}}} (atomic), so a later resume can check
    every file's size and bytes. Hashing reads the tag once (see the README for its seconds per GB)."""
    start = time.perf_counter()
    paths = [p for p in sorted(tag_dir.rglob("*")) if p.is_file() and not p.name.startswith(COMPLETE)]
    files = {p.relative_to(tag_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}
    tmp = tag_dir / f"{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    tmp.replace(tag_dir / COMPLETE)
    total = sum(f["bytes"] for f in files.values())
    log.debug("hashed %s: %.1f MB in %.2f s", tag_dir.name, total / 1e6, time.perf_counter() - start)


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


RESUME_KEYS = ("mip_config", "world_size", "epoch", "step", "datasets")  # client state a resume is checked against


def saved_client_state(tag_dir: Path) -> dict[str, Any]:
    """What a tag's client state says about its run (config, world size, position, datasets), read from the
    rank-0 model states with tensor data memory-mapped: cheap enough to check before any start-up."""
    meta = _quick_load(_model_states_file(tag_dir))
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{_model_states_file(tag_dir)}: not a DeepSpeed model states file")
    return {k: meta[k] for k in RESUME_KEYS if k in meta}


_VERIFIED: set[tuple] = set()  # (tag, (name, size, mtime) of every file) that passed verify_tag in this process


def _stamp(tag_dir: Path) -> tuple:
    """What a verification depends on: the tag's files with their sizes and modification times."""
    return (str(tag_dir.resolve()),
            tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in tag_dir.iterdir() if f.is_file())))


def verify_tag(tag_dir: Path) -> None:
    """Raise a CheckpointError unless the tag is complete and intact: every file it should hold (manifest and
    DeepSpeed's naming) is there at its recorded size and unpickles with weights_only=True. Cheap: tensor
    data is memory-mapped, not read; an unchanged tag that passed is not unpickled again in this process
    (a resume checks it before the process group, when picking the run directory and when loading)."""
    if not (tag_dir / COMPLETE).is_file():
        raise DamagedCheckpointError(f"{tag_dir}: checkpoint is incomplete (no {COMPLETE} marker)")
    stamp = _stamp(tag_dir)
    if stamp in _VERIFIED:
        return
    _verify_files(tag_dir)
    _VERIFIED.add(stamp)


def _verify_files(tag_dir: Path) -> None:
    """verify_tag's checks: manifest sizes and sha256, DeepSpeed's expected files, every file unpickles."""
    manifest = read_manifest(tag_dir) or {}
    for name, entry in manifest.items():
        f = tag_dir / name
        if not f.is_file():
            raise DamagedCheckpointError(f"{f}: missing (the checkpoint was written with it)")
        if f.stat().st_size != entry.bytes:
            raise DamagedCheckpointError(f"{f}: {f.stat().st_size} bytes but {entry.bytes} when written (truncated "
                                         "or overwritten)")
    states = _model_states_file(tag_dir)
    meta = _quick_load(states)
    if not isinstance(meta, dict) or "module" not in meta:
        raise DamagedCheckpointError(f"{states}: not a DeepSpeed model states file (no 'module' entry)")
    for name in expected_files(meta):
        if not (tag_dir / name).is_file():
            raise DamagedCheckpointError(f"{tag_dir / name}: missing (DeepSpeed wrote one per rank)")
    for f in sorted(({tag_dir / n for n in manifest if n.endswith(".pt")} | set(tag_dir.glob("*.pt"))) - {states}):
        _quick_load(f)
    for name, entry in manifest.items():  # last, reading every byte: finds a flipped bit that unpickles fine
        if entry.sha256 and (digest := sha256_file(tag_dir / name)) != entry.sha256:
            raise DamagedCheckpointError(f"{tag_dir / name}: bytes changed since it was written (sha256 "
                                         f"{digest[:12]}..., manifest {entry.sha256[:12]}...)")


_WARNED: set[str] = set()  # a resume looks for its tag more than once (preflight, run folder, load): warn once


def _warn_once(message: str) -> None:
    """Log a warning the first time this process sees it."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def newest_good_tag(ckpt_dir: Path) -> Optional[Path]:
    """Newest finished tag that passes `verify_tag`, warning about each damaged newer one; None if there is
    no finished tag, an error if none of them is usable (never a silent fresh start)."""
    tags = complete_tags(ckpt_dir)
    problems: list[tuple[str, CheckpointError]] = []
    for tag in reversed(tags):
        try:
            if read_manifest(tag) is None:  # written before manifests: trusted here, verified when loaded
                return tag
            verify_tag(tag)
        except CheckpointError as exc:
            problems.append((tag.name, exc))
            continue
        for name, exc in problems:  # one line per damaged tag, naming its bad file and where the run goes on
            _warn_once(f"checkpoint {name} cannot be used ({exc}); resuming from {tag}, the newest intact one")
        return tag
    for name, exc in problems:
        _warn_once(f"checkpoint {name} cannot be used: {exc}")
    if tags:
        raise DamagedCheckpointError(f"{ckpt_dir}: none of the finished checkpoints can be used ("
                                     f"{', '.join(n for n, _ in problems)}: see the warnings above)")
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
