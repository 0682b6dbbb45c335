"""Prompt-concatenated attention: one entry point, dispatching to Triton or PyTorch."""
from __future__ import annotations

from typing import Literal, Optional

import torch

from .reference import prompt_attention_math, prompt_attention_torch

Impl = Literal["auto", "triton", "torch"]


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: Optional[torch.Tensor],
    bank_v: Optional[torch.Tensor],
    bank_index: Optional[torch.Tensor],
    inst_k: Optional[torch.Tensor],
    inst_v: Optional[torch.Tensor],
) -> None:
    """Raise a clear ValueError for shapes, dtypes or indices the contract does not allow."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, S, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[0] not in (1, B) or q.shape[1] != H or q.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} does not match k {tuple(k.shape)} (q batch must be 1 or {B})")
    for name, t in (("k", k), ("v", v), ("bank_k", bank_k), ("bank_v", bank_v), ("inst_k", inst_k), ("inst_v", inst_v)):
        if t is not None and (t.dtype != q.dtype or t.device != q.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}; q is {q.dtype} on {q.device}")
    if (bank_k is None) != (bank_v is None):
        raise ValueError("bank_k and bank_v must both be given or both be None")
    if bank_k is not None:
        if bank_k.dim() != 4 or bank_k.shape[1] != H or bank_k.shape[3] != D or bank_v.shape != bank_k.shape:
            raise ValueError(f"bank_k/bank_v must be [M, {H}, Pm, {D}]; got {tuple(bank_k.shape)}, {tuple(bank_v.shape)}")
        if bank_index is None or bank_index.shape != (B,) or bank_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"bank_index must be an int tensor of shape ({B},); got "
                             f"{None if bank_index is None else (tuple(bank_index.shape), bank_index.dtype)}")
        if B > 0 and (int(bank_index.min()) < 0 or int(bank_index.max()) >= bank_k.shape[0]):
            raise ValueError(f"bank_index values must be in [0, {bank_k.shape[0]}); got "
                             f"min {int(bank_index.min())}, max {int(bank_index.max())}")
    if (inst_k is None) != (inst_v is None):
        raise ValueError("inst_k and inst_v must both be given or both be None")
    if inst_k is not None and (inst_k.dim() != 4 or inst_k.shape[:2] != (B, H) or inst_k.shape[3] != D
                               or inst_v.shape != inst_k.shape):
        raise ValueError(f"inst_k/inst_v must be [{B}, {H}, Pi, {D}]; got {tuple(inst_k.shape)}, {tuple(inst_v.shape)}")


def prompt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: Optional[torch.Tensor] = None,
    bank_v: Optional[torch.Tensor] = None,
    bank_index: Optional[torch.Tensor] = None,
    inst_k: Optional[torch.Tensor] = None,
    inst_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    impl: Impl = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """o = softmax(q [bank[bank_index] | inst | seq]^T * scale) [...]; see ARCHITECTURE.md for shapes."""
    check_inputs(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
    return prompt_attention_torch(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale)


__all__ = ["prompt_attention", "prompt_attention_torch", "prompt_attention_math", "check_inputs"]
