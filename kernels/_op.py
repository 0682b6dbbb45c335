"""Autograd for the Triton path: one formula, reached through custom ops under torch.compile.

`mip_dist::prompt_attention_fwd/bwd` are custom ops that Dynamo and AOTAutograd treat as opaque
(fake-tensor shapes, registered autograd formula). Eager calls run the same formula (`_setup_context`,
`_grads`) through a plain autograd.Function that calls the launchers directly, skipping the op's
dispatcher round trips; `launch/bench_attention.py --host-overhead` times both entries side by side.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._backend import kernel_module

_NS = "mip_dist"
_PLAIN = (Tensor, torch.nn.Parameter)  # never fake: skips is_fake's subclass walk (about 2 us a call)


def _absent(t: Tensor) -> Tensor:
    """A zero-element placeholder for a gradient whose input was None (custom ops cannot return None)."""
    return t.new_empty(0)


@torch.library.custom_op(f"{_NS}::prompt_attention_fwd", mutates_args=())
def prompt_attention_fwd(q: Tensor, k: Tensor, v: Tensor, bank_k: Optional[Tensor], bank_v: Optional[Tensor],
                         bank_index: Optional[Tensor], inst_k: Optional[Tensor], inst_v: Optional[Tensor],
                         scale: float, deterministic: bool) -> tuple[Tensor, Tensor]:
    """Fused forward: (o [B,H,N,D], lse2 [B,H,N] fp32); `deterministic`: the fixed launch config, here and
    in the backward."""
    return kernel_module().forward(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic)


@prompt_attention_fwd.register_fake
def _fwd_fake(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic):
    B, H, _, D = k.shape
    N = q.shape[2]
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::prompt_attention_bwd", mutates_args=())
def prompt_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bank_k: Optional[Tensor],
                         bank_v: Optional[Tensor], bank_index: Optional[Tensor], inst_k: Optional[Tensor],
                         inst_v: Optional[Tensor], o: Tensor, lse: Tensor, scale: float,
                         deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: dq, dk, dv, d_bank_k, d_bank_v, d_inst_k, d_inst_v (zero-element where the input was None)."""
    grads = kernel_module().backward(do, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse, scale,
                                     deterministic)
    return tuple(g if g is not None else _absent(q) for g in grads)


@prompt_attention_bwd.register_fake
def _bwd_fake(do, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse, scale, deterministic):
    def like(t: Optional[Tensor]) -> Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else _absent(q)

    return (q.new_empty(q.shape), like(k), like(v), like(bank_k), like(bank_v), like(inst_k), like(inst_v))


def _setup_context(ctx, inputs, output) -> None:
    """Save what the backward needs (shared by the custom op and the eager Function)."""
    q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse)
    ctx.scale = scale
    ctx.deterministic = deterministic


def _grads(ctx, do: Optional[Tensor], bwd) -> tuple:
    """The input gradients from `bwd` (the custom op or the launcher itself), None where not needed."""
    q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dbk, dbv, dik, div = bwd(do, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse,
                                         ctx.scale, ctx.deterministic)
    present = (True, True, True, bank_k is not None, bank_v is not None, False, inst_k is not None,
               inst_v is not None)
    out = (dq, dk, dv, dbk, dbv, None, dik, div)
    return tuple(g if (ok and n) else None for g, ok, n in zip(out, present, ctx.needs_input_grad[:8])) + (None, None)


def _op_backward(ctx, do: Optional[Tensor], dlse: Optional[Tensor]) -> tuple:
    return _grads(ctx, do, prompt_attention_bwd)


def _op_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    _setup_context(ctx, inputs, output)


torch.library.register_autograd(f"{_NS}::prompt_attention_fwd", _op_backward, setup_context=_op_setup_context)


class _PromptAttention(torch.autograd.Function):
    """Eager calls: the custom op's autograd formula without its dispatcher round trips (measured by
    `launch/bench_attention.py --host-overhead`, rows "entry ... custom op" vs "autograd.Function")."""

    @staticmethod
    def forward(ctx, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic):
        o, lse = kernel_module().forward(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic)
        _setup_context(ctx, (q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic), (o, lse))
        return o

    @staticmethod
    def backward(ctx, do):
        return _grads(ctx, do, kernel_module().backward)


def prompt_attention_triton(q: Tensor, k: Tensor, v: Tensor, bank_k: Optional[Tensor], bank_v: Optional[Tensor],
                            bank_index: Optional[Tensor], inst_k: Optional[Tensor], inst_v: Optional[Tensor],
                            scale: float, deterministic: bool = False) -> Tensor:
    """Differentiable fused attention (inputs already validated): the custom op while torch.compile traces,
    else the same autograd formula through `_PromptAttention`."""
    if not torch.compiler.is_compiling() and (type(q) in _PLAIN or not is_fake(q)):
        return _PromptAttention.apply(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, float(scale),
                                      bool(deterministic))
    o, _ = prompt_attention_fwd(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, float(scale),
                                bool(deterministic))
    return o
