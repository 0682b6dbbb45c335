"""Triton forward of prompt-concatenated attention: one online softmax over [seq | bank | inst] keys.

Key groups per sample b, head h (never concatenated in memory):
  bank  bank_k[bank_index[b], h, :Pm]   (modality prompts; read by pointer offset; with no
                                        bank_index a one-entry bank shared by all samples)
  inst  inst_k[b, h, :Pi]               (instance prompts)
  seq   k[b, h, :S]                     (the sequence)
The log-sum-exp is kept in base-2 units of the scaled scores (lse2 = m + log2(l)). The key loop walks
one virtual key index over [seq | bank | inst] (the prompts packed after the last sequence key) when
every key/value row is 16-byte aligned; otherwise each group has its own loop.
Whether this runs compiled or interpreted is Triton's choice at import (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _grid_tile(blocks):
    """(block, sample*head) of this program: the host puts both on grid axis x (B*H passes CUDA's 65,535
    limit of axes y and z), a tile's `blocks` programs adjacent so they run together as on a 2-D grid."""
    pid = tl.program_id(0)
    return pid % blocks, pid // blocks


@triton.jit
def _softmax_step(acc, l_i, m_i, q, kt, v, col_ok, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one loaded key tile kt [D, N] / value tile v [N, D] into the running online softmax."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_group(acc, l_i, m_i, q, K, V, skn, skd, svn, svd, L, qk_scale,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Fold one key/value group of length L into the running online softmax (m_i, l_i, acc)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, L, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < L
        kt = tl.load(K + offs_d[:, None] * skd + cols[None, :] * skn, mask=col_ok[None, :], other=0.0)
        v = tl.load(V + cols[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kt, v, col_ok, qk_scale, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _virtual_rows(j, S, PM, X, BX, IX, sxn, sbxn, sixn):
    """Row pointers of virtual keys j over [seq | bank | inst] in one tensor family (keys or values)."""
    jb = j - S
    return tl.where(j < S, X + j * sxn, tl.where(jb < PM, BX + jb * sbxn, IX + (jb - PM) * sixn))


@triton.jit
def _fwd_one_loop(acc, l_i, m_i, q, K, V, BK, BV, IK, IV, skn, svn, sbkn, sbvn, sikn, sivn, skd, svd,
                  S, PM, PI, qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One software pipeline over virtual keys [seq | bank | inst]: the prompts fill the last partial block."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    total = S + PM + PI
    for start in range(0, total, BLOCK_N):
        j = start + offs_n
        col_ok = j < total
        kcol = _virtual_rows(j, S, PM, K, BK, IK, skn, sbkn, sikn)
        vcol = _virtual_rows(j, S, PM, V, BV, IV, svn, sbvn, sivn)
        # the pointer select hides alignment from Triton's analysis; without these hints the loads are
        # not pipelined (no cp.async). The host sets ONE_LOOP only when they hold (_one_loop_ok).
        kp = tl.max_contiguous(tl.multiple_of(kcol[None, :] + offs_d[:, None] * skd, [16, 1]), [BLOCK_D, 1])
        vp = tl.max_contiguous(tl.multiple_of(vcol[:, None] + offs_d[None, :] * svd, [1, 16]), [1, BLOCK_D])
        kt = tl.load(kp, mask=col_ok[None, :], other=0.0)
        v = tl.load(vp, mask=col_ok[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kt, v, col_ok, qk_scale, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, BK, BV, BIDX, IK, IV, O, LSE,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sbkm, sbkh, sbkn, sbkd, sbvm, sbvh, sbvn, sbvd,
                sikb, sikh, sikn, sikd, sivb, sivh, sivn, sivd,
                sob, soh, son, sod,
                H, N, S, PM, PI, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PM: tl.constexpr,
                BLOCK_PI: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BANK_SHARED: tl.constexpr, ONE_LOOP: tl.constexpr):
    """One (query block, sample*head): online softmax over bank, instance prompts, sequence.

    ONE_LOOP (every key/value row 16-byte aligned, head-dim stride 1): one key loop over
    [seq | bank | inst], the prompts packed after the last sequence key (243 keys in 256 columns at
    N 211 instead of 16 + 16 + 256); otherwise one loop per group, each with its own block width."""
    pid_m, pid_bh = _grid_tile(tl.cdiv(N, BLOCK_M))
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if BANK_SHARED:  # one bank entry read by every sample: no index tensor
        entry = 0
    else:
        entry = tl.load(BIDX + b).to(tl.int64)
    if ONE_LOOP:
        acc, l_i, m_i = _fwd_one_loop(acc, l_i, m_i, q, K + b * skb + h * skh, V + b * svb + h * svh,
                                      BK + entry * sbkm + h * sbkh, BV + entry * sbvm + h * sbvh,
                                      IK + b * sikb + h * sikh, IV + b * sivb + h * sivh,
                                      skn, svn, sbkn, sbvn, sikn, sivn, skd, svd, S, PM, PI, qk_scale,
                                      BLOCK_N, BLOCK_D, DOT_PRECISION)
    else:
        acc, l_i, m_i = _fwd_group(acc, l_i, m_i, q, BK + entry * sbkm + h * sbkh, BV + entry * sbvm + h * sbvh,
                                   sbkn, sbkd, sbvn, sbvd, PM, qk_scale, BLOCK_PM, BLOCK_D,
                                   DOT_PRECISION)
        acc, l_i, m_i = _fwd_group(acc, l_i, m_i, q, IK + b * sikb + h * sikh, IV + b * sivb + h * sivh,
                                   sikn, sikd, sivn, sivd, PI, qk_scale, BLOCK_PI, BLOCK_D,
                                   DOT_PRECISION)
        acc, l_i, m_i = _fwd_group(acc, l_i, m_i, q, K + b * skb + h * skh, V + b * svb + h * svh,
                                   skn, skd, svn, svd, S, qk_scale, BLOCK_N, BLOCK_D, DOT_PRECISION)

    l_safe = tl.where(row_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)
