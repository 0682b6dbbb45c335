"""Read checkpoints saved by the MIP authors' code (github wurqjackey/MIP) into the `release` layout.

Their file is a plain `model.state_dict()` of `build_transformer_local`. The mapping to our names:

    base.patch_embed.proj.*, base.cls_token, base.pos_embed, base.sie_embed -> the same names without `base.`
    base.blocks.<i>.*  (i < depth-1)                -> blocks.<i>.*        (block depth-2 is loaded, never run)
    b1.0.* / b1.1.*, b2.0.* / b2.1.*                -> b1.block.* / b1.norm.*, b2.block.* / b2.norm.*
    base.prompt_embeddings [2, Pm, C]               -> mpl.bank[:, 0]
    base.deep_prompt_embeddings[:, :L-1]            -> mpl.bank[:, 1:]
    base.prompt_proj.*                              -> mpl.proj.*
    base.instance_prompt_generator.*                -> ipg.block.*
    base.prompt_embed [1, Pi, C]                    -> ipg.queries only with bug_refine=True (else zeros, as theirs)
    bottleneck[_k].*, classifier[_k].weight         -> heads.<k>.bn.*, heads.<k>.classifier.weight
    bottlenecks_ins_prompts.<i>.*, classifiers_ins_prompts.<i>.weight -> iael_heads.<i>.bn.*, .classifier.weight

Keys their forward never reads are ignored and logged once per group with the reason (RELEASE_IGNORED).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from mip_dist.config import Config, ConfigError, ModelConfig, to_dict, validate
from mip_dist.engine.file_hash import verify_recorded
from mip_dist.engine.safe_load import CheckpointError, safe_torch_load

from .mip import MIP
from .pretrained import unwrap_state_dict

log = logging.getLogger(__name__)
Tensor = torch.Tensor

# their key (regex) -> why our release model does not read it; {last} is their last block index (depth-1)
RELEASE_IGNORED: tuple[tuple[str, str], ...] = (
    (r"base\.blocks\.{last}\.", "their last block is only the source of the b1/b2 copies; their forward never runs it"),
    (r"base\.norm\.", "final LayerNorm of their non-JPM path; b1.1 / b2.1 are the norms their JPM network uses"),
    (r"base\.fc\.", "ImageNet classifier of their ViT; never read"),
    (r"base\.prompt_adapters\.", "read only with MODEL.ADAPTER, off in their released scripts"),
    (r"zero_token", "read only with MODEL.IPIL on and MODEL.IPIL_SIMPLE off"),
    (r"b3\.", "read only with MODEL.IPIL on and MODEL.IPIL_SIMPLE off"),
    (r"bottleneck_sub(_\d+)?\.", "MODEL.SPECIFIC_BN infrared BNNecks; the pre-BN test feature never reads them"),
)
_PROMPT_EMBED_REASON = ("values unused: their released scripts run with MODEL.BUG_REFINE off, so the IPG queries "
                        "are zeros (pass bug_refine=True for a checkpoint trained with it on); its shape gives "
                        "the instance-prompt count")
# their keys that change the features but have no counterpart here: refused, not ignored
RELEASE_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"base\.modal_embed", "MODEL.USE_ME modality embedding"),
    (r"base\.(deep_)?instance_prompt_(embeddings|fusion_heads?|proj)",
     "their bank-fusion IPG (MODEL.USE_INS_PROMPT_GEN off)"),
)
# ModelConfig keys the tensors cannot tell; callers may override them (their released values are the defaults)
NOT_INFERRED = ("img_size", "stride", "num_heads", "sie_coef", "shift", "shuffle_groups", "global_pool",
                "drop_rate", "attn_drop_rate", "drop_path", "prompt_dropout")


class ReleaseCheckpointError(ValueError):
    """A release checkpoint that cannot be read into the release layout; the message names the key."""


def read_release_state_dict(path: str | Path, mmap: bool = False) -> dict[str, Tensor]:
    """Their state dict from a file (weights_only), unwrapped from {"state_dict"}/{"model"}, without `module.`."""
    try:
        if not mmap:  # the full read (conversion, evaluation): a `.sha256` sidecar beside the file is checked
            verify_recorded(path)
        obj = safe_torch_load(path, map_location="cpu", mmap=mmap)
    except CheckpointError as exc:
        raise ReleaseCheckpointError(str(exc)) from exc
    try:
        return unwrap_state_dict(obj, str(path))
    except ValueError as exc:
        raise ReleaseCheckpointError(str(exc)) from exc


def looks_like_release(sd: dict[str, Any]) -> bool:
    """True for their naming: a `base.` backbone with `b1.0` JPM copies (ours has `blocks.` and `b1.block.`)."""
    return "base.cls_token" in sd and any(k.startswith("b1.0.") for k in sd)


def is_release_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a state dict in the authors' naming (False for our exported files and non-files).

    The file is memory-mapped where torch can (zip format), so asking costs no full read of a ViT-B file."""
    for mmap in (True, False):  # legacy (non-zip) torch.save files cannot be memory-mapped
        try:
            return looks_like_release(read_release_state_dict(path, mmap=mmap))
        except ReleaseCheckpointError:
            continue
    return False


def _need(sd: dict[str, Tensor], key: str, ndim: int) -> Tensor:
    """sd[key], checked to exist with `ndim` dimensions, for shape inference."""
    if key not in sd:
        raise ReleaseCheckpointError(f"release checkpoint: missing key '{key}' (needed to infer the model size)")
    if sd[key].ndim != ndim:
        raise ReleaseCheckpointError(f"release checkpoint: '{key}' has shape {tuple(sd[key].shape)}; "
                                     f"expected {ndim} dimensions")
    return sd[key]


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    """1 + the largest index <i> among keys matching `pattern` (a regex with one group); 0 if none."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in sd if (m := rx.match(k))]
    return 1 + max(found) if found else 0


def _grid(img_size: tuple[int, int], patch: int, stride: int) -> int:
    """Patch tokens of TransReID's overlapping embedding."""
    return ((img_size[0] - patch) // stride + 1) * ((img_size[1] - patch) // stride + 1)


def infer_model_config(sd: dict[str, Tensor], **overrides: Any) -> tuple[ModelConfig, int, int]:
    """(release ModelConfig, num_classes, num_cameras) read from their tensor shapes, then `overrides`."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ReleaseCheckpointError(f"from_release_checkpoint: unknown model override(s) {unknown}")
    if not looks_like_release(sd):
        raise ReleaseCheckpointError("not a release checkpoint: expected the authors' key names ('base.cls_token', "
                                     "'b1.0.*'); an exported mip-dist model loads with load_exported instead")
    C = _need(sd, "base.cls_token", 3).shape[-1]
    depth = _count(sd, r"base\.blocks\.(\d+)\.")
    patch = _need(sd, "base.patch_embed.proj.weight", 4).shape[-1]
    n_tokens = _need(sd, "base.pos_embed", 3).shape[1] - 1
    img_size = tuple(overrides.get("img_size", ModelConfig.img_size))
    stride = overrides.get("stride")
    if stride is None:  # their released value (12) first, then any stride giving the stored token count
        stride = next((s for s in [12, *range(patch, 0, -1)] if _grid(img_size, patch, s) == n_tokens), None)
    if stride is None or _grid(img_size, patch, stride) != n_tokens:
        tried = f"stride={stride}" if "stride" in overrides else f"any stride 1..{patch}"
        raise ReleaseCheckpointError(f"release checkpoint: 'base.pos_embed' holds {n_tokens} patch positions, which "
                                     f"img_size={img_size} with {tried} does not give; pass img_size= (and stride=)")
    num_classes = _need(sd, "classifier.weight", 2).shape[0]
    sie = "base.sie_embed" in sd
    num_cameras = _need(sd, "base.sie_embed", 3).shape[0] if sie else 1
    num_parts = _count(sd, r"bottleneck_(\d+)\.weight$") - 1
    num_iael = _count(sd, r"bottlenecks_ins_prompts\.(\d+)\.")
    if depth < 3 or num_parts < 1:
        raise ReleaseCheckpointError(f"release checkpoint: found {depth} 'base.blocks.<i>' and {max(num_parts, 0)} "
                                     "'bottleneck_<k>' local heads; their JPM network needs >= 3 and >= 1")
    hidden = _need(sd, "base.blocks.0.mlp.fc1.weight", 2).shape[0]
    cfg = ModelConfig(
        embed_dim=C, depth=depth, num_heads=max(C // 64, 1), mlp_ratio=hidden / C,  # heads: ViT's 64-wide
        qkv_bias="base.blocks.0.attn.qkv.bias" in sd, img_size=img_size, patch_size=patch, stride=stride,
        sie=sie, pretrained="", use_mpl=True, num_modality_prompts=_need(sd, "base.prompt_embeddings", 3).shape[1],
        prompted_layers=-1, use_ipg=True, ipg_mode="generation",
        num_instance_prompts=_need(sd, "base.prompt_embed", 3).shape[1], jpm=True, num_parts=num_parts,
        iael_heads=num_iael > 0, layout="release")
    cfg = dataclasses.replace(cfg, **overrides)
    if num_iael and num_iael != cfg.num_prompted_layers:
        raise ReleaseCheckpointError(f"release checkpoint: {num_iael} 'bottlenecks_ins_prompts.<i>' heads, but "
                                     f"depth {depth} has {cfg.num_prompted_layers} prompted layers")
    return cfg, num_classes, num_cameras


def release_config(sd: dict[str, Tensor], base: Optional[Config] = None, **overrides: Any) -> tuple[Config, int, int]:
    """A validated run Config around the inferred model (other sections from `base`), classes, cameras."""
    model_cfg, num_classes, num_cameras = infer_model_config(sd, **overrides)
    cfg = copy.deepcopy(base) if base is not None else Config()
    cfg.model = model_cfg
    cfg.data.img_size = tuple(model_cfg.img_size)
    try:
        return validate(cfg), num_classes, num_cameras
    except ConfigError as exc:
        raise ReleaseCheckpointError(f"release checkpoint: inferred config is not valid: {exc}") from exc


def their_name(ours: str) -> Optional[str]:
    """Their key for one of our renamed keys; None for the composed ones (mpl.bank, ipg.queries)."""
    if ours in ("mpl.bank", "ipg.queries"):
        return None
    if m := re.fullmatch(r"heads\.(\d+)\.(bn|classifier)\.(.+)", ours):
        k = int(m.group(1))
        return f"{'bottleneck' if m.group(2) == 'bn' else 'classifier'}{'' if k == 0 else f'_{k}'}.{m.group(3)}"
    if m := re.fullmatch(r"iael_heads\.(\d+)\.(bn|classifier)\.(.+)", ours):
        group = "bottlenecks_ins_prompts" if m.group(2) == "bn" else "classifiers_ins_prompts"
        return f"{group}.{m.group(1)}.{m.group(3)}"
    for mine, theirs in (("b1.block.", "b1.0."), ("b1.norm.", "b1.1."), ("b2.block.", "b2.0."), ("b2.norm.", "b2.1."),
                         ("mpl.proj.", "base.prompt_proj."), ("ipg.block.", "base.instance_prompt_generator.")):
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    return "base." + ours  # patch_embed, cls_token, pos_embed, sie_embed, blocks


def _composed(name: str, target: Tensor, sd: dict[str, Tensor], num_prompted: int,
              bug_refine: bool) -> tuple[Tensor, list[str]]:
    """(our tensor, their keys it reads) for mpl.bank and ipg.queries."""
    if name == "ipg.queries":
        if not bug_refine:
            return torch.zeros_like(target), []
        return sd["base.prompt_embed"], ["base.prompt_embed"]
    first, deep = sd.get("base.prompt_embeddings"), sd.get("base.deep_prompt_embeddings")
    if deep is None:
        raise ReleaseCheckpointError("release checkpoint: missing key 'base.deep_prompt_embeddings'")
    if deep.ndim != 4 or deep.shape[0] != 2 or deep.shape[1] < num_prompted - 1 or deep.shape[2:] != first.shape[1:]:
        raise ReleaseCheckpointError(f"release checkpoint: 'base.deep_prompt_embeddings' has shape "
                                     f"{tuple(deep.shape)}; need [2, >= {num_prompted - 1}, Pm, C] with [Pm, C] = "
                                     f"{tuple(first.shape[1:])} of 'base.prompt_embeddings'")
    bank = torch.cat([first.unsqueeze(1), deep[:, : num_prompted - 1]], dim=1)
    return bank, ["base.prompt_embeddings", "base.deep_prompt_embeddings"]


def map_release_state_dict(sd: dict[str, Tensor], model: MIP, bug_refine: bool = False) -> dict[str, Tensor]:
    """Our state dict for `model` from theirs; raises naming every missing/mis-shaped key; logs ignored groups."""
    used: set[str] = set()
    out, missing, misshaped = {}, [], []
    for name, target in model.state_dict().items():
        src = their_name(name)
        if src is None:
            tensor, read = _composed(name, target, sd, model.num_prompted, bug_refine)
            used.update(read)
            src = " + ".join(read) or None
        elif src not in sd:
            missing.append(f"'{src}' (for {name})")
            continue
        else:
            tensor = sd[src]
            used.add(src)
        if tuple(tensor.shape) != tuple(target.shape):
            misshaped.append(f"'{src or name}' has shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}")
            continue
        out[name] = tensor.to(target.dtype)
    if missing or misshaped:
        raise ReleaseCheckpointError("release checkpoint does not fit the inferred model:\n  "
                                     + "\n  ".join([f"missing key {m}" for m in missing] + misshaped))
    _check_leftovers(sd, used, model.cfg.depth, model.num_prompted)
    return out


def _check_leftovers(sd: dict[str, Tensor], used: set[str], depth: int, num_prompted: int) -> None:
    """Refuse unknown or unsupported keys; log each ignored group once, with its reason."""
    groups: dict[str, list[str]] = {}
    unknown, unsupported = [], []
    for key in sorted(set(sd) - used):
        if key == "base.prompt_embed":
            groups.setdefault(_PROMPT_EMBED_REASON, []).append(key)
            continue
        reason = next((r for p, r in RELEASE_IGNORED if re.match(p.format(last=depth - 1), key)), None)
        if reason is not None:
            groups.setdefault(reason, []).append(key)
        elif (bad := next((r for p, r in RELEASE_UNSUPPORTED if re.match(p, key)), None)) is not None:
            unsupported.append(f"'{key}' ({bad})")
        else:
            unknown.append(f"'{key}'")
    if unsupported:
        raise ReleaseCheckpointError("release checkpoint uses options this model does not implement: "
                                     + ", ".join(unsupported))
    if unknown:
        raise ReleaseCheckpointError("release checkpoint has unknown key(s) " + ", ".join(unknown)
                                     + "; is it a checkpoint of the authors' MIP (build_transformer_local)?")
    deep = sd.get("base.deep_prompt_embeddings")
    if deep is not None and deep.shape[1] > num_prompted - 1:
        groups.setdefault("prompt layers their forward never reaches (it returns before block depth-2)", []).append(
            f"base.deep_prompt_embeddings[:, {num_prompted - 1}:]")
    for reason, keys in groups.items():
        shown = keys if len(keys) <= 3 else keys[:2] + [f"... ({len(keys)} keys)"]
        log.info("release checkpoint: ignored %s: %s", ", ".join(shown), reason)


def from_release_checkpoint(path: str | Path, *, bug_refine: bool = False, attention_impl: str = "auto",
                            **overrides: Any) -> MIP:
    """Their released checkpoint as a `release`-layout MIP in eval mode; `overrides` are ModelConfig keys."""
    sd = read_release_state_dict(path)
    cfg, num_classes, num_cameras = release_config(sd, **overrides)
    return build_release_model(sd, cfg.model, num_classes, num_cameras, bug_refine=bug_refine,
                               attention_impl=attention_impl)


def build_release_model(sd: dict[str, Tensor], model_cfg: ModelConfig, num_classes: int, num_cameras: int,
                        bug_refine: bool = False, attention_impl: str = "auto") -> MIP:
    """A release-layout MIP of `model_cfg` holding their weights `sd`, in eval mode."""
    model = MIP(model_cfg, num_classes, num_cameras, attention_impl=attention_impl)
    model.load_state_dict(map_release_state_dict(sd, model, bug_refine=bug_refine), strict=True)
    return model.eval()


def release_blob(path: str | Path, base: Optional[Config] = None, bug_refine: bool = False) -> dict[str, Any]:
    """Their checkpoint as our exported format {"model", "config", "num_classes", "num_cameras"} (in memory).

    With `base` (e.g. configs/mip_vitb16_sysu_release.yaml), its data/eval/train sections and the model keys
    the tensors cannot tell (NOT_INFERRED) are kept; everything else comes from the checkpoint."""
    sd = read_release_state_dict(path)
    overrides = {k: getattr(base.model, k) for k in NOT_INFERRED} if base is not None else {}
    cfg, num_classes, num_cameras = release_config(sd, base, **overrides)
    model = build_release_model(sd, cfg.model, num_classes, num_cameras, bug_refine=bug_refine)
    state = dict(model.state_dict())  # detached already; the model itself is dropped here
    return {"model": state, "config": to_dict(cfg), "num_classes": num_classes, "num_cameras": num_cameras}
