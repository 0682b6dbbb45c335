"""Load a timm ViT checkpoint (.pth/.pt/.bin, .safetensors, .npz or "timm:<name>") into MIP by name."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from mip_dist.engine.file_hash import verify_recorded
from mip_dist.engine.safe_load import CheckpointError, safe_torch_load

from .param_groups import param_category

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def unwrap_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    """A plain state dict from {"model": sd} / {"state_dict": sd} wrappers and DDP "module." prefixes."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (nor a {{'model'|'state_dict': ...}} wrapper)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _read_npz(path: str) -> dict[str, Tensor]:
    """Google/timm .npz -> timm VisionTransformer state dict, via timm's own `_load_weights`."""
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    w = np.load(path)
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in w), None)
    blk0 = f"{prefix}Transformer/encoderblock_0/"
    if prefix is None or f"{blk0}LayerNorm_0/scale" not in w or f"{prefix}cls" not in w:
        raise ValueError(f"{path}: unsupported .npz layout (expected the classic ViT layout with "
                         "'embedding/kernel', 'cls' and 'Transformer/encoderblock_<i>/...')")
    kernel = w[f"{prefix}embedding/kernel"]  # [p, p, in, C]
    patch, dim = kernel.shape[0], kernel.shape[-1]
    depth = 0
    while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
        depth += 1
    heads = w[f"{blk0}MultiHeadDotProductAttention_1/query/kernel"].shape[1]  # [C, H, D]
    hidden = w[f"{blk0}MlpBlock_3/Dense_0/kernel"].shape[1]
    grid = math.isqrt(w[f"{prefix}Transformer/posembed_input/pos_embedding"].shape[1] - 1)
    num_classes = w[f"{prefix}head/bias"].shape[-1] if f"{prefix}head/bias" in w else 0
    vit = VisionTransformer(img_size=grid * patch, patch_size=patch, in_chans=kernel.shape[2], embed_dim=dim,
                            depth=depth, num_heads=heads, mlp_ratio=hidden / dim, qkv_bias=True,
                            num_classes=num_classes)
    _load_weights(vit, path)
    return vit.state_dict()


def _load_torch_file(path: str) -> object:
    """torch.load with weights_only=True (a downloaded file cannot run code); one-line error naming the file."""
    try:
        verify_recorded(path)  # an exported mip-dist model (fine-tuning) carries a `.sha256` sidecar
        return safe_torch_load(path, map_location="cpu")
    except CheckpointError as exc:
        raise ValueError(f"model.pretrained: {exc}") from exc


def read_checkpoint(path: str) -> dict[str, Tensor]:
    """Raw timm-named state dict from a local file or "timm:<name>" (downloads through timm)."""
    if path.startswith("timm:"):
        import timm

        return timm.create_model(path[len("timm:"):], pretrained=True, num_classes=0).state_dict()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained: checkpoint file not found: {path}")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(path, device="cpu"), path)
    if suffix in (".pth", ".pt", ".bin"):
        return unwrap_state_dict(_load_torch_file(path), path)
    raise ValueError(f"model.pretrained: {path} has unknown extension {suffix!r}; "
                     "use .pth/.pt/.bin, .safetensors, .npz or timm:<name>")


def _source_key(name: str, depth: int, jpm: bool) -> str:
    """The checkpoint key feeding a model key: JPM's b1/b2 take the checkpoint's last block and final norm."""
    if jpm and name[:3] in ("b1.", "b2."):
        rest = name[3:]
        if rest.startswith("block."):
            return f"blocks.{depth - 1}.{rest[len('block.'):]}"
        if rest.startswith("norm."):
            return rest
    return name


def load_pretrained(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Load a timm ViT checkpoint into a MIP by name; returns {"missing", "unexpected", "resized"} key lists.

    Keys go through timm's `checkpoint_filter_fn` (wrappers, old layouts, patch-kernel resampling) with
    bilinear, non-antialiased position-embedding resampling to the model's grid (CLS kept, as TransReID).
    The overlapping patch conv loads as is (same kernel, different stride). With JPM, b1 and b2 both
    receive the checkpoint's block depth-1 and final norm (the "copies made after loading"). A file in our own
    names (an exported or converted MIP) loads name for name, for fine-tuning; its identity classifiers are
    left at init when the class count differs.
    """
    raw = read_checkpoint(path)
    shapes = {k: tuple(v.shape) for k, v in raw.items()}
    sd = checkpoint_filter_fn(raw, model, interpolation="bilinear", antialias=False)
    resized = [f"{k}: {shapes[k]} -> {tuple(v.shape)}" for k, v in sd.items()
               if k in shapes and shapes[k] != tuple(v.shape)]
    target, used, missing = {}, set(), []
    for name, param in model.state_dict().items():
        # a file holding our own names (an exported or converted MIP, for fine-tuning) is read as is
        src = name if name in sd else _source_key(name, model.cfg.depth, model.cfg.jpm)
        if src not in sd:
            missing.append(name)
            continue
        if tuple(sd[src].shape) != tuple(param.shape) and param_category(name) == "head":
            log.warning("'%s' has shape %s, the model needs %s (another identity count): left at init",
                        src, tuple(sd[src].shape), tuple(param.shape))
            missing.append(name)
            continue
        if tuple(sd[src].shape) != tuple(param.shape):
            raise ValueError(f"{path}: checkpoint '{src}' has shape {tuple(sd[src].shape)} but model '{name}' "
                             f"needs {tuple(param.shape)}; check model.embed_dim/depth/num_heads")
        target[name] = sd[src]
        used.add(src)
    unexpected = sorted(k for k in sd if k not in used)
    if not target:
        raise ValueError(f"{path}: no checkpoint key matches the model; is it a timm ViT checkpoint?")
    model.load_state_dict(target, strict=False)
    backbone_missing = [k for k in missing if param_category(k) == "backbone" and k != "sie_embed"]
    log.info("loaded %d tensors from %s; resized: %s", len(target), path, resized or "none")
    if backbone_missing:
        log.warning("backbone keys not in the checkpoint (left at init): %s", backbone_missing)
    log.info("missing (SIE/prompt/IPG/head, trained from scratch): %d keys", len(missing) - len(backbone_missing))
    if unexpected:
        log.info("checkpoint keys not used: %s", unexpected)
    return {"missing": missing, "unexpected": unexpected, "resized": resized}
