"""Typed run configuration: dataclasses loaded from YAML with `key.sub=value` overrides, validated up front."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import yaml

from mip_dist.kernels import IMPLS as KERNEL_IMPLS
from mip_dist.kernels import TRITON_HEAD_DIMS


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    """Backbone size, prompt modules and heads of the MIP model."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    img_size: tuple[int, int] = (256, 128)
    patch_size: int = 16
    stride: int = 12
    stem: Literal["patch", "conv", "hybrid"] = "patch"  # conv / hybrid: a CNN stem, for training from scratch (demo)
    global_pool: Literal["token", "avg"] = "token"  # global feature: class token (paper) or mean patch token
    stem_backbone: str = "resnet18"  # hybrid stem: timm CNN (random init) whose stride-16 features become tokens
    stem_strides: tuple[int, ...] = (2, 2, 2, 2)  # conv stem: one 3x3 conv per stride; tokens = image / product
    stem_channels: tuple[int, ...] = ()  # conv stem widths before the last (linear) conv; () = embed_dim / 2**k tiers
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path: float = 0.1
    sie: bool = True
    sie_coef: float = 3.0
    pretrained: str = ""  # local checkpoint path (.pth/.npz/.safetensors) or "timm:<name>" to download
    # MPL: modality-aware prompts
    use_mpl: bool = True
    num_modality_prompts: int = 16
    prompt_dropout: float = 0.1
    prompted_layers: int = -1  # -1 = depth - 2 (paper)
    # IPG: instance-aware prompt generator
    use_ipg: bool = True
    ipg_mode: Literal["generation", "fusion"] = "generation"
    num_instance_prompts: int = 16
    ipg_fusion_bank: int = 64
    # JPM local branch
    jpm: bool = True
    shift: int = 5
    shuffle_groups: int = 2
    num_parts: int = 4
    # IAEL heads on instance prompts
    iael_heads: bool = True
    # paper: TransReID/paper network; release: the authors' released code (block depth-2 skipped, see README)
    layout: Literal["paper", "release"] = "paper"

    @property
    def num_prompted_layers(self) -> int:
        """Blocks that receive prompts (paper: all but the last two)."""
        return self.depth - 2 if self.prompted_layers < 0 else self.prompted_layers


ATTENTION_IMPLS = (*KERNEL_IMPLS, "concat")  # the kernel's paths, plus the literal token concatenation


@dataclass
class AttentionConfig:
    """How prompt-concatenated attention is computed (see kernels/)."""

    impl: Literal[ATTENTION_IMPLS] = "auto"
    deterministic: bool = False


@dataclass
class DataConfig:
    """Where the shards come from and how cross-modality PK batches are formed."""

    dataset: Literal["synthetic", "sysu", "regdb", "llcm"] = "synthetic"
    root: str = ""  # dataset tree (for make_shards / demo generation)
    shards: str = ""  # folder holding train-*.tar, test-*.tar and index.json
    train_urls: str = ""  # overrides shards: brace pattern, http(s):// or pipe:
    allow_pipe: bool = False
    batch_size: int = 64  # = num_identities * 2 * num_instances
    num_instances: int = 4  # K images per modality per identity
    img_size: tuple[int, int] = (256, 128)
    workers: int = 2
    buffer_size: int = 2000
    resampled: bool = False
    steps_per_epoch: int = 0  # 0 = derived from the train sample count and world size
    channel_aug: bool = False
    augment: Literal["paper", "light"] = "paper"  # light: no jitter/blur/erasing/grayscale (small from-scratch models)
    max_error_rate: float = 0.01
    regdb_split: int = 1
    # synthetic generator (embedded default)
    synthetic_ids: int = 120
    synthetic_test_ids: int = 40
    synthetic_images_per_camera: int = 4
    synthetic_seed: int = 0

    @property
    def num_identities(self) -> int:
        """P: identities per batch."""
        return self.batch_size // (2 * self.num_instances)


@dataclass
class LossConfig:
    """Loss weights and the epochs at which each loss switches on."""

    id_weight: float = 1.0
    label_smoothing: float = 0.0
    triplet_weight: float = 1.0
    triplet_margin: Optional[float] = None  # None = soft margin
    global_weight: float = 0.5  # global vs mean-of-local split inside ID / triplet / MSEL
    msel_weight: float = 0.5
    msel_start_epoch: int = 10
    iael: bool = True
    iael_weight: float = 0.5
    iael_start_epoch: int = 0


@dataclass
class OptimConfig:
    """Optimizer, parameter-group LR factors and the warm-up + cosine-with-restarts schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    prompt_lr_factor: float = 5.0
    ipg_lr_factor: float = 15.0
    warmup_epochs: float = 5.0
    warmup_factor: float = 0.01
    restart_epochs: float = 30.0
    restart_decay: float = 0.1
    min_lr_factor: float = 1e-5
    grad_clip: float = 5.0
    freeze_backbone: bool = False


@dataclass
class TrainConfig:
    """Run length, precision, distribution, logging and checkpoint policy."""

    epochs: int = 80
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = 0
    deepspeed_config: str = ""  # optional JSON; otherwise built from this config
    output_dir: str = "runs"
    run_name: str = ""
    seed: int = 0
    log_every: int = 20
    ckpt_every_steps: int = 0  # 0 = only at epoch end
    keep_last: int = 2
    eval_every_epochs: int = 10
    best_metric: str = "all_single/mAP"
    max_bad_steps: int = 20
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    collective_timeout_s: float = 0.0  # a rank missing from a collective this long ends the job; 0 = 300 CPU / 600 GPU


@dataclass
class EvalConfig:
    """Feature extraction and protocol settings for evaluation."""

    batch_size: int = 128
    flip: bool = False
    protocols: list[str] = field(default_factory=lambda: ["sysu"])
    trials: int = 10
    rerank: bool = False
    max_rank: int = 20


@dataclass
class Config:
    """The whole run: one object passed down to builders, never imported as a global."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    """Readable name of a type hint for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the declared field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Write a nested dict into a dataclass tree, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; allowed here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value`, parsing the value as YAML (so 3, 1e-3, true, [1,2] keep their types)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    """`a.b.c`, v -> {a: {b: {c: v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


MAX_LR = 10.0  # above this every schedule diverges at once; the demo's AdamW uses 1e-3, SGD 1e-2
MAX_LR_FACTOR = 1000.0


def _numbers(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float setting, nested lists included (for the finiteness check)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, (list, tuple)):
            yield from ((key, v) for v in value if isinstance(v, float))


def validate(cfg: Config) -> Config:
    """Reject impossible combinations before any work starts."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(m.embed_dim % m.num_heads == 0, "model.embed_dim",
         f"{m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if cfg.attention.impl == "triton":  # auto falls back to the PyTorch path for other head dims
        need(m.embed_dim // m.num_heads in TRITON_HEAD_DIMS, "model.num_heads",
             f"head dim {m.embed_dim // m.num_heads} must be one of {', '.join(map(str, TRITON_HEAD_DIMS))} with "
             "attention.impl=triton; use attention.impl=auto or torch for other head dims")
    need(m.depth >= 3, "model.depth", f"{m.depth} too small; need >= 3 (prompted blocks + JPM copy)")
    need(-1 <= m.prompted_layers <= m.depth - 1, "model.prompted_layers",
         f"{m.prompted_layers} must be -1 (= depth-2) or in 0..{m.depth - 1}")
    need(m.img_size[0] >= m.patch_size and m.img_size[1] >= m.patch_size, "model.img_size",
         f"{m.img_size} is smaller than one patch ({m.patch_size})")
    need(0 < m.stride <= m.patch_size, "model.stride", f"{m.stride} must be in 1..patch_size")
    if m.stem == "conv":
        need(len(m.stem_strides) > 0 and min(m.stem_strides) >= 1, "model.stem_strides",
             f"{list(m.stem_strides)} must be a non-empty list of strides >= 1")
        need(not m.stem_channels or len(m.stem_channels) == len(m.stem_strides) - 1, "model.stem_channels",
             f"needs {len(m.stem_strides) - 1} widths (one per model.stem_strides entry but the last, which "
             f"projects to embed_dim); got {list(m.stem_channels)}")
        reduction = math.prod(m.stem_strides)
        need(m.img_size[0] % reduction == 0 and m.img_size[1] % reduction == 0, "model.img_size",
             f"{tuple(m.img_size)} must be divisible by the product of model.stem_strides = {reduction}")
    need(m.num_modality_prompts >= 1, "model.num_modality_prompts", "must be >= 1")
    need(m.num_instance_prompts >= 1, "model.num_instance_prompts", "must be >= 1")
    need(0.0 <= m.prompt_dropout < 1.0, "model.prompt_dropout", "must be in [0, 1)")
    need(0.0 <= m.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")
    need(m.num_parts >= 1, "model.num_parts", "must be >= 1")
    if m.layout == "release":
        need(m.jpm, "model.layout", "release is the authors' JPM network; it needs model.jpm=true")
        need(m.prompted_layers in (-1, m.depth - 2), "model.layout",
             f"release prompts exactly blocks 0..depth-3; model.prompted_layers must be -1 or {m.depth - 2}, "
             f"got {m.prompted_layers}")
    need(tuple(m.img_size) == tuple(d.img_size), "data.img_size",
         f"{d.img_size} must equal model.img_size {m.img_size}")
    need(d.num_instances >= 1, "data.num_instances", "must be >= 1")
    need(d.batch_size > 0 and d.batch_size % (2 * d.num_instances) == 0, "data.batch_size",
         f"{d.batch_size} is not divisible into P identities x 2K images with "
         f"K=data.num_instances={d.num_instances}; use a multiple of {2 * d.num_instances}")
    need(d.batch_size // (2 * d.num_instances) >= 2, "data.batch_size",
         "needs at least 2 identities per batch for the triplet loss")
    need(d.workers >= 0, "data.workers", "must be >= 0")
    need(0.0 <= d.max_error_rate <= 1.0, "data.max_error_rate", "must be in [0, 1]")
    need(1 <= d.regdb_split <= 10, "data.regdb_split", f"{d.regdb_split} must be in 1..10")
    need(d.steps_per_epoch >= 0, "data.steps_per_epoch", "must be >= 0")
    for key, value in _numbers(cfg):
        need(math.isfinite(value), key, f"{value} is not a finite number")
    need(0 < o.lr <= MAX_LR, "optim.lr", f"{o.lr} must be in (0, {MAX_LR}]")
    need(0 <= o.momentum < 1, "optim.momentum", f"{o.momentum} must be in [0, 1)")
    need(0 <= o.weight_decay < 1, "optim.weight_decay", f"{o.weight_decay} must be in [0, 1)")
    for name in ("bias_lr_factor", "prompt_lr_factor", "ipg_lr_factor"):
        need(0 < getattr(o, name) <= MAX_LR_FACTOR, f"optim.{name}",
             f"{getattr(o, name)} must be in (0, {MAX_LR_FACTOR}]")
    need(0 < o.warmup_factor <= 1, "optim.warmup_factor", f"{o.warmup_factor} must be in (0, 1]")
    need(0 < o.restart_decay <= 1, "optim.restart_decay", f"{o.restart_decay} must be in (0, 1]")
    need(0 <= o.min_lr_factor <= 1, "optim.min_lr_factor", f"{o.min_lr_factor} must be in [0, 1]")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(0 <= cfg.loss.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
    need(0 <= cfg.loss.global_weight <= 1, "loss.global_weight", "must be in [0, 1]")
    for name in ("id_weight", "triplet_weight", "msel_weight", "iael_weight"):
        need(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be >= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(o.restart_epochs > 0, "optim.restart_epochs", "must be > 0")
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{t.zero_stage} must be 0, 1, 2 or 3")
    need(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    need(t.collective_timeout_s >= 0, "train.collective_timeout_s", "must be >= 0 (0 = 300 s on CPU, 600 s on GPU)")
    need(cfg.eval.trials >= 1, "eval.trials", "must be >= 1")
    need(cfg.eval.max_rank >= 1, "eval.max_rank", "must be >= 1")
    allowed_protocols = {"sysu", "sysu_authors", "regdb", "llcm"}
    for p in cfg.eval.protocols:
        need(p in allowed_protocols, "eval.protocols",
             f"unknown protocol {p!r}; allowed: {', '.join(sorted(allowed_protocols))}")
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from defaults, an optional YAML file (with `_base_` inheritance) and overrides."""
    cfg = Config()
    if path is not None:
        for layer in _yaml_layers(Path(path)):
            _apply(cfg, layer)
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
    return validate(cfg)


def _yaml_layers(path: Path, seen: Optional[set] = None) -> list[dict]:
    """A YAML file and its `_base_` chain, base first."""
    seen = seen or set()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through _base_")
    seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("_base_", None)
    layers = _yaml_layers(path.parent / base, seen) if base else []
    return layers + [data]


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for saving the resolved config."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(dataclasses.asdict(cfg))


def from_dict(data: dict) -> Config:
    """Rebuild and validate a Config from `to_dict` output (e.g. a checkpoint's saved config)."""
    cfg = Config()
    _apply(cfg, data)
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
