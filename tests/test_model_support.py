"""Shared helpers for the model tests (no tests here): small configs, deterministic inputs, comparisons."""
from __future__ import annotations

from pathlib import Path

import torch

from mip_dist.config import load_config
from mip_dist.model import build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Sizes the ablation configs (ViT-B) down to a 64-wide, 4-block model at 64x32 (5x2 patches).
SMALL = ["model.embed_dim=64", "model.depth=4", "model.num_heads=4", "model.img_size=[64,32]",
         "data.img_size=[64,32]", "model.num_modality_prompts=3", "model.num_instance_prompts=2",
         "model.ipg_fusion_bank=5", "model.pretrained=", "data.batch_size=16", "data.num_instances=2"]
NO_NOISE = ["model.drop_path=0.0", "model.prompt_dropout=0.0", "model.drop_rate=0.0"]
NUM_CLASSES = 7
NUM_CAMERAS = 3


def small_cfg(name: str, extra: list[str] | None = None):
    """A shipped config sized down (tiny.yaml is already small and keeps its own sizes)."""
    overrides = [] if name == "tiny.yaml" else list(SMALL)
    return load_config(CONFIGS / name, overrides + (extra or []))


def make_model(cfg, impl: str = "torch", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.attention.__class__(impl=impl), NUM_CLASSES, NUM_CAMERAS)


def inputs(cfg, modality: list[int], seed: int = 1):
    """Images, modality and 0-based camera labels for a batch with the given modalities."""
    g = torch.Generator().manual_seed(seed)
    B = len(modality)
    images = torch.randn(B, 3, *cfg.model.img_size, generator=g)
    cams = torch.randint(0, NUM_CAMERAS, (B,), generator=g)
    return images, torch.tensor(modality), cams


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


def output_tensors(out) -> dict[str, torch.Tensor]:
    """Every tensor of a MIPOutput, named."""
    named = {"global": out.global_feat}
    if out.local_feats is not None:
        named["local"] = out.local_feats
    for group in ("bn_feats", "logits", "prompt_logits", "instance_prompts"):
        for i, t in enumerate(getattr(out, group)):
            named[f"{group}.{i}"] = t
    return named
