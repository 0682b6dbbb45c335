"""The model as DeepSpeed sees it (`DictOutput`), and ZeRO-3 support: every parameter read inside its own
module's call, and the few exceptions declared."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

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


class DictOutput(nn.Module):
    """Wraps the model for DeepSpeed: returns its output dataclass as a dict (ZeRO-3 hooks only see
    tensors inside tuples/lists/dicts). Under ZeRO-3, `prepare_for_zero3` makes ZeRO gather one module's
    parameters at a time, except the few it registers on this wrapper. Checkpoint keys carry the
    `model.` prefix; exports strip it."""

    def __init__(self, model: nn.Module, zero3: bool) -> None:
        super().__init__()
        self.model = model
        self._out_type: Optional[type] = None
        if zero3:
            prepare_for_zero3(self, model)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = self.model(*args, **kwargs)
        self._out_type = type(out)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}

    def unpack(self, out: dict[str, Any]) -> Any:
        """The model's own output object again."""
        return self._out_type(**out)
