"""Counts the ATen ops a piece of work dispatches and which of them make the host wait for the device.

A training step whose Python issues thousands of small ops, or reads values back to the host (a Python
`if` on a tensor, `.item()`), leaves a fast GPU idle; both are visible on the CPU, op by op, with a
TorchDispatchMode. `launch/bench_step_ops.py` and the tests use it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must wait for: scalar reads and data-dependent output shapes.
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
            aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
            aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
            aten.masked_scatter.default}


class SyncCounter(TorchDispatchMode):
    """Counts host-sync ops (SYNC_OPS) and device->host copies dispatched while active, with the op names;
    `dispatched` counts every op (the host's work per step)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.dispatched = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.dispatched += 1
        if func in SYNC_OPS:
            self.ops.append(str(func))
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dst = kwargs.get("device") if func is aten._to_copy.default else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
                    and torch.device(dst).type == "cpu":
                self.ops.append(f"{func} (device->host)")
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        """Host syncs seen so far."""
        return len(self.ops)
