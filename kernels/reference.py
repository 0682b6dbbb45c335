"""Pure-PyTorch prompt-concatenated attention: the CPU fallback and the oracle in tests."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gather_keys(
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: Optional[torch.Tensor],
    bank_v: Optional[torch.Tensor],
    bank_index: Optional[torch.Tensor],
    inst_k: Optional[torch.Tensor],
    inst_v: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample [bank | inst | seq] keys and values, materialised (what the fused kernel avoids)."""
    keys, values = [], []
    if bank_k is not None and bank_index is None:  # a one-entry bank shared by every sample
        keys.append(bank_k.expand(k.shape[0], -1, -1, -1))
        values.append(bank_v.expand(k.shape[0], -1, -1, -1))
    elif bank_k is not None:
        keys.append(bank_k[bank_index])
        values.append(bank_v[bank_index])
    if inst_k is not None:
        keys.append(inst_k)
        values.append(inst_v)
    keys.append(k)
    values.append(v)
    return torch.cat(keys, dim=2), torch.cat(values, dim=2)


def prompt_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: Optional[torch.Tensor] = None,
    bank_v: Optional[torch.Tensor] = None,
    bank_index: Optional[torch.Tensor] = None,
    inst_k: Optional[torch.Tensor] = None,
    inst_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q [bank|inst|seq]^T * scale) [bank|inst|seq] via scaled_dot_product_attention."""
    keys, values = gather_keys(k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
    if q.shape[0] != keys.shape[0]:
        q = q.expand(keys.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, keys, values, scale=scale)


def prompt_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: Optional[torch.Tensor] = None,
    bank_v: Optional[torch.Tensor] = None,
    bank_index: Optional[torch.Tensor] = None,
    inst_k: Optional[torch.Tensor] = None,
    inst_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Explicit softmax(QK^T)V in the inputs' dtype: the high-precision oracle when run in fp64."""
    keys, values = gather_keys(k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, keys.transpose(-2, -1)) * scale
    return torch.matmul(scores.softmax(dim=-1), values)
