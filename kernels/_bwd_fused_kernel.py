"""One-pass Triton backward for short sequences (N <= 256): scores and dP computed once per key/query tile.

A persistent program owns whole (sample, head) tiles, so every gradient of a tile is written by one
CTA: per tile it (1) folds the delta pass in (delta = rowsum(o * do) into its own workspace row) and
zeroes its fp32 dq workspace, (2) walks key blocks of the virtual index [seq | bank | inst] (one
loop, as in the forward) and, for each, all query blocks: s = k q^T and dP = v do^T once, then
dv += P^T do, dk += dS^T q and dq += dS k (5 matmuls; the 3-launch backward runs 7), (3) scales and
writes dq. dq partials go to the program's workspace slot with relaxed fp32 atomics: only this CTA
touches the slot, each element is added by one thread in key-block order (so the sum is the same
every run), and the slot is reused by the program's next tile, so it stays in L2 instead of costing
HBM traffic per tile. Bank gradients: relaxed fp32 atomics per entry, or per-sample partials
(deterministic mode); a broadcast q's dq likewise.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._bwd_kernels import _kv_step
from ._fwd_kernels import _virtual_rows


@triton.jit
def _fused_prologue(O, DO, WDQ, WDELTA, son, sod, sdon, sdod, N,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(o * do) into the workspace, and the dq workspace zeroed, for one tile."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        o = tl.load(O + offs_m[:, None] * son + offs_d[None, :] * sod, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=row_ok[:, None], other=0.0)
        tl.store(WDELTA + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)
        tl.store(WDQ + offs_m[:, None] * BLOCK_D + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                 mask=row_ok[:, None])


@triton.jit
def _fused_key_block(Q, DO, LSE, WDQ, WDELTA, k, v, sqn, sqd, sdon, sdod, N, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """dk, dv (unscaled dk) of one loaded key block over all queries; dq partials added to the workspace."""
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        dk, dv, dst = _kv_step(dk, dv, k, v, Q, DO, LSE, WDELTA, sqn, sqd, sdon, sdod, offs_m, row_ok, qk_scale,
                               BLOCK_D, DOT_PRECISION)
        # padded key rows of k are zero and their dS^T is finite (_kv_step bounds P by 1), so they add 0 to dq
        dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION)
        tl.atomic_add(WDQ + offs_m[:, None] * BLOCK_D + offs_d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _fused_store_kv(dk, dv, j, S, PM, PI, DK, DV, DBK, DBV, DIK, DIV, sdkn, sdvn, sdbkn, sdbvn, sdikn, sdivn,
                    BLOCK_D: tl.constexpr, BANK_ATOMIC: tl.constexpr):
    """Scatter one virtual key block's dk/dv rows to the sequence, bank (fp32) and instance gradients.

    One pointer tile at a time, bank rows first (from the fp32 sums), so that the block's addresses
    do not all live in registers together."""
    offs_d = tl.arange(0, BLOCK_D)
    jb = j - S
    in_bank = ((jb >= 0) & (jb < PM))[:, None]
    if BANK_ATOMIC:
        tl.atomic_add(DBK + jb[:, None] * sdbkn + offs_d[None, :], dk, mask=in_bank, sem="relaxed")
        tl.atomic_add(DBV + jb[:, None] * sdbvn + offs_d[None, :], dv, mask=in_bank, sem="relaxed")
    else:
        tl.store(DBK + jb[:, None] * sdbkn + offs_d[None, :], dk, mask=in_bank)
        tl.store(DBV + jb[:, None] * sdbvn + offs_d[None, :], dv, mask=in_bank)
    plain = ((j < S + PM + PI) & ~((jb >= 0) & (jb < PM)))[:, None]
    dk = dk.to(DK.dtype.element_ty)
    dv = dv.to(DV.dtype.element_ty)
    tl.store(tl.where(j < S, DK + j * sdkn, DIK + (jb - PM) * sdikn)[:, None] + offs_d[None, :], dk, mask=plain)
    tl.store(tl.where(j < S, DV + j * sdvn, DIV + (jb - PM) * sdivn)[:, None] + offs_d[None, :], dv, mask=plain)


@triton.jit
def _bwd_fused_kernel(Q, K, V, BK, BV, BIDX, IK, IV, O, DO, LSE, DQ, DK, DV, DBK, DBV, DIK, DIV, WDQ, WDELTA,
                      sqb, sqh, sqn, sqd, skb, skh, skn, svb, svh, svn,
                      sbkm, sbkh, sbkn, sbvm, sbvh, sbvn, sikb, sikh, sikn, sivb, sivh, sivn,
                      sob, soh, son, sod, sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
                      sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sdbkb, sdbkh, sdbkn, sdbvb, sdbvh, sdbvn,
                      sdikb, sdikh, sdikn, sdivb, sdivh, sdivn,
                      H, N, S, PM, PI, TILES, qk_scale, scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, BANK_ATOMIC: tl.constexpr,
                      BANK_SHARED: tl.constexpr, ALIGNED: tl.constexpr):
    """Persistent program: every (sample, head) tile pid, pid + G, ... with workspace slot pid (G programs).

    Keys, values and their gradients have head-dim stride 1 (the host ensures it); ALIGNED (every row
    16-byte aligned) adds the hints that let the pointer-selected loads vectorise and pipeline."""
    pid = tl.program_id(0)
    wdq = WDQ + pid.to(tl.int64) * N * BLOCK_D
    wdelta = WDELTA + pid.to(tl.int64) * N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    total = S + PM + PI
    for tile in range(pid, TILES, tl.num_programs(0)):
        b = tl.cast(tile // H, tl.int64)
        h = tl.cast(tile % H, tl.int64)
        Qb = Q + b * sqb + h * sqh
        DOb = DO + b * sdob + h * sdoh
        LSEb = LSE + (b * H + h) * N
        _fused_prologue(O + b * sob + h * soh, DOb, wdq, wdelta, son, sod, sdon, sdod, N, BLOCK_M, BLOCK_D)
        tl.debug_barrier()  # the workspace writes above are read by other threads of this CTA below
        if BANK_SHARED:
            entry = 0
        else:
            entry = tl.load(BIDX + b).to(tl.int64)
        if BANK_ATOMIC:
            bank_row = entry
        else:
            bank_row = b
        for start_n in range(0, total, BLOCK_N):
            j = start_n + offs_n
            col_ok = j < total
            krow = _virtual_rows(j, S, PM, K + b * skb + h * skh, BK + entry * sbkm + h * sbkh,
                                 IK + b * sikb + h * sikh, skn, sbkn, sikn)
            vrow = _virtual_rows(j, S, PM, V + b * svb + h * svh, BV + entry * sbvm + h * sbvh,
                                 IV + b * sivb + h * sivh, svn, sbvn, sivn)
            kp = krow[:, None] + offs_d[None, :]
            vp = vrow[:, None] + offs_d[None, :]
            if ALIGNED:
                kp = tl.max_contiguous(tl.multiple_of(kp, [1, 16]), [1, BLOCK_D])
                vp = tl.max_contiguous(tl.multiple_of(vp, [1, 16]), [1, BLOCK_D])
            k = tl.load(kp, mask=col_ok[:, None], other=0.0)
            v = tl.load(vp, mask=col_ok[:, None], other=0.0)
            dk, dv = _fused_key_block(Qb, DOb, LSEb, wdq, wdelta, k, v, sqn, sqd, sdon, sdod, N, qk_scale,
                                      BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
            if start_n + BLOCK_N <= S:  # a block of sequence keys only: one destination
                tl.store(DK + b * sdkb + h * sdkh + j[:, None] * sdkn + offs_d[None, :],
                         (dk * scale).to(DK.dtype.element_ty))
                tl.store(DV + b * sdvb + h * sdvh + j[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty))
            else:
                _fused_store_kv(dk * scale, dv, j, S, PM, PI, DK + b * sdkb + h * sdkh,
                                DV + b * sdvb + h * sdvh,
                                DBK + bank_row * sdbkb + h * sdbkh, DBV + bank_row * sdbvb + h * sdbvh,
                                DIK + b * sdikb + h * sdikh, DIV + b * sdivb + h * sdivh,
                                sdkn, sdvn, sdbkn, sdbvn, sdikn, sdivn, BLOCK_D, BANK_ATOMIC)
        tl.debug_barrier()  # every dq partial of the tile is in the workspace
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            # .cg: read the atomics' result from L2, not a line this CTA cached in L1 for an earlier tile
            dq = tl.load(wdq + offs_m[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None], other=0.0,
                         cache_modifier=".cg") * scale
            pq = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd
            if ATOMIC_DQ:  # a broadcast q: every sample adds into the one fp32 dq
                tl.atomic_add(pq, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.store(pq, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
        tl.debug_barrier()  # the next tile's prologue overwrites the workspace slot
