"""Prompt-concatenated attention: one entry point, dispatching to Triton or PyTorch."""
from __future__ import annotations

import logging
import math
from typing import Literal, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from ._backend import interpreter_requested, triton_available, triton_unavailable_reason
from ._op import prompt_attention_triton
from .reference import prompt_attention_math, prompt_attention_torch

Impl = Literal["auto", "triton", "torch"]
IMPLS = ("auto", "triton", "torch")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

logger = logging.getLogger(__name__)
_warned: set[str] = set()


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
    """Raise a clear ValueError for shapes, dtypes or indices the contract does not allow (each shape, dtype and
    device read once: this runs on every call)."""
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(qs)}, {tuple(ks)}, {tuple(vs)}")
    B, H, S, D = ks
    if vs != ks:
        raise ValueError(f"k {tuple(ks)} and v {tuple(vs)} differ")
    if qs[0] not in (1, B) or qs[1] != H or qs[3] != D:
        raise ValueError(f"q {tuple(qs)} does not match k {tuple(ks)} (q batch must be 1 or {B})")
    dtype, device = q.dtype, q.device
    if not dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor; got {dtype}")
    for name, t in (("k", k), ("v", v), ("bank_k", bank_k), ("bank_v", bank_v), ("inst_k", inst_k), ("inst_v", inst_v)):
        if t is not None and (t.dtype != dtype or t.device != device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}; q is {dtype} on {device}")
    if (bank_k is None) != (bank_v is None):
        raise ValueError("bank_k and bank_v must both be given or both be None")
    n_keys = S
    if bank_k is not None:
        bs = bank_k.shape
        if len(bs) != 4 or bs[1] != H or bs[3] != D or bank_v.shape != bs:
            raise ValueError(f"bank_k/bank_v must be [M, {H}, Pm, {D}]; got {tuple(bs)}, {tuple(bank_v.shape)}")
        if bs[0] < 1:
            raise ValueError("bank_k/bank_v must hold at least one entry (M >= 1)")
        if bank_index is None:
            if bs[0] != 1:
                raise ValueError(f"bank_index is required for a bank of {bs[0]} entries "
                                 "(only a one-entry bank is shared by every sample without an index)")
        else:
            if bank_index.shape != (B,) or bank_index.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"bank_index must be an int tensor of shape ({B},); got "
                                 f"{(tuple(bank_index.shape), bank_index.dtype)}")
            if bank_index.device != device:
                raise ValueError(f"bank_index is on {bank_index.device}; q is on {device}")
            _check_index_range(bank_index, bs[0])
        n_keys += bs[2]
    if (inst_k is None) != (inst_v is None):
        raise ValueError("inst_k and inst_v must both be given or both be None")
    if inst_k is not None:
        ist = inst_k.shape
        if len(ist) != 4 or ist[:2] != (B, H) or ist[3] != D or inst_v.shape != ist:
            raise ValueError(f"inst_k/inst_v must be [{B}, {H}, Pi, {D}]; got {tuple(ist)}, {tuple(inst_v.shape)}")
        n_keys += ist[2]
    if n_keys == 0 and qs[2] > 0:
        raise ValueError("no keys: the sequence, bank and instance prompts are all empty (softmax over nothing)")


def host_range(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """(min, max) of a non-empty CPU integer tensor, read through NumPy (no dispatched op, nothing to wait
    for); None for device, fake or traced tensors, whose values must not be read in the training path
    (the trainer checks its labels on the host batch, `mip_dist.data.batch.check_batch`)."""
    if t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling() or is_fake(t):
        return None
    values = t.detach().numpy()
    return int(values.min()), int(values.max())


def _check_index_range(bank_index: torch.Tensor, entries: int) -> None:
    """bank_index values in [0, entries), where they can be read without a device sync."""
    lo_hi = host_range(bank_index)
    if lo_hi is None:
        return
    lo, hi = lo_hi
    if lo < 0 or hi >= entries:
        raise ValueError(f"bank_index values must be in [0, {entries}); got min {lo}, max {hi}")


def triton_unsupported(q: torch.Tensor) -> Optional[str]:
    """None if the Triton kernels support q's dtype, head dim and device now, else the reason."""
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float16, bfloat16, float32)"
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (the Triton kernels take {TRITON_HEAD_DIMS})"
    reason = triton_unavailable_reason(q.device)
    if reason is None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "bfloat16 on the CPU (Triton's interpreter computes bfloat16 dots wrongly; use float16 or float32)"
    return reason


def resolve_impl(impl: str, q: torch.Tensor) -> str:
    """'triton' or 'torch' for this call: auto = Triton on CUDA when supported; the interpreter (CPU) only when
    'triton' is asked for."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "torch":
        return "torch"
    # auto never picks the interpreter: on a CPU it is far slower than PyTorch. Deciding that first also
    # keeps an auto call on CPU tensors from importing the kernels, which would fix this process's
    # Triton mode (compiled or interpreted) from whatever TRITON_INTERPRET says at that moment.
    if impl == "auto" and q.device.type != "cuda":
        return "torch"
    reason = triton_unsupported(q)
    if impl == "triton":
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run here: {reason}; use impl='torch' or 'auto'")
        return "triton"
    if reason is None:
        return "triton"
    if reason not in _warned:  # falling back on a GPU is worth one warning
        _warned.add(reason)
        logger.warning("prompt_attention: Triton unsupported for %s; using the PyTorch path", reason)
    return "torch"


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
    """o = softmax(q [bank[bank_index] | inst | seq]^T * scale) [bank[bank_index] | inst | seq]: prompted attention.

    Shapes: q [Bq, H, N, D] with Bq = 1 or B; k, v [B, H, S, D] (the token sequence); bank_k, bank_v
    [M, H, Pm, D] (modality prompt bank; bank_index [B] int picks each sample's entry, optional
    when M = 1); inst_k, inst_v [B, H, Pi, D] (instance prompts); result [B, H, N, D]. Keys and
    values are the concatenation along the key axis, bank first; scale defaults to D ** -0.5.

    impl: "auto" (Triton on CUDA when dtype/head dim are supported, else PyTorch; never the interpreter),
    "triton" (forced, on a CPU through the interpreter under TRITON_INTERPRET=1; ValueError if it cannot
    run), "torch".
    deterministic: Triton backward without atomics, bit-identical run to run.
    """
    check_inputs(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number; got {scale!r}")
    if resolve_impl(impl, q) == "torch":
        return prompt_attention_torch(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale)
    return prompt_attention_triton(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v, scale, deterministic)


__all__ = [
    "prompt_attention",
    "prompt_attention_torch",
    "prompt_attention_triton",
    "prompt_attention_math",
    "check_inputs",
    "host_range",
    "resolve_impl",
    "triton_unsupported",
    "triton_available",
    "interpreter_requested",
    "IMPLS",
    "TRITON_HEAD_DIMS",
]
