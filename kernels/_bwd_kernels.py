"""Triton backward of prompt attention for long queries (N > 256): delta, dq, and dk/dv launches.

Flash-attention-2 style: delta = rowsum(o * do); dq per query block over all three key groups (one
key loop when aligned); dk/dv per key block of any group over all queries. Bank gradients are summed
over the samples that read each entry with relaxed fp32 atomics (REDG, no fence), or (deterministic
mode) written per sample and reduced in a fixed order on the host; a batch-broadcast q gets its dq
reduced the same two ways. Short sequences take the one-pass kernel in _bwd_fused_kernel.py instead.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._fwd_kernels import _grid_tile, _virtual_rows


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, N,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(o * do) in fp32, the softmax-backward correction term."""
    pid_m, pid_bh = _grid_tile(tl.cdiv(N, BLOCK_M))
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dq_step(dq, q, do, lse, delta, kt, vt, col_ok, qk_scale, DOT_PRECISION: tl.constexpr):
    """Add ds @ k of one loaded key tile kt [D, N] / value tile vt [D, N] to dq (unscaled)."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    p = tl.where(col_ok[None, :], p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_group(dq, q, do, lse, delta, K, V, skn, skd, svn, svd, L, qk_scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Accumulate ds @ k over one key group into dq (unscaled)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, L, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < L
        kt = tl.load(K + offs_d[:, None] * skd + cols[None, :] * skn, mask=col_ok[None, :], other=0.0)
        vt = tl.load(V + offs_d[:, None] * svd + cols[None, :] * svn, mask=col_ok[None, :], other=0.0)
        dq = _dq_step(dq, q, do, lse, delta, kt, vt, col_ok, qk_scale, DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_one_loop(dq, q, do, lse, delta, K, V, BK, BV, IK, IV, skn, svn, sbkn, sbvn, sikn, sivn, skd, svd,
                     S, PM, PI, qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """dq over virtual keys [seq | bank | inst] in one software pipeline (the forward's one loop)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    total = S + PM + PI
    for start in range(0, total, BLOCK_N):
        j = start + offs_n
        col_ok = j < total
        kcol = _virtual_rows(j, S, PM, K, BK, IK, skn, sbkn, sikn)
        vcol = _virtual_rows(j, S, PM, V, BV, IV, svn, sbvn, sivn)
        kp = tl.max_contiguous(tl.multiple_of(kcol[None, :] + offs_d[:, None] * skd, [16, 1]), [BLOCK_D, 1])
        vp = tl.max_contiguous(tl.multiple_of(vcol[None, :] + offs_d[:, None] * svd, [16, 1]), [BLOCK_D, 1])
        kt = tl.load(kp, mask=col_ok[None, :], other=0.0)
        vt = tl.load(vp, mask=col_ok[None, :], other=0.0)
        dq = _dq_step(dq, q, do, lse, delta, kt, vt, col_ok, qk_scale, DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, BK, BV, BIDX, IK, IV, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sbkm, sbkh, sbkn, sbkd, sbvm, sbvh, sbvn, sbvd,
                   sikb, sikh, sikn, sikd, sivb, sivh, sivn, sivd,
                   sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
                   H, N, S, PM, PI, qk_scale, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PM: tl.constexpr,
                   BLOCK_PI: tl.constexpr, BLOCK_D: tl.constexpr,
                   ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BANK_SHARED: tl.constexpr,
                   ONE_LOOP: tl.constexpr):
    """One (query block, sample*head): dq over all three key groups (one loop if ONE_LOOP); atomic if ATOMIC."""
    pid_m, pid_bh = _grid_tile(tl.cdiv(N, BLOCK_M))
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if BANK_SHARED:
        entry = 0
    else:
        entry = tl.load(BIDX + b).to(tl.int64)
    if ONE_LOOP:
        dq = _bwd_dq_one_loop(dq, q, do, lse, delta, K + b * skb + h * skh, V + b * svb + h * svh,
                              BK + entry * sbkm + h * sbkh, BV + entry * sbvm + h * sbvh,
                              IK + b * sikb + h * sikh, IV + b * sivb + h * sivh,
                              skn, svn, sbkn, sbvn, sikn, sivn, skd, svd, S, PM, PI, qk_scale,
                              BLOCK_N, BLOCK_D, DOT_PRECISION)
    else:
        dq = _bwd_dq_group(dq, q, do, lse, delta, BK + entry * sbkm + h * sbkh, BV + entry * sbvm + h * sbvh,
                           sbkn, sbkd, sbvn, sbvd, PM, qk_scale, BLOCK_PM, BLOCK_D, DOT_PRECISION)
        dq = _bwd_dq_group(dq, q, do, lse, delta, IK + b * sikb + h * sikh, IV + b * sivb + h * sivh,
                           sikn, sikd, sivn, sivd, PI, qk_scale, BLOCK_PI, BLOCK_D, DOT_PRECISION)
        dq = _bwd_dq_group(dq, q, do, lse, delta, K + b * skb + h * skh, V + b * svb + h * svh,
                           skn, skd, svn, svd, S, qk_scale, BLOCK_N, BLOCK_D, DOT_PRECISION)
    dq = dq * scale

    ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd
    if ATOMIC:
        tl.atomic_add(ptrs, dq, mask=row_ok[:, None], sem="relaxed")  # a plain reduction, no fence
    else:
        tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, sqn, sqd, sdon, sdod, offs_m, row_ok, qk_scale,
             BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one query block's P^T do to dv and dS^T q to dk (unscaled) for a loaded key tile k / value tile v
    [N, D]; also returns dS^T (q's dtype), which the one-pass backward turns into dq.

    P = exp2(s - lse) <= 1 for every real key (lse is the row's log-sum-exp), so its exponent is clamped
    at 0: a padded key row (k = 0, score 0) would otherwise give exp2(-lse), inf once all of a query's
    scores lie below about -88, and the one-pass backward's dq would get inf * 0 = NaN from its zero k.
    With P finite there, the padded rows add exactly 0 to dq and their dk/dv rows are never stored.
    (Masking P by key validity instead costs the paper one-pass kernel 183 -> 254 registers on sm_90.)"""
    offs_d = tl.arange(0, BLOCK_D)
    qt = tl.load(Q + offs_d[:, None] * sqd + offs_m[None, :] * sqn, mask=row_ok[None, :], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    pt = tl.math.exp2(tl.minimum(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse[None, :], 0.0))
    pt = tl.where(row_ok[None, :], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
    dk += tl.dot(dst, tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv, dst


@triton.jit
def _bwd_kv_block(Q, DO, LSE, DELTA, sqn, sqd, sdon, sdod, K, V, skn, skd, svn, svd,
                  DK, DV, sdkn, sdkd, sdvn, sdvd, start_n, L, N, qk_scale, scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv of keys [start_n, start_n + BLOCK_N) of one group over all queries; stored or atomically added."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < L
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        dk, dv, _ = _kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, sqn, sqd, sdon, sdod, offs_m, offs_m < N, qk_scale,
                             BLOCK_D, DOT_PRECISION)
    dk = dk * scale
    ok = col_ok[:, None]
    pk = DK + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
    pv = DV + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd
    if ATOMIC:
        # relaxed: a plain reduction (RED, no fence); nothing reads these sums before the kernel ends
        tl.atomic_add(pk, dk, mask=ok, sem="relaxed")
        tl.atomic_add(pv, dv, mask=ok, sem="relaxed")
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
                   BLOCK_PI: tl.constexpr, BLOCK_D: tl.constexpr,
                   BANK_ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BANK_SHARED: tl.constexpr):
    """One (key block of bank | inst | seq, sample*head): dk, dv of that block.

    Bank gradients go to DBK/DBV indexed by bank entry (fp32 atomics, BANK_ATOMIC) or by sample
    (per-sample partials reduced later in a fixed order: the deterministic mode).
    """
    pid, pid_bh = _grid_tile(NB_PM + NB_PI + tl.cdiv(S, BLOCK_N))
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
                      BLOCK_M, BLOCK_PM, BLOCK_D, BANK_ATOMIC, DOT_PRECISION)
    elif pid < NB_PM + NB_PI:
        _bwd_kv_block(Qb, DOb, LSEb, DELTAb, sqn, sqd, sdon, sdod,
                      IK + b * sikb + h * sikh, IV + b * sivb + h * sivh, sikn, sikd, sivn, sivd,
                      DIK + b * sdikb + h * sdikh, DIV + b * sdivb + h * sdivh, sdikn, sdikd, sdivn, sdivd,
                      (pid - NB_PM) * BLOCK_PI, PI, N, qk_scale, scale,
                      BLOCK_M, BLOCK_PI, BLOCK_D, False, DOT_PRECISION)
    else:
        _bwd_kv_block(Qb, DOb, LSEb, DELTAb, sqn, sqd, sdon, sdod,
                      K + b * skb + h * skh, V + b * svb + h * svh, skn, skd, svn, svd,
                      DK + b * sdkb + h * sdkh, DV + b * sdvb + h * sdvh, sdkn, sdkd, sdvn, sdvd,
                      (pid - NB_PM - NB_PI) * BLOCK_N, S, N, qk_scale, scale,
                      BLOCK_M, BLOCK_N, BLOCK_D, False, DOT_PRECISION)
