"""A trained model file read for inference: our exported model or the MIP authors' checkpoint, checked and built.

One reader for the feature extractor, the ONNX exporter and search's query images, so that all three accept the
same files and name the same errors:
- the file's `<file>.sha256` sidecar, where present, is checked before it is unpickled (a damaged file is named),
  by the loader itself, so the file is hashed once;
- the authors' checkpoint is read through the release layout (`mip_dist.model.release`). Its tensors fix most model
  keys; `release_config` (a config file, e.g. configs/mip_vitb16_sysu_release.yaml) supplies those they cannot
  tell (image size, stride, heads, SIE coefficient, ...: `NOT_INFERRED`) and the other sections (eval.flip).
  Without it, the config defaults fill them (ViT-B/16 at 256x128, as the authors trained), as in
  `launch/evaluate.py`;
- the weights must fit the model of the saved config exactly (strict), else a CheckpointError naming the file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple, Optional

from torch import nn

from mip_dist.config import Config, ConfigError, from_dict, load_config
from mip_dist.engine.file_hash import read_sidecar, sha256_file
from mip_dist.engine.safe_load import CheckpointError


class ModelFile(NamedTuple):
    """A model file read and built: the module (eval mode, CPU), its config, the file's sha256, the loaded blob."""

    model: nn.Module
    config: Config
    sha256: str
    blob: dict[str, Any]


def read_model_blob(path: str | Path, release_config: Optional[str | Path] = None) -> tuple[dict[str, Any], str]:
    """(exported blob {"model", "config", "num_classes", "num_cameras", ...}, sha256) of a model file."""
    from mip_dist.engine.export import load_exported
    from mip_dist.model.release import ReleaseCheckpointError, is_release_checkpoint, release_blob

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a model file (model_best.pt / model_final.pt, or the "
                              "authors' checkpoint)")
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    release = is_release_checkpoint(path)  # memory-mapped: no full read
    if release_config is not None and not release:
        raise CheckpointError(f"{path} is an exported model and carries its own config; a config file "
                              f"({release_config}) applies only to the MIP authors' checkpoint")
    try:
        blob = (release_blob(path, base=load_config(release_config) if release_config else None) if release
                else load_exported(path))
    except ReleaseCheckpointError as exc:
        hint = ("" if release_config else "; a config file (--config) gives the model keys its tensors cannot tell: "
                "model.img_size, model.stride, model.num_heads, ...")
        raise CheckpointError(f"{path}: {exc}{hint}") from exc
    # both loaders checked the `.sha256` sidecar (DamagedCheckpointError) before unpickling: its value is the hash
    return blob, read_sidecar(path) or sha256_file(path)


def build_from_blob(blob: dict[str, Any], path: str | Path, attention_impl: Optional[str] = None
                    ) -> tuple[nn.Module, Config]:
    """(model in eval mode with the blob's weights, its Config); `attention_impl` replaces the saved one."""
    from mip_dist.model import build_model

    try:
        cfg = from_dict(blob["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its saved config is not valid here: {exc}") from exc
    attention = cfg.attention if attention_impl is None else dataclasses.replace(cfg.attention, impl=attention_impl)
    model = build_model(cfg.model, attention, int(blob["num_classes"]), int(blob["num_cameras"]))
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as exc:
        first = " ".join(line.strip() for line in str(exc).splitlines()[:4])
        raise CheckpointError(f"{path}: its weights do not fit the model of its saved config: {first}") from exc
    return model.eval(), cfg


def read_model_file(path: str | Path, release_config: Optional[str | Path] = None,
                    attention_impl: Optional[str] = None) -> ModelFile:
    """The model of a model file, built and loaded (see the module docstring)."""
    blob, sha256 = read_model_blob(path, release_config)
    model, cfg = build_from_blob(blob, path, attention_impl)
    return ModelFile(model, cfg, sha256, blob)
