"""The run configuration's sections: typed dataclasses, each checking its own values in `validate()`."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

from mip_dist.eval.protocols import PROTOCOL_NAMES as PROTOCOLS
from mip_dist.kernels import IMPLS as KERNEL_IMPLS
from mip_dist.kernels import TRITON_HEAD_DIMS


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used; the message names the key."""


def need(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


MAX_LR = 10.0  # above this every schedule diverges at once; the demo's AdamW uses 1e-3, SGD 1e-2
MAX_LR_FACTOR = 1000.0


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

    def validate(self) -> None:
        """Shapes that can be built: heads divide the width, the stem fits the image, prompts exist."""
        need(self.embed_dim % self.num_heads == 0, "model.embed_dim",
             f"{self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        need(self.depth >= 3, "model.depth", f"{self.depth} too small; need >= 3 (prompted blocks + JPM copy)")
        need(-1 <= self.prompted_layers <= self.depth - 1, "model.prompted_layers",
             f"{self.prompted_layers} must be -1 (= depth-2) or in 0..{self.depth - 1}")
        need(min(self.img_size) >= self.patch_size, "model.img_size",
             f"{self.img_size} is smaller than one patch ({self.patch_size})")
        need(0 < self.stride <= self.patch_size, "model.stride", f"{self.stride} must be in 1..patch_size")
        if self.stem == "conv":
            self._validate_conv_stem()
        for name in ("num_modality_prompts", "num_instance_prompts", "num_parts"):
            need(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        need(0.0 <= self.prompt_dropout < 1.0, "model.prompt_dropout", "must be in [0, 1)")
        need(0.0 <= self.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")
        if self.layout == "release":
            need(self.jpm, "model.layout", "release is the authors' JPM network; it needs model.jpm=true")
            need(self.prompted_layers in (-1, self.depth - 2), "model.layout",
                 f"release prompts exactly blocks 0..depth-3; model.prompted_layers must be -1 or {self.depth - 2}, "
                 f"got {self.prompted_layers}")

    def _validate_conv_stem(self) -> None:
        """One stride per conv, one width per conv but the last, and an image the strides divide."""
        need(len(self.stem_strides) > 0 and min(self.stem_strides) >= 1, "model.stem_strides",
             f"{list(self.stem_strides)} must be a non-empty list of strides >= 1")
        need(not self.stem_channels or len(self.stem_channels) == len(self.stem_strides) - 1, "model.stem_channels",
             f"needs {len(self.stem_strides) - 1} widths (one per model.stem_strides entry but the last, which "
             f"projects to embed_dim); got {list(self.stem_channels)}")
        reduction = math.prod(self.stem_strides)
        need(self.img_size[0] % reduction == 0 and self.img_size[1] % reduction == 0, "model.img_size",
             f"{tuple(self.img_size)} must be divisible by the product of model.stem_strides = {reduction}")


ATTENTION_IMPLS = (*KERNEL_IMPLS, "concat")  # the kernel's paths, plus the literal token concatenation


@dataclass
class AttentionConfig:
    """How prompt-concatenated attention is computed (see kernels/)."""

    impl: Literal[ATTENTION_IMPLS] = "auto"
    deterministic: bool = False


@dataclass
class ShardSource:
    """One dataset's shard folder in a multi-dataset run: its share of the identities drawn per batch."""

    path: str = ""  # folder holding train-*.tar, test-*.tar and index.json
    weight: float = 1.0  # relative share of the P identities of a batch
    name: str = ""  # label in logs and evaluation keys; "" = the folder's name
    protocol: str = ""  # evaluation protocol for its test shards; "" = its dataset's own (index.json)


@dataclass
class DataConfig:
    """Where the shards come from and how cross-modality PK batches are formed."""

    # auto: the dataset data.shards' index.json names (set at start-up, before the config is saved)
    dataset: Literal["auto", "synthetic", "sysu", "regdb", "llcm"] = "auto"
    root: str = ""  # dataset tree (for make_shards / demo generation)
    shards: Union[str, list[ShardSource]] = ""  # shard folder (index.json), or a list of datasets (ShardSource)
    train_urls: str = ""  # overrides shards: brace pattern, http(s):// or pipe:
    allow_pipe: bool = False
    batch_size: int = 64  # = num_identities * 2 * num_instances
    num_instances: int = 4  # K images per modality per identity
    img_size: tuple[int, int] = (256, 128)
    workers: int = 2
    buffer_size: int = 2000
    cache_mb: int = 0  # > 0 (needs workers: 0): keep read shards and decoded images in memory, up to this many MiB
    resampled: bool = False
    steps_per_epoch: int = 0  # 0 = derived from the train sample count and world size
    channel_aug: bool = False
    augment: Literal["paper", "light"] = "paper"  # light: no jitter/blur/erasing/grayscale (small from-scratch models)
    max_error_rate: float = 0.01  # fraction of expected samples (index.json counts) a worker may fail to deliver
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

    def sources(self) -> list[ShardSource]:
        """The datasets of this run, named: one for a folder string, several for a list (none when unset)."""
        if isinstance(self.shards, str):
            return [ShardSource(path=self.shards, name=Path(self.shards).name or self.shards)] if self.shards else []
        return [dataclasses.replace(s, name=s.name or Path(s.path).name or s.path) for s in self.shards]

    @property
    def multi_dataset(self) -> bool:
        """True when data.shards lists datasets (evaluation keys then carry each dataset's name)."""
        return not isinstance(self.shards, str)

    def validate(self) -> None:
        """Batches that can be formed, and a dataset list whose entries can be told apart."""
        need(self.num_instances >= 1, "data.num_instances", "must be >= 1")
        need(self.batch_size > 0 and self.batch_size % (2 * self.num_instances) == 0, "data.batch_size",
             f"{self.batch_size} is not divisible into P identities x 2K images with "
             f"K=data.num_instances={self.num_instances}; use a multiple of {2 * self.num_instances}")
        need(self.num_identities >= 2, "data.batch_size", "needs at least 2 identities per batch for the triplet loss")
        need(self.workers >= 0, "data.workers", "must be >= 0")
        need(self.cache_mb >= 0, "data.cache_mb", "must be >= 0 (0 disables the in-memory sample cache)")
        need(self.cache_mb == 0 or self.workers == 0, "data.cache_mb",
             f"{self.cache_mb} needs data.workers=0 (got {self.workers}): the cache lives in the reading process, "
             "and DataLoader workers start afresh every epoch")
        need(0.0 <= self.max_error_rate <= 1.0, "data.max_error_rate", "must be in [0, 1]")
        need(1 <= self.regdb_split <= 10, "data.regdb_split", f"{self.regdb_split} must be in 1..10")
        need(self.steps_per_epoch >= 0, "data.steps_per_epoch", "must be >= 0")
        if self.multi_dataset:
            self._validate_sources()

    def _validate_sources(self) -> None:
        """Each listed dataset has a path, a positive weight, a known protocol and a name of its own."""
        need(len(self.shards) > 0, "data.shards", "an empty list; give a folder or at least one dataset")
        need(not self.train_urls, "data.train_urls", "cannot be combined with a list of datasets in data.shards")
        for i, src in enumerate(self.shards):
            need(bool(src.path), f"data.shards[{i}].path", "must name a shard folder")
            need(math.isfinite(src.weight) and src.weight > 0, f"data.shards[{i}].weight",
                 f"{src.weight} must be a number > 0")
            need(src.protocol in ("", *PROTOCOLS), f"data.shards[{i}].protocol",
                 f"unknown protocol {src.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        names = [s.name for s in self.sources()]
        for i, (src, name) in enumerate(zip(self.shards, names)):
            key = f"data.shards[{i}].name" if src.name else f"data.shards[{i}].path"
            need(re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None, key,
                 f"dataset name {name!r} must be a plain word (letters, digits, _ or -): it names evaluation keys "
                 "and result files" + ("" if src.name else "; set a `name` for this dataset"))
        twice = sorted({n for n in names if names.count(n) > 1})
        need(not twice, "data.shards", f"dataset name(s) {', '.join(twice)} used twice; set a distinct `name` for each")


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

    def validate(self) -> None:
        """Non-negative weights, a smoothing and a split that are fractions."""
        need(0 <= self.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
        need(0 <= self.global_weight <= 1, "loss.global_weight", "must be in [0, 1]")
        for name in ("id_weight", "triplet_weight", "msel_weight", "iael_weight"):
            need(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")


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

    def validate(self) -> None:
        """Learning rates and factors a schedule can follow without diverging at once."""
        need(0 < self.lr <= MAX_LR, "optim.lr", f"{self.lr} must be in (0, {MAX_LR}]")
        need(0 <= self.momentum < 1, "optim.momentum", f"{self.momentum} must be in [0, 1)")
        need(0 <= self.weight_decay < 1, "optim.weight_decay", f"{self.weight_decay} must be in [0, 1)")
        for name in ("bias_lr_factor", "prompt_lr_factor", "ipg_lr_factor"):
            need(0 < getattr(self, name) <= MAX_LR_FACTOR, f"optim.{name}",
                 f"{getattr(self, name)} must be in (0, {MAX_LR_FACTOR}]")
        need(0 < self.warmup_factor <= 1, "optim.warmup_factor", f"{self.warmup_factor} must be in (0, 1]")
        need(0 < self.restart_decay <= 1, "optim.restart_decay", f"{self.restart_decay} must be in (0, 1]")
        need(0 <= self.min_lr_factor <= 1, "optim.min_lr_factor", f"{self.min_lr_factor} must be in [0, 1]")
        need(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        need(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        need(self.restart_epochs > 0, "optim.restart_epochs", "must be > 0")


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

    def validate(self) -> None:
        """A run length, accumulation, ZeRO stage and retention DeepSpeed accepts."""
        need(self.epochs >= 1, "train.epochs", "must be >= 1")
        need(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        need(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{self.zero_stage} must be 0, 1, 2 or 3")
        need(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        need(self.collective_timeout_s >= 0, "train.collective_timeout_s",
             "must be >= 0 (0 = 300 s on CPU, 600 s on GPU)")


@dataclass
class EvalConfig:
    """Feature extraction and protocol settings for evaluation."""

    batch_size: int = 128
    flip: bool = False
    protocols: list[str] = field(default_factory=lambda: ["sysu"])
    trials: int = 10
    rerank: bool = False
    max_rank: int = 20

    def validate(self) -> None:
        """Known protocols and at least one trial and rank."""
        need(self.trials >= 1, "eval.trials", "must be >= 1")
        need(self.max_rank >= 1, "eval.max_rank", "must be >= 1")
        for p in self.protocols:
            need(p in PROTOCOLS, "eval.protocols", f"unknown protocol {p!r}; allowed: {', '.join(PROTOCOLS)}")


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

    def validate(self) -> "Config":
        """Every section's own checks, then the few that span sections; returns self."""
        for key, value in _numbers(self):
            need(math.isfinite(value), key, f"{value} is not a finite number")
        for section in (self.model, self.data, self.loss, self.optim, self.train, self.eval):
            section.validate()
        m = self.model
        if self.attention.impl == "triton":  # auto falls back to the PyTorch path for other head dims
            need(m.embed_dim // m.num_heads in TRITON_HEAD_DIMS, "model.num_heads",
                 f"head dim {m.embed_dim // m.num_heads} must be one of {', '.join(map(str, TRITON_HEAD_DIMS))} "
                 "with attention.impl=triton; use attention.impl=auto or torch for other head dims")
        need(tuple(m.img_size) == tuple(self.data.img_size), "data.img_size",
             f"{self.data.img_size} must equal model.img_size {m.img_size}")
        return self


def _numbers(obj: object, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float setting, nested lists and datasets included (finiteness check)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    yield from _numbers(v, f"{key}[{i}].")
                elif isinstance(v, float):
                    yield key, v
