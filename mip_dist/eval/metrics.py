"""Vectorised CMC / mAP / mINP exactly as the VI-ReID community reference code computes them.

The reference is the `eval_metrics.py` of mangye16/Cross-Modal-Re-ID-baseline (copied by AGW, DDAG,
CAJ, PMT, DEEN, ...): `eval_sysu`, `eval_regdb` and `eval_llcm`. For every query it ranks the gallery
by ascending distance, drops the gallery entries a rule removes, and then computes

- CMC. `sysu` and `llcm`: the kept ranked list is reduced to its unique identities in order of first
  appearance (`np.unique(..., return_index=True)` then sorted indices); CMC@k = 1 if the query id is
  among the first k of them. `regdb` / `plain`: the usual CMC on the kept ranked list.
- AP: mean of precision@i over the positions i of the true matches in the kept list.
- INP: (number of true matches) / (1-based kept position of the last true match).

Removal rules: `sysu` removes every cam2 gallery entry for a cam3 query (cam3 and cam2 share a
room); `llcm` removes gallery entries with the query's identity AND camera; `regdb` and `plain`
remove nothing (the reference `eval_regdb` builds fake camera ids that never coincide).

Queries with no true match left after removal are skipped in every denominator (the reference
appends zeros to its CMC list for them but divides by the number of valid queries: same result).

Two deliberate, documented differences from the reference loops:

- Ties. The reference uses `np.argsort` (quicksort, not stable), so equal distances are ordered
  arbitrarily. We sort with a *stable* sort: equal distances keep ascending gallery-index order,
  i.e. the result equals the reference loop run with `np.argsort(distmat, axis=1, kind="stable")`.
  Without exact ties (real float features) the two orders are identical.
- Short galleries. The reference shrinks `max_rank` to the gallery size (and its unique-identity
  CMC breaks when fewer than `max_rank` identities remain); we always return `max_rank` values,
  extending a curve past its end with its last value (a found match stays found).

Everything runs as batched tensor ops in torch (CPU or GPU, on the distance matrix's device),
chunked over queries to bound memory; there is no per-query Python loop.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, list]

PROTOCOLS = ("sysu", "regdb", "llcm", "plain")
_UNIQUE_ID_CMC = {"sysu", "llcm"}
_COMPARE_MAX = 24  # up to this many true matches per query, count by compares instead of searchsorted
_CHUNK_ELEMENTS = 1 << 22  # ranked-list entries per chunk (~4M, a few hundred MB of temporaries)


def _as_tensor(x: ArrayLike, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """numpy / list / tensor -> tensor on `device` (no copy when already there)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def _check_inputs(distmat: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor,
                  q_cams: Optional[torch.Tensor], g_cams: Optional[torch.Tensor], protocol: str,
                  max_rank: int) -> None:
    """Shapes and protocol checked up front, with messages naming the bad argument."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is unknown; expected one of {', '.join(PROTOCOLS)}")
    if distmat.dim() != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(distmat.shape)}")
    nq, ng = distmat.shape
    if nq == 0 or ng == 0:
        raise ValueError(f"distmat is empty (shape {tuple(distmat.shape)})")
    if q_pids.shape != (nq,):
        raise ValueError(f"q_pids has shape {tuple(q_pids.shape)}; expected ({nq},) to match distmat")
    if g_pids.shape != (ng,):
        raise ValueError(f"g_pids has shape {tuple(g_pids.shape)}; expected ({ng},) to match distmat")
    if protocol in ("sysu", "llcm"):
        if q_cams is None or g_cams is None:
            raise ValueError(f"protocol={protocol!r} needs q_cams and g_cams (its removal rule uses cameras)")
    if q_cams is not None and q_cams.shape != (nq,):
        raise ValueError(f"q_cams has shape {tuple(q_cams.shape)}; expected ({nq},)")
    if g_cams is not None and g_cams.shape != (ng,):
        raise ValueError(f"g_cams has shape {tuple(g_cams.shape)}; expected ({ng},)")
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank} must be >= 1")


def _keep_mask(protocol: str, q_pid: torch.Tensor, q_cam: Optional[torch.Tensor],
               g_pids: torch.Tensor, g_cams: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[C, G] bool in gallery order: entries that survive the protocol's removal rule (None = all)."""
    if protocol == "sysu":
        return ~((q_cam == 3).unsqueeze(1) & (g_cams == 2).unsqueeze(0))
    if protocol == "llcm":
        return ~((g_pids.unsqueeze(0) == q_pid.unsqueeze(1)) & (g_cams.unsqueeze(0) == q_cam.unsqueeze(1)))
    return None


def _ordered_keys(dist: torch.Tensor) -> torch.Tensor:
    """float32 [C, G] -> int64 keys, strictly increasing in (distance, gallery index): stable order."""
    d = dist + 0.0  # -0.0 -> +0.0, so that signed zeros tie like the float comparison says
    bits = d.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE-754 total order as signed int32
    index = torch.arange(dist.shape[1], device=dist.device, dtype=torch.int32).expand_as(ordered)
    if sys.byteorder == "little":  # (high word = ordered, low word = index) in one copy
        return torch.stack([index, ordered], dim=-1).view(torch.int64).squeeze(-1)
    return (ordered.to(torch.int64) << 32) | index.to(torch.int64)


def _count_preceding(keys: torch.Tensor, pos_keys: torch.Tensor) -> torch.Tensor:
    """[C, G]: how many of each row's sorted true-match keys are smaller than each entry's key."""
    p = pos_keys.shape[1]
    if p > _COMPARE_MAX:
        return torch.searchsorted(pos_keys, keys)
    bucket = torch.zeros(keys.shape, dtype=torch.uint8, device=keys.device)
    for k in range(p):  # a few compares beat a batched binary search on short rows
        bucket += keys > pos_keys[:, k:k + 1]
    return bucket.long()


def _distinct_before(labels: torch.Tensor, before: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[C] number of distinct gallery identities among the entries flagged in `before` [C, G]."""
    seen = torch.zeros(before.shape[0], num_labels, dtype=torch.uint8, device=before.device)
    seen.scatter_reduce_(1, labels.expand_as(before), before.view(torch.uint8), reduce="amax")
    return seen.sum(dim=1, dtype=torch.int64)


def _chunk_stats_sorted(dist: torch.Tensor, q_pid: torch.Tensor, q_cam: Optional[torch.Tensor],
                        ctx: "_Gallery", protocol: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query of a chunk: (valid, CMC rank, AP, INP) from a full stable sort of each row.

    The general path (float64 or other distances); mirrors the reference loop step by step.
    """
    c, g = dist.shape
    order = torch.sort(dist, dim=1, stable=True).indices  # ties: ascending gallery index
    keep = _keep_mask(protocol, q_pid, q_cam, ctx.pids, ctx.cams)
    match = ctx.pids.unsqueeze(0) == q_pid.unsqueeze(1)
    if keep is not None:
        match &= keep
        keep = keep.gather(1, order)
        kept_pos = torch.cumsum(keep, dim=1)  # 1-based position in the kept list (where kept)
    else:
        kept_pos = torch.arange(1, g + 1, device=dist.device).expand(c, g)
    match = match.gather(1, order)
    num_rel = match.sum(dim=1)
    valid = num_rel > 0

    hits = torch.cumsum(match, dim=1).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=dist.device)
    ap = torch.where(match, hits / kept_pos.to(torch.float64), zero).sum(dim=1)
    ap = ap / num_rel.to(torch.float64).clamp_min(1.0)
    big = torch.full((), g + 1, dtype=kept_pos.dtype, device=dist.device)
    last_pos = torch.where(match, kept_pos, torch.zeros_like(big)).amax(dim=1)
    inp = num_rel.to(torch.float64) / last_pos.to(torch.float64).clamp_min(1.0)
    first_pos = torch.where(match, kept_pos, big).amin(dim=1)  # kept position of the first match
    if protocol in _UNIQUE_ID_CMC:
        # Unique-identity rank = 1 + distinct identities kept strictly before the first match (the
        # first match is the query identity's own first appearance).
        before = kept_pos < first_pos.unsqueeze(1)
        if keep is not None:
            before &= keep
        cmc_rank = _distinct_before(ctx.labels[order], before, ctx.num_labels) + 1
    else:
        cmc_rank = first_pos
    return valid, cmc_rank, ap, inp


def _chunk_stats_keys(dist: torch.Tensor, q_pid: torch.Tensor, q_cam: Optional[torch.Tensor],
                      ctx: "_Gallery", protocol: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query of a chunk: (valid, CMC rank, AP, INP) without sorting the gallery (float32 path).

    Each distance becomes a unique int64 key ordered like the stable sort. Only a query's own true
    matches are sorted (a handful); every gallery entry is then bucketed by how many true matches
    precede it (compares, or `searchsorted` for many matches), and a per-bucket count gives the kept
    rank of every true match.
    Linear in the gallery size instead of G log G; identical results to the sorted path.
    """
    c, g = dist.shape
    keys = _ordered_keys(dist)
    keep = _keep_mask(protocol, q_pid, q_cam, ctx.pids, ctx.cams)
    # candidate true matches of each query: the gallery entries of its identity (padded table)
    pos = torch.searchsorted(ctx.unique_pids, q_pid).clamp(max=ctx.num_labels - 1)
    has_id = ctx.unique_pids[pos] == q_pid
    cand = ctx.table[pos]  # [C, Pmax], padded with g
    cand_ok = (cand < g) & has_id.unsqueeze(1)
    cand = cand.clamp(max=g - 1)
    if keep is not None:
        cand_ok &= keep.gather(1, cand)
    int64_max = torch.iinfo(torch.int64).max
    pos_keys = torch.where(cand_ok, keys.gather(1, cand), torch.full((), int64_max, device=dist.device))
    pos_keys = torch.sort(pos_keys, dim=1).values  # keys are unique: plain sort is deterministic
    num_rel = cand_ok.sum(dim=1)
    valid = num_rel > 0

    bucket = _count_preceding(keys, pos_keys)  # true matches strictly before each entry
    p = pos_keys.shape[1]
    counts = torch.zeros(c, p + 1, dtype=torch.int32, device=dist.device)
    counts.scatter_add_(1, bucket, keep.to(torch.int32) if keep is not None
                        else torch.ones((), dtype=torch.int32, device=dist.device).expand(c, g))
    kept_rank = torch.cumsum(counts, dim=1, dtype=torch.int64)[:, :p]  # kept rank of the k-th true match
    k = torch.arange(1, p + 1, device=dist.device, dtype=torch.float64)
    is_rel = k.unsqueeze(0) <= num_rel.unsqueeze(1).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=dist.device)
    ap = torch.where(is_rel, k / kept_rank.to(torch.float64).clamp_min(1.0), zero).sum(dim=1)
    ap = ap / num_rel.to(torch.float64).clamp_min(1.0)
    last = kept_rank.gather(1, (num_rel - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    inp = num_rel.to(torch.float64) / last.to(torch.float64).clamp_min(1.0)
    first = kept_rank[:, 0]
    if protocol in _UNIQUE_ID_CMC:
        # bucket 0 = at or before the first true match, which is itself kept and carries the
        # query identity: the distinct count already includes it (no +1 here).
        upto_first = bucket == 0
        if keep is not None:
            upto_first &= keep
        cmc_rank = _distinct_before(ctx.labels.unsqueeze(0), upto_first, ctx.num_labels)
    else:
        cmc_rank = first
    return valid, cmc_rank, ap, inp


class _Gallery:
    """Per-call gallery tables: pids, cameras, identity labels and each identity's gallery entries."""

    def __init__(self, pids: torch.Tensor, cams: Optional[torch.Tensor]):
        self.pids = pids
        self.cams = cams
        self.unique_pids, self.labels = torch.unique(pids, return_inverse=True)
        self.num_labels = int(self.unique_pids.numel())
        counts = torch.bincount(self.labels, minlength=self.num_labels)
        p_max = int(counts.max().item())
        order = torch.sort(self.labels, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(pids.numel(), device=pids.device) - starts[self.labels[order]]
        self.table = torch.full((self.num_labels, p_max), pids.numel(), dtype=torch.int64, device=pids.device)
        self.table[self.labels[order], slot] = order
        self.max_per_id = p_max


def rank_metrics(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike,
                 q_cams: Optional[ArrayLike] = None, g_cams: Optional[ArrayLike] = None,
                 protocol: str = "sysu", max_rank: int = 20,
                 chunk_elements: int = _CHUNK_ELEMENTS) -> dict:
    """CMC[max_rank], mAP and mINP (fractions in [0, 1]) as the reference `eval_<protocol>` computes them.

    distmat: [num_query, num_gallery], smaller = more similar; numpy or torch (computation runs on
    its device). Cameras are the datasets' 1-based camera numbers. protocol: "sysu" (cam3 -> cam2
    removal, unique-identity CMC), "llcm" (same id and camera removal, unique-identity CMC),
    "regdb" or "plain" (no removal, plain CMC). Returns {"cmc": np.ndarray[max_rank] float64,
    "mAP": float, "mINP": float, "num_valid_queries": int}. Raises ValueError when no query has a
    true match in the gallery (the reference asserts the same).
    """
    dist = distmat if isinstance(distmat, torch.Tensor) else torch.as_tensor(np.asarray(distmat))
    device = dist.device
    if not (dist.is_floating_point()):
        dist = dist.to(torch.float64)
    qp = _as_tensor(q_pids, device, torch.int64)
    gp = _as_tensor(g_pids, device, torch.int64)
    qc = _as_tensor(q_cams, device, torch.int64) if q_cams is not None else None
    gc = _as_tensor(g_cams, device, torch.int64) if g_cams is not None else None
    _check_inputs(dist, qp, gp, qc, gc, protocol, max_rank)

    if not bool(torch.isfinite(dist).all()):
        raise ValueError("distmat contains NaN or infinite values")
    nq, ng = dist.shape
    ctx = _Gallery(gp, gc)
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()  # exact
    fast = dist.dtype == torch.float32
    chunk_fn = _chunk_stats_keys if fast else _chunk_stats_sorted
    per_query = ng + (ctx.num_labels if protocol in _UNIQUE_ID_CMC else 0) + (ctx.max_per_id if fast else 0)
    chunk = max(1, chunk_elements // per_query)

    hist = torch.zeros(max_rank + 1, dtype=torch.float64, device=device)  # hist[r-1]: CMC rank r
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_valid = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        valid, cmc_rank, ap, inp = chunk_fn(
            dist[start:stop], qp[start:stop], qc[start:stop] if qc is not None else None, ctx, protocol)
        ranks = cmc_rank[valid].clamp(max=max_rank + 1) - 1
        hist += torch.bincount(ranks, minlength=max_rank + 1)[: max_rank + 1].to(torch.float64)
        ap_sum += ap[valid].sum()
        inp_sum += inp[valid].sum()
        num_valid += valid.sum()

    n_valid = int(num_valid.item())
    if n_valid == 0:
        raise ValueError("no query has a true match in the gallery after the removal rule "
                         f"(protocol={protocol!r}, {nq} queries, {ng} gallery entries)")
    cmc = (torch.cumsum(hist[:max_rank], dim=0) / n_valid).cpu().numpy()
    if nq - n_valid:
        log.debug("rank_metrics: %d of %d queries have no true match and are skipped", nq - n_valid, nq)
    return {"cmc": cmc, "mAP": float(ap_sum.item()) / n_valid, "mINP": float(inp_sum.item()) / n_valid,
            "num_valid_queries": n_valid}


def pairwise_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity -<q, g> of L2-normalised features [Q, G] (smaller = more similar).

    Like the reference (`eval_sysu(-distmat, ...)` on `distmat = q @ g.T`): negation is exact, so no
    rounding ties are introduced (1 - <q, g> could merge distinct similarities). For unit vectors
    this ranks exactly like the Euclidean distance, up to float rounding.
    """
    q = torch.nn.functional.normalize(query.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.float(), dim=1)
    return -(q @ g.t())
