"""Feature files: `<name>.safetensors` holding one float32 [N, D] tensor `features` (L2-normalised rows), and
`<name>.json` beside it saying what each row is and which model made it.

The JSON sidecar:
    {"format": "mip-dist-features/1", "dim": D, "count": N,
     "model": {"path": ..., "sha256": <the model file's sha256>, "layout": "paper"|"release"},
     "flip": bool, "precision": "fp32"|"bf16",
     "inputs_sha256": <hash of the inputs' paths, sizes and mtimes: a re-run with the same inputs and model reuses
                       the file>,
     "items": [{"path": ..., "modality": "visible"|"infrared", "camera": int|None, "pid": int|None}, ...],
     "skipped": [{"path": ..., "error": ...}, ...]}
Row i of `features` is `items[i]`. Search refuses to compare files whose model sha256 or dimension differ.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = "mip-dist-features/1"
FEATURES_KEY = "features"
MODALITIES = ("visible", "infrared")  # the names feature files use (the model and shards label them 1 and 0)


class FeatureFileError(ValueError):
    """A feature file that is missing, damaged, or does not fit what it is used with; names the file."""


@dataclass
class FeatureFile:
    """One feature file in memory: features [N, D] float32 and the JSON sidecar's fields."""

    features: torch.Tensor
    items: list[dict[str, Any]]
    model: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.features.shape[1])

    @property
    def model_sha256(self) -> str:
        """sha256 of the model file that produced these features."""
        return str(self.model.get("sha256", ""))


def sidecar_json(path: str | Path) -> Path:
    """`gallery.safetensors` -> `gallery.json`."""
    return Path(path).with_suffix(".json")


def save_features(path: str | Path, features: torch.Tensor, items: list[dict[str, Any]], model: dict[str, Any],
                  **meta: Any) -> Path:
    """Write the tensor file and its JSON sidecar (each atomic; the JSON last, so a file with a sidecar is whole)."""
    from safetensors.torch import save_file

    path = Path(path)
    if features.ndim != 2 or features.shape[0] != len(items):
        raise ValueError(f"features {tuple(features.shape)} do not match {len(items)} items")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({FEATURES_KEY: features.detach().to(torch.float32).contiguous().cpu()}, str(tmp),
              metadata={"format": FORMAT, "model_sha256": str(model.get("sha256", ""))})
    tmp.replace(path)
    doc = {"format": FORMAT, "dim": int(features.shape[1]), "count": int(features.shape[0]), "model": model,
           **meta, "items": items}
    side = sidecar_json(path)
    tmp_side = side.with_name(side.name + ".tmp")
    tmp_side.write_text(json.dumps(doc, indent=1) + "\n")
    tmp_side.replace(side)
    return path


def load_features(path: str | Path) -> FeatureFile:
    """Read a feature file and its sidecar, checking that they belong together; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    side = sidecar_json(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file not found: {path}")
    if not side.is_file():
        raise FeatureFileError(f"{path}: its sidecar {side.name} is missing (write feature files with "
                               "launch/extract.py)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FeatureFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        doc = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise FeatureFileError(f"{side}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FeatureFileError(f"{side}: not a mip-dist feature sidecar (format {doc.get('format')!r}, "
                               f"expected {FORMAT!r})" if isinstance(doc, dict) else f"{side}: not a JSON object")
    feats = tensors.get(FEATURES_KEY)
    if feats is None or feats.ndim != 2:
        raise FeatureFileError(f"{path}: holds no [N, D] tensor named {FEATURES_KEY!r}")
    items = doc.get("items")
    if not isinstance(items, list) or len(items) != feats.shape[0]:
        raise FeatureFileError(f"{path}: {feats.shape[0]} feature rows but {side.name} lists "
                               f"{len(items) if isinstance(items, list) else 'no'} items (the two files do not "
                               "belong together)")
    meta = {k: v for k, v in doc.items() if k not in ("items", "model")}
    return FeatureFile(feats.to(torch.float32), items, dict(doc.get("model") or {}), meta, path)
