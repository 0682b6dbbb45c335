"""Small pieces of the training loop: seeding, fp32 loss inputs, device values read in one copy, the
gradient norm on the device, and config differences on resume."""
from __future__ import annotations

import dataclasses
import random
import threading
from typing import Any

import numpy as np
import torch

from .distributed import to_host


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_float32(obj: Any) -> Any:
    """Cast every floating tensor of a (dataclass / list / dict of) model output to fp32 for the loss."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_float32(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    return obj


def clips_in_trainer(precision: str, zero_stage: int) -> bool:
    """fp32 without ZeRO: the trainer clips (the norm it logs is the one it clips with). DeepSpeed would take
    the same norm again in a Python loop over the parameters; in bf16/fp16 or under ZeRO its optimizer clips."""
    return precision == "fp32" and zero_stage == 0


def grad_norm_stage0(engine: Any, max_norm: float = 0.0) -> Any:
    """Global L2 norm of the (already all-reduced) gradients, left on the device, taken before the optimizer
    step (DeepSpeed reports none without ZeRO): one foreach norm; with max_norm > 0 the gradients are also
    clipped to it (torch's clip_grad_norm_, which returns the norm before clipping)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    grads = [p.grad.detach() for p in params]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def grad_norm_zero(engine: Any) -> Any:
    """The global gradient norm the ZeRO optimizer computed during its step (a float or a tensor)."""
    gn = engine.get_global_grad_norm()
    return gn if gn is not None else float("nan")


def non_finite_tensors(state: dict) -> list[str]:
    """Names of floating tensors in a state dict that hold NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def read_floats(values: list[Any]) -> list[float]:
    """A logging window's values as floats: device tensors are read back here, in one copy."""
    tensors = [torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(to_host(torch.stack([t.to(tensors[0].device) for t in tensors])))
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def lr_mult(optimizer: torch.optim.Optimizer) -> float:
    """Current schedule multiplier, read back from the first group."""
    g = optimizer.param_groups[0]
    return g["lr"] / g["initial_lr"]


def main_thread() -> bool:
    """signal.signal only works in the main thread."""
    return threading.current_thread() is threading.main_thread()


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
