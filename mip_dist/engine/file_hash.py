"""sha256 of model and checkpoint files, and the `<file>.sha256` sidecar beside an exported model.

The sidecar is one line in `sha256sum`'s format (`<hex>  <name>`), so `sha256sum -c model_final.pt.sha256`
checks it without mip-dist. Readers (evaluate, convert_release, fine-tuning from an exported model, the
feature extractor) call `check_sidecar`: a file whose bytes no longer hash to its sidecar is refused with a
one-line CheckpointError naming it; a file without a sidecar (written before sidecars existed, or copied
alone) is hashed and used.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

from .safe_load import DamagedCheckpointError

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
_CHUNK = 8 * 2**20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """Where a file's sidecar lives: `model_final.pt` -> `model_final.pt.sha256`."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, digest: Optional[str] = None) -> str:
    """Write `<path>.sha256` (atomic) for the file as it is now; returns the digest."""
    p = Path(path)
    digest = digest or sha256_file(p)
    side = sidecar_path(p)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(f"{digest}  {p.name}\n")
    tmp.replace(side)
    return digest


def read_sidecar(path: str | Path) -> Optional[str]:
    """The digest recorded beside `path`, or None where there is no sidecar; a malformed one is an error."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    fields = side.read_text(errors="replace").split()
    if not fields or len(fields[0]) != 64 or any(c not in "0123456789abcdef" for c in fields[0].lower()):
        raise DamagedCheckpointError(f"{side}: not a sha256 sidecar (expected '<64 hex digits>  {Path(path).name}')")
    return fields[0].lower()


def check_sidecar(path: str | Path) -> str:
    """The file's sha256, after checking it against its sidecar where one exists (a mismatch raises a
    DamagedCheckpointError naming the file: its bytes changed after it was written)."""
    digest = sha256_file(path)
    recorded = read_sidecar(path)
    if recorded is not None and recorded != digest:
        raise DamagedCheckpointError(
            f"{path}: its bytes hash to sha256 {digest[:16]}..., but {sidecar_path(path).name} recorded "
            f"{recorded[:16]}... when it was written (the file changed or is damaged; re-export or re-copy it)")
    if recorded is None:
        log.debug("%s has no %s sidecar; hashed it (%s...)", path, SIDECAR_SUFFIX, digest[:16])
    return digest


def verify_recorded(path: str | Path) -> None:
    """`check_sidecar` only where a sidecar exists (a file without one is not read twice): for weights that
    are usually downloaded alone (the authors' checkpoints, ImageNet weights) but may travel with a sidecar."""
    if sidecar_path(path).is_file():
        check_sidecar(path)
