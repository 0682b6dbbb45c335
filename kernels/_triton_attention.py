"""Triton kernels for prompt-concatenated attention: fused forward, FA2-style backward, host launchers.

This file imports only torch and triton and uses no relative imports: kernels/_backend.py loads it
twice (once compiled for the GPU, once under the Triton interpreter for CPU tensors), because
`@triton.jit` picks compiled vs interpreted when the decorator runs.

Key groups per sample b, head h (never concatenated in memory):
  bank  bank_k[bank_index[b], h, :Pm]   (modality prompts; read by pointer offset; with no
                                        bank_index a one-entry bank shared by all samples)
  inst  inst_k[b, h, :Pi]               (instance prompts)
  seq   k[b, h, :S]                     (the sequence)
The log-sum-exp is kept in base-2 units of the scaled scores (lse2 = m + log2(l)).

Backward (flash-attention-2 style, 3 launches): delta = rowsum(o * do); dq per query block over all
three groups; dk/dv per key block of any group over all queries. Bank gradients are summed over the
samples that read each entry with fp32 atomics, or (deterministic mode) written per sample and
reduced in a fixed order with torch; a batch-broadcast q gets its dq reduced the same two ways.
Prompt groups shorter than 16 use a 16-wide block (tl.dot's minimum) with the tail masked.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


# Only builtins of triton.language are called (tl.full, tl.reduce, ...), never its @jit helpers
# (tl.zeros, tl.max, tl.sum): those are compiled-or-interpreted according to TRITON_INTERPRET when
# `triton` was first imported, which would break the interpreted copy of this module otherwise.
# The combine functions are triton's own, so the interpreter takes its vectorised numpy path for
# them (it recognises them by identity); own fallbacks in case a triton release renames them.
@triton.jit
def _own_max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _own_add_combine(a, b):
    return a + b


_max_combine = getattr(tl.standard, "_elementwise_max", _own_max_combine)
_add_combine = getattr(tl.standard, "_sum_combine", _own_add_combine)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_group(acc, l_i, m_i, q, K, V, skn, skd, svn, svd, L, qk_scale,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Fold one key/value group of length L into the running online softmax (m_i, l_i, acc)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, L, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < L
        kt = tl.load(K + offs_d[:, None] * skd + cols[None, :] * skn, mask=col_ok[None, :], other=0.0)
        v = tl.load(V + cols[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _add_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, BK, BV, BIDX, IK, IV, O, LSE,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sbkm, sbkh, sbkn, sbkd, sbvm, sbvh, sbvn, sbvd,
                sikb, sikh, sikn, sikd, sivb, sivh, sivn, sivd,
                sob, soh, son, sod,
                H, N, S, PM, PI, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PM: tl.constexpr,
                BLOCK_PI: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BANK_SHARED: tl.constexpr):
    """One (query block, sample*head): online softmax over bank, instance prompts, sequence."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    if BANK_SHARED:  # one bank entry read by every sample: no index tensor
        entry = 0
    else:
        entry = tl.load(BIDX + b).to(tl.int64)
    acc, l_i, m_i = _fwd_group(acc, l_i, m_i, q, BK + entry * sbkm + h * sbkh, BV + entry * sbvm + h * sbvh,
                               sbkn, sbkd, sbvn, sbvd, PM, qk_scale, BLOCK_PM, BLOCK_D, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _fwd_group(acc, l_i, m_i, q, IK + b * sikb + h * sikh, IV + b * sivb + h * sivh,
                               sikn, sikd, sivn, sivd, PI, qk_scale, BLOCK_PI, BLOCK_D, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _fwd_group(acc, l_i, m_i, q, K + b * skb + h * skh, V + b * svb + h * svh,
                               skn, skd, svn, svd, S, qk_scale, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)

    l_safe = tl.where(row_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, N,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(o * do) in fp32, the softmax-backward correction term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, tl.reduce(o * do, 1, _add_combine), mask=row_ok)


@triton.jit
def _bwd_dq_group(dq, q, do, lse, delta, K, V, skn, skd, svn, svd, L, qk_scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Accumulate ds @ k over one key group into dq (unscaled)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, L, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < L
        kt = tl.load(K + offs_d[:, None] * skd + cols[None, :] * skn, mask=col_ok[None, :], other=0.0)
        vt = tl.load(V + offs_d[:, None] * svd + cols[None, :] * svn, mask=col_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, BK, BV, BIDX, IK, IV, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sbkm, sbkh, sbkn, sbkd, sbvm, sbvh, sbvn, sbvd,
                   sikb, sikh, sikn, sikd, sivb, sivh, sivn, sivd,
                   sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
                   H, N, S, PM, PI, qk_scale, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PM: tl.constexpr,
                   BLOCK_PI: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                   ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BANK_SHARED: tl.constexpr):
    """One (query block, sample*head): dq over all three key groups; atomically summed if ATOMIC."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod,
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    if BANK_SHARED:
        entry = 0
    else:
        entry = tl.load(BIDX + b).to(tl.int64)
    dq = _bwd_dq_group(dq, q, do, lse, delta, BK + entry * sbkm + h * sbkh, BV + entry * sbvm + h * sbvh,
                       sbkn, sbkd, sbvn, sbvd, PM, qk_scale, BLOCK_PM, BLOCK_D, UPCAST, DOT_PRECISION)
    dq = _bwd_dq_group(dq, q, do, lse, delta, IK + b * sikb + h * sikh, IV + b * sivb + h * sivh,
                       sikn, sikd, sivn, sivd, PI, qk_scale, BLOCK_PI, BLOCK_D, UPCAST, DOT_PRECISION)
    dq = _bwd_dq_group(dq, q, do, lse, delta, K + b * skb + h * skh, V + b * svb + h * svh,
                       skn, skd, svn, svd, S, qk_scale, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
    dq = dq * scale

    ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd
    if ATOMIC:
        tl.atomic_add(ptrs, dq, mask=row_ok[:, None])
    else:
        tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_kv_block(Q, DO, LSE, DELTA, sqn, sqd, sdon, sdod, K, V, skn, skd, svn, svd,
                  DK, DV, sdkn, sdkd, sdvn, sdvd, start_n, L, N, qk_scale, scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  UPCAST: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv of keys [start_n, start_n + BLOCK_N) of one group over all queries; stored or atomically added."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < L
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        qt = tl.load(Q + offs_d[:, None] * sqd + offs_m[None, :] * sqn, mask=row_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(row_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    dk = dk * scale
    ok = col_ok[:, None]
    pk = DK + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
    pv = DV + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd
    if ATOMIC:
        tl.atomic_add(pk, dk, mask=ok)
        tl.atomic_add(pv, dv, mask=ok)
    else:
        tl.store(pk, dk.to(DK.dtype.element_ty), mask=ok)
        tl.store(pv, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kv_kernel(Q, K, V, BK, BV, BIDX, IK, IV, DO, LSE, DELTA,
                   DK, DV, DBK, DBV, DIK, DIV,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sbkm, sbkh, sbkn, sbkd, sbvm, sbvh, sbvn, sbvd,
                   sikb, sikh, sikn, sikd, sivb, sivh, sivn, sivd,
                   sdob, sdoh, sdon, sdod,
                   sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                   sdbkb, sdbkh, sdbkn, sdbkd, sdbvb, sdbvh, sdbvn, sdbvd,
                   sdikb, sdikh, sdikn, sdikd, sdivb, sdivh, sdivn, sdivd,
                   H, N, S, PM, PI, NB_PM, NB_PI, qk_scale, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PM: tl.constexpr,
                   BLOCK_PI: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                   BANK_ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BANK_SHARED: tl.constexpr):
    """One (key block of bank | inst | seq, sample*head): dk, dv of that block.

    Bank gradients go to DBK/DBV indexed by bank entry (fp32 atomics, BANK_ATOMIC) or by sample
    (per-sample partials reduced later in a fixed order: the deterministic mode).
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Qb = Q + b * sqb + h * sqh
    DOb = DO + b * sdob + h * sdoh
    LSEb = LSE + pid_bh.to(tl.int64) * N
    DELTAb = DELTA + pid_bh.to(tl.int64) * N
    if pid < NB_PM:
        if BANK_SHARED:
            entry = 0
        else:
            entry = tl.load(BIDX + b).to(tl.int64)
        if BANK_ATOMIC:
            row = entry
        else:
            row = b
        _bwd_kv_block(Qb, DOb, LSEb, DELTAb, sqn, sqd, sdon, sdod,
                      BK + entry * sbkm + h * sbkh, BV + entry * sbvm + h * sbvh, sbkn, sbkd, sbvn, sbvd,
                      DBK + row * sdbkb + h * sdbkh, DBV + row * sdbvb + h * sdbvh, sdbkn, sdbkd, sdbvn, sdbvd,
                      pid * BLOCK_PM, PM, N, qk_scale, scale,
                      BLOCK_M, BLOCK_PM, BLOCK_D, UPCAST, BANK_ATOMIC, DOT_PRECISION)
    elif pid < NB_PM + NB_PI:
        _bwd_kv_block(Qb, DOb, LSEb, DELTAb, sqn, sqd, sdon, sdod,
                      IK + b * sikb + h * sikh, IV + b * sivb + h * sivh, sikn, sikd, sivn, sivd,
                      DIK + b * sdikb + h * sdikh, DIV + b * sdivb + h * sdivh, sdikn, sdikd, sdivn, sdivd,
                      (pid - NB_PM) * BLOCK_PI, PI, N, qk_scale, scale,
                      BLOCK_M, BLOCK_PI, BLOCK_D, UPCAST, False, DOT_PRECISION)
    else:
        _bwd_kv_block(Qb, DOb, LSEb, DELTAb, sqn, sqd, sdon, sdod,
                      K + b * skb + h * skh, V + b * svb + h * svh, skn, skd, svn, svd,
                      DK + b * sdkb + h * sdkh, DV + b * sdvb + h * sdvh, sdkn, sdkd, sdvn, sdvd,
                      (pid - NB_PM - NB_PI) * BLOCK_N, S, N, qk_scale, scale,
                      BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, False, DOT_PRECISION)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _pow2_block(length: int, cap: int) -> int:
    """Smallest power of two >= length, clamped to [MIN_BLOCK, cap]."""
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(length, 1))))


def _interpreting() -> bool:
    """True when this copy of the module was built under the Triton interpreter."""
    return not isinstance(_fwd_kernel, triton.runtime.jit.JITFunction)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, chosen so that none spills registers on
# sm_90 (checked with ptxas -v; 16-bit: fwd 168, dq 196, kv 212 registers at D=64).
_CONFIGS = {
    # (16-bit inputs, head dim > 64): {kernel: config}
    (True, False): {"fwd": (64, 64, 4, 3), "dq": (64, 64, 8, 2), "kv": (64, 64, 8, 2)},
    (True, True): {"fwd": (64, 64, 8, 2), "dq": (32, 32, 8, 2), "kv": (32, 32, 8, 2)},
    (False, False): {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 2), "kv": (64, 32, 8, 2)},
    (False, True): {"fwd": (32, 32, 8, 2), "dq": (32, 32, 8, 2), "kv": (32, 32, 8, 2)},
}


def _launch_params(kernel: str, q: torch.Tensor, n: int, s: int, pm: int, pi: int, d: int) -> dict:
    """Block sizes and compile options of `kernel` ('fwd', 'dq', 'kv') for these lengths."""
    block_m, block_n, warps, stages = _CONFIGS[(q.dtype != torch.float32, d > 64)][kernel]
    interp = _interpreting()
    params = dict(
        BLOCK_M=_pow2_block(n, block_m),
        BLOCK_N=_pow2_block(s, block_n),
        BLOCK_PM=_pow2_block(pm, block_n),
        BLOCK_PI=_pow2_block(pi, block_n),
        BLOCK_D=d,
        # the interpreter's bf16 dot is wrong: upcast operands to fp32 there
        UPCAST=bool(interp and q.dtype == torch.bfloat16),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if not interp:
        params["num_warps"] = warps
        params["num_stages"] = stages
    return params


def _strides(t: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    """The 4 strides of a [*, H, L, D] tensor (zeros for a missing group)."""
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _groups(q, k, bank_k, bank_v, bank_index, inst_k, inst_v):
    """Resolve optional groups to (pointer tensor, strides, length) with harmless placeholders."""
    B = k.shape[0]
    pm = bank_k.shape[2] if bank_k is not None else 0
    pi = inst_k.shape[2] if inst_k is not None else 0
    bk = bank_k if bank_k is not None else k
    bv = bank_v if bank_v is not None else k
    ik = inst_k if inst_k is not None else k
    iv = inst_v if inst_v is not None else k
    bidx = bank_index if bank_index is not None else bk  # never read when BANK_SHARED (no index: entry 0)
    return bk, bv, bidx, ik, iv, pm, pi


def _on_device(t: torch.Tensor):
    """Launch on t's GPU even when another device is current (Triton uses the current one)."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            bank_k: Optional[torch.Tensor], bank_v: Optional[torch.Tensor], bank_index: Optional[torch.Tensor],
            inst_k: Optional[torch.Tensor], inst_v: Optional[torch.Tensor],
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward; returns o [B, H, N, D] and lse2 [B, H, N] (fp32, base 2)."""
    B, H, S, D = k.shape
    N = q.shape[2]
    bk, bv, bidx, ik, iv, pm, pi = _groups(q, k, bank_k, bank_v, bank_index, inst_k, inst_v)
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return o, lse
    sq = list(q.stride())
    if q.shape[0] == 1:
        sq[0] = 0
    p = _launch_params("fwd", q, N, S, pm, pi, D)
    grid = (triton.cdiv(N, p["BLOCK_M"]), B * H)
    with _on_device(q):
        _fwd_kernel[grid](q, k, v, bk, bv, bidx, ik, iv, o, lse,
                          *sq, *k.stride(), *v.stride(), *_strides(bank_k), *_strides(bank_v),
                          *_strides(inst_k), *_strides(inst_v), *o.stride(),
                          H, N, S, pm, pi, scale * LOG2E, BANK_SHARED=bank_index is None, **p)
    return o, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             bank_k: Optional[torch.Tensor], bank_v: Optional[torch.Tensor], bank_index: Optional[torch.Tensor],
             inst_k: Optional[torch.Tensor], inst_v: Optional[torch.Tensor],
             o: torch.Tensor, lse: torch.Tensor, scale: float, deterministic: bool):
    """Launch the backward; returns dq, dk, dv, d_bank_k, d_bank_v, d_inst_k, d_inst_v (None if absent)."""
    B, H, S, D = k.shape
    N = q.shape[2]
    dev = q.device
    bk, bv, bidx, ik, iv, pm, pi = _groups(q, k, bank_k, bank_v, bank_index, inst_k, inst_v)
    broadcast_q = q.shape[0] == 1 and B > 1
    sq = list(q.stride())
    if q.shape[0] == 1:
        sq[0] = 0

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dik = torch.empty_like(inst_k, memory_format=torch.contiguous_format) if inst_k is not None else None
    div = torch.empty_like(inst_v, memory_format=torch.contiguous_format) if inst_v is not None else None
    M = bank_k.shape[0] if bank_k is not None else 0
    if bank_k is None:
        dbk_buf = dbv_buf = None
    elif deterministic:
        dbk_buf = torch.empty((B, H, pm, D), dtype=torch.float32, device=dev)
        dbv_buf = torch.empty((B, H, pm, D), dtype=torch.float32, device=dev)
    else:
        dbk_buf = torch.zeros((M, H, pm, D), dtype=torch.float32, device=dev)
        dbv_buf = torch.zeros((M, H, pm, D), dtype=torch.float32, device=dev)
    if not broadcast_q:
        dq_buf = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    elif deterministic:
        dq_buf = torch.empty((B, H, N, D), dtype=torch.float32, device=dev)
    else:
        dq_buf = torch.zeros((1, H, N, D), dtype=torch.float32, device=dev)

    if B * H * N == 0:
        for t in (dk, dv, dik, div, dbk_buf, dbv_buf, dq_buf):
            if t is not None:
                t.zero_()
    else:
        with _on_device(q):
            pq = _launch_params("dq", q, N, S, pm, pi, D)
            delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
            _bwd_delta_kernel[(triton.cdiv(N, pq["BLOCK_M"]), B * H)](
                o, do, delta, *o.stride(), *do.stride(), H, N, BLOCK_M=pq["BLOCK_M"], BLOCK_D=D)
            sdq = list(dq_buf.stride())
            if dq_buf.shape[0] == 1:
                sdq[0] = 0
            _bwd_dq_kernel[(triton.cdiv(N, pq["BLOCK_M"]), B * H)](
                q, k, v, bk, bv, bidx, ik, iv, do, lse, delta, dq_buf,
                *sq, *k.stride(), *v.stride(), *_strides(bank_k), *_strides(bank_v),
                *_strides(inst_k), *_strides(inst_v), *do.stride(), *sdq,
                H, N, S, pm, pi, scale * LOG2E, scale, ATOMIC=broadcast_q and not deterministic,
                BANK_SHARED=bank_index is None, **pq)
            pk = _launch_params("kv", q, N, S, pm, pi, D)
            nb_pm = triton.cdiv(pm, pk["BLOCK_PM"])
            nb_pi = triton.cdiv(pi, pk["BLOCK_PI"])
            nb_s = triton.cdiv(S, pk["BLOCK_N"])
            if nb_pm + nb_pi + nb_s > 0:
                _bwd_kv_kernel[(nb_pm + nb_pi + nb_s, B * H)](
                    q, k, v, bk, bv, bidx, ik, iv, do, lse, delta,
                    dk, dv, dbk_buf if dbk_buf is not None else dk, dbv_buf if dbv_buf is not None else dv,
                    dik if dik is not None else dk, div if div is not None else dv,
                    *sq, *k.stride(), *v.stride(), *_strides(bank_k), *_strides(bank_v),
                    *_strides(inst_k), *_strides(inst_v), *do.stride(),
                    *dk.stride(), *dv.stride(), *_strides(dbk_buf), *_strides(dbv_buf),
                    *_strides(dik), *_strides(div),
                    H, N, S, pm, pi, nb_pm, nb_pi, scale * LOG2E, scale,
                    BANK_ATOMIC=not deterministic, BANK_SHARED=bank_index is None, **pk)

    if broadcast_q:
        dq = (dq_buf.sum(0, keepdim=True) if deterministic else dq_buf).to(q.dtype)
    else:
        dq = dq_buf
    dbk = dbv = None
    if bank_k is not None:
        if deterministic and bank_index is None:  # the single entry: a fixed-order sum over samples
            dbk, dbv = dbk_buf.sum(0, keepdim=True), dbv_buf.sum(0, keepdim=True)
        elif deterministic:
            dbk = _reduce_by_entry(dbk_buf, bank_index, M)
            dbv = _reduce_by_entry(dbv_buf, bank_index, M)
        else:
            dbk, dbv = dbk_buf, dbv_buf
        dbk = dbk.to(bank_k.dtype)
        dbv = dbv.to(bank_v.dtype)
    return dq, dk, dv, dbk, dbv, dik, div


def _reduce_by_entry(partial: torch.Tensor, index: torch.Tensor, entries: int) -> torch.Tensor:
    """Sum per-sample partials [B, ...] into [entries, ...] in a fixed order (no atomics, no sync)."""
    out = []
    for m in range(entries):
        weight = (index == m).to(partial.dtype).view(-1, *([1] * (partial.dim() - 1)))
        out.append((partial * weight).sum(0))
    return torch.stack(out, 0)
