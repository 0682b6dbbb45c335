"""Test helpers for the GPU path on a CPU-only machine: fake CUDA tensors, a host-sync counter, and a
backward pass that walks the autograd graph itself (the C++ engine needs a real CUDA context)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mip_dist.engine.op_counter import SYNC_OPS, SyncCounter  # noqa: F401 - re-exported for the tests


def fake_cuda_mode() -> FakeTensorMode:
    """Fake tensors that may live on `cuda` without a GPU; real CPU tensors convert on entry."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def _validated(grad: torch.Tensor, meta: Any, node: Any) -> torch.Tensor:
    """What the engine's validate_outputs does: refuse a device change, reduce broadcasts, cast dtype."""
    if grad.device != meta.device:
        raise RuntimeError(f"{node.name()}: gradient on {grad.device}, its input lives on {meta.device}")
    if tuple(grad.shape) != tuple(meta.shape):
        grad = grad.sum_to_size(meta.shape)
    return grad.to(meta.dtype) if grad.dtype != meta.dtype else grad


def walk_backward(root: torch.Tensor) -> int:
    """root.backward() by calling each autograd node in topological order; returns nodes run.

    Calls the same C++/Python backward functions the engine would, so a device or dtype clash in any
    backward formula (custom ops included) still raises; AccumulateGrad nodes fill `.grad`."""
    order, seen = [], set()
    stack = [(root.grad_fn, False)]
    while stack:  # iterative post-order DFS
        node, done = stack.pop()
        if node is None:
            continue
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None:
                stack.append((child, False))
    grads: dict[Any, list] = defaultdict(list)
    grads[root.grad_fn] = [torch.ones_like(root)]
    for node in reversed(order):  # reverse post-order = topological order from the root
        incoming = grads.pop(node, None)
        if not incoming:
            continue
        width = len(node._input_metadata) if hasattr(node, "_input_metadata") else len(incoming)
        incoming = incoming + [None] * (width - len(incoming))  # one slot per output of the forward op
        outs = node(*incoming) if callable(node) else node.apply(*incoming)  # Python Function nodes: .apply
        if not isinstance(outs, tuple):
            outs = (outs,)
        for (child, slot), g in zip(node.next_functions, outs):
            if child is None or g is None:
                continue
            g = _validated(g, child._input_metadata[slot], child)
            slots = grads[child]
            while len(slots) <= slot:
                slots.append(None)
            slots[slot] = g if slots[slot] is None else slots[slot] + g
    return len(order)
