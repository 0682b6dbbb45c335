"""The DeepSpeed config dict, built from cfg.train/optim/data (the one source of its values). A JSON named by
train.deepspeed_config is checked against the run config and adds to the built dict (extra DeepSpeed tuning).

    python -m mip_dist.engine.ds_config --config configs/mip_vitb16_sysu.yaml train.zero_stage=3 > zero3.json

prints the dict the trainer builds, to start such a JSON from (configs/deepspeed/ holds one per ZeRO stage).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from mip_dist.cli import debug_requested, report_error
from mip_dist.config import Config, ConfigError, load_config

# ZeRO settings with concrete values (DeepSpeed rejects "auto" outside the HF integration).
_ZERO_DEFAULTS: dict[int, dict[str, Any]] = {
    0: {"stage": 0},
    1: {"stage": 1, "reduce_bucket_size": 50_000_000},
    2: {"stage": 2, "contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    3: {"stage": 3, "contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": 50_000_000,
        "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
        "stage3_gather_16bit_weights_on_model_save": False},
}

_FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
         "hysteresis": 2, "min_loss_scale": 1}


def deepspeed_stage(precision: str, zero_stage: int) -> int:
    """The ZeRO stage DeepSpeed is asked for: bf16 at train.zero_stage=0 runs as stage 1.

    Without ZeRO, DeepSpeed wraps a bf16 model in FP16_UnfusedOptimizer, whose overflow check reads every
    gradient back to the host (100 reads per step of the tiny model, 226 at ViT-B, each a GPU wait).
    BF16_Optimizer (fp32 master weights and gradient accumulation, one flat norm and clip) reads the host
    twice per step, and DeepSpeed 0.19 builds it only at stage 1: on one rank that partitions nothing, on
    several it shards the fp32 master copy and optimizer state; the update is the same.
    """
    return 1 if precision == "bf16" and zero_stage == 0 else zero_stage


def _data_types(precision: str, stage: int) -> dict[str, str]:
    """BatchNorm buffers in the training dtype; fp32 gradient accumulation selects BF16_Optimizer at stage 1."""
    types = {"buffer_dtype": precision}
    if precision == "bf16" and stage == 1:
        types["grad_accum_dtype"] = "fp32"
    return types


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for this run: per-rank micro batch = data.batch_size, explicit clipping."""
    t = cfg.train
    micro = cfg.data.batch_size
    stage = deepspeed_stage(t.precision, t.zero_stage)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": dict(_ZERO_DEFAULTS[stage]),
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": dict(_FP16) if t.precision == "fp16" else {"enabled": False},
        # DeepSpeed casts only parameters to 16 bits; BatchNorm needs its running stats in the same dtype
        "data_types": _data_types(t.precision, stage),
        "zero_allow_untested_optimizer": True,  # the client SGD/AdamW with our param groups
        "steps_per_print": 1_000_000_000,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def _precision_of(ds: dict[str, Any]) -> str:
    """fp32 / bf16 / fp16 as a DeepSpeed config enables it."""
    bf16 = bool(ds.get("bf16", ds.get("bfloat16", {})).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise ConfigError("deepspeed config enables both bf16 and fp16")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def load_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """cfg.train.deepspeed_config read and checked (batch sizes, accumulation, stage, precision,
    clipping must agree with the run config), or the built config when that key is empty."""
    path = cfg.train.deepspeed_config
    if not path:
        return build_ds_config(cfg, world_size)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {exc}") from exc
    autos = [k for k, v in _walk(ds) if v == "auto"]
    if autos:
        raise ConfigError(f"train.deepspeed_config: {path} has 'auto' values ({', '.join(autos)}); "
                          "DeepSpeed outside the HF integration needs concrete numbers")
    owned = [k for k in ("optimizer", "scheduler") if k in ds]
    if owned:
        raise ConfigError(f"train.deepspeed_config: {path} defines {', '.join(owned)}; the trainer passes its own "
                          "optimizer (optim.*) and LR schedule, so remove those sections")
    micro = cfg.data.batch_size
    want = {
        "train_micro_batch_size_per_gpu": (micro, "data.batch_size"),
        "gradient_accumulation_steps": (cfg.train.grad_accum, "train.grad_accum"),
        "train_batch_size": (micro * cfg.train.grad_accum * world_size,
                             f"data.batch_size x train.grad_accum x world size {world_size}"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
    }
    for key, (value, source) in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"train.deepspeed_config: {path} sets {key}={ds[key]} but the run config gives "
                              f"{value} ({source}); make them agree")
    for key in ("train_micro_batch_size_per_gpu", "gradient_clipping"):
        if key not in ds:
            raise ConfigError(f"train.deepspeed_config: {path} must set {key} explicitly")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (cfg.train.zero_stage, deepspeed_stage(cfg.train.precision, cfg.train.zero_stage)):
        raise ConfigError(f"train.deepspeed_config: {path} uses ZeRO stage {stage} but train.zero_stage="
                          f"{cfg.train.zero_stage}")
    precision = _precision_of(ds)
    if precision != cfg.train.precision:
        raise ConfigError(f"train.deepspeed_config: {path} trains in {precision} but train.precision="
                          f"{cfg.train.precision}")
    buffer_dtype = ds.get("data_types", {}).get("buffer_dtype", "fp32")
    if precision != "fp32" and buffer_dtype not in (precision, "bfloat16" if precision == "bf16" else "float16"):
        raise ConfigError(f"train.deepspeed_config: {path} trains in {precision} but keeps buffers in "
                          f"{buffer_dtype}; BatchNorm needs data_types.buffer_dtype={precision!r}")
    return {**build_ds_config(cfg, world_size), **ds}  # what the file leaves out comes from the run config


def _walk(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of a nested dict."""
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _walk(v, f"{prefix}{k}.")
        return out
    return [(prefix.rstrip("."), d)]


def main(argv: Optional[list[str]] = None) -> int:
    """Print the DeepSpeed JSON the trainer builds for a config (exit 2 with one line for a bad config)."""
    p = argparse.ArgumentParser(description="Print the DeepSpeed config the trainer builds from a run config.")
    p.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks, to include train_batch_size (default: left out; DeepSpeed derives it at start)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    p.add_argument("overrides", nargs="*", help="config overrides such as train.zero_stage=3 train.precision=fp16")
    args = p.parse_args(argv)
    try:
        ds = build_ds_config(load_config(args.config, args.overrides), args.world_size or 1)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        return report_error(exc, debug_requested(args.debug), known=(ConfigError,))
    if args.world_size is None:
        del ds["train_batch_size"]
    print(json.dumps(ds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
