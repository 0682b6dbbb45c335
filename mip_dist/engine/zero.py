"""ZeRO-3 support: every parameter read inside its own module's call, and the few exceptions declared."""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def prepare_for_zero3(root: nn.Module, model: nn.Module) -> tuple[int, int]:
    """Make the model's parameter reads visible to ZeRO-3's per-module gathering.

    ZeRO-3 gathers a module's own parameters around its call and re-gathers them for backward through
    hooks on the module's tensor outputs (tuples, lists, dicts), releasing them once gradients have
    reached all of its inputs. Three patterns break that, and are handled here:
    - a weight slice taken outside its module (prompt k/v from the qkv weight): blocks with
      `kv_through_module` switch to calling the qkv module and dropping its q rows;
    - `model`'s own parameters (CLS, position and camera embeddings): `model` returns a dataclass,
      which ZeRO's backward hooks cannot see, so they are registered on `root` (the engine's module,
      which returns a dict) and stay gathered for the step;
    - parameters whose gradient path never reaches their module's input (the IPG's learnable
      queries), listed by modules in `step_parameters()`: registered on `root` likewise.
    These are a few hundred thousand elements at ViT-B size; every other parameter stays partitioned
    outside its module's call. Returns (blocks switched, parameters registered)."""
    import deepspeed

    switched = registered = 0
    for p in model.parameters(recurse=False):
        deepspeed.zero.register_external_parameter(root, p)
        registered += 1
    for module in model.modules():
        if hasattr(module, "kv_through_module"):
            module.kv_through_module = True
            switched += 1
        for p in getattr(module, "step_parameters", lambda: [])():
            deepspeed.zero.register_external_parameter(root, p)
            registered += 1
    log.info("ZeRO-3: %d blocks compute prompt k/v through their qkv module; %d parameters gathered per step",
             switched, registered)
    return switched, registered
