"""Autograd for the Triton path: a lean autograd.Function in eager mode, custom ops under torch.compile.

Eager calls go through `_PromptAttention` (about 8x less host overhead than a torch.library custom
op, which matters at ReID sizes where one kernel runs for tens of microseconds). While torch.compile
traces, the same launchers are reached through the `mip_dist::prompt_attention_fwd/bwd` custom ops,
which Dynamo and AOTAutograd treat as opaque (fake-tensor shapes, registered autograd formula).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._backend import kernel_module

_NS = "mip_dist"


def _absent(t: Tensor) -> Tensor:
    """A zero-element placeholder for a gradient whose input was None (custom ops cannot return None)."""
    return t.new_empty(0)


@torch.library.custom_op(f"{_NS}::prompt_attention_fwd", mutates_args=())
def prompt_attention_fwd(q: Tensor, k: Tensor, v: Tensor, bank_k: Optional[Tensor], bank_v: Optional[Tensor],
                         bank_index: Optional[Tensor], inst_k: Optional[Tensor], inst_v: Optional[Tensor],
                         scale: float, deterministic: bool) -> tuple[Tensor, Tensor]:
    """Fused forward: (o [B,H,N,D], lse2 [B,H,N] fp32); `deterministic` only travels to the backward."""
    return kernel_module(q.device).forward(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale)


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
    grads = kernel_module(q.device).backward(do, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v,
                                             o, lse, scale, deterministic)
    return tuple(g if g is not None else _absent(q) for g in grads)


@prompt_attention_bwd.register_fake
def _bwd_fake(do, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse, scale, deterministic):
    def like(t: Optional[Tensor]) -> Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else _absent(q)

    return (q.new_empty(q.shape), like(k), like(v), like(bank_k), like(bank_v), like(inst_k), like(inst_v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse)
    ctx.scale = scale
    ctx.deterministic = deterministic


def _backward(ctx, do: Optional[Tensor], dlse: Optional[Tensor]):
    q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dbk, dbv, dik, div = prompt_attention_bwd(do, q, k, v, bank_k, bank_v, bank_index, inst_k,
                                                          inst_v, o, lse, ctx.scale, ctx.deterministic)
    need = ctx.needs_input_grad
    present = (True, True, True, bank_k is not None, bank_v is not None, False, inst_k is not None,
               inst_v is not None)
    grads = (dq, dk, dv, dbk, dbv, None, dik, div)
    out = tuple(g if (ok and n) else None for g, ok, n in zip(grads, present, need[:8]))
    return out + (None, None)


torch.library.register_autograd(f"{_NS}::prompt_attention_fwd", _backward, setup_context=_setup_context)


class _PromptAttention(torch.autograd.Function):
    """Eager-mode autograd around the Triton launchers (same maths as the custom ops)."""

    @staticmethod
    def forward(ctx, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic):
        o, lse = kernel_module(q.device).forward(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale)
        ctx.save_for_backward(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse)
        ctx.scale = scale
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, o, lse = ctx.saved_tensors
        grads = kernel_module(q.device).backward(do, q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v,
                                                 o, lse, ctx.scale, ctx.deterministic)
        dq, dk, dv, dbk, dbv, dik, div = grads
        need = ctx.needs_input_grad
        out = (dq, dk, dv, dbk, dbv, None, dik, div)
        return tuple(g if n else None for g, n in zip(out, need[:8])) + (None, None)


def prompt_attention_triton(q: Tensor, k: Tensor, v: Tensor, bank_k: Optional[Tensor], bank_v: Optional[Tensor],
                            bank_index: Optional[Tensor], inst_k: Optional[Tensor], inst_v: Optional[Tensor],
                            scale: float, deterministic: bool = False) -> Tensor:
    """Differentiable fused attention (inputs already validated): autograd.Function eager, custom op compiled."""
    if not torch.compiler.is_compiling() and not is_fake(q):  # fake tensors trace through the op's fake impl
        return _PromptAttention.apply(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, float(scale),
                                      bool(deterministic))
    o, _ = prompt_attention_fwd(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, float(scale),
                                bool(deterministic))
    return o
