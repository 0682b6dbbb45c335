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

How it is computed (no per-query Python loop; chunked over queries to bound memory; on the
distance matrix's device, with NumPy doing the heavy CPU steps where it is several times faster
than torch on one thread): removed entries are set to +inf (they then rank after every kept one),
each row's values are sorted once (float32 values, no indices), and a true match's kept rank is 1 +
the number of values below its distance (binary search). Unique-identity CMC counts the distinct
identities strictly closer than the first match. The float32 counts are exact unless another entry
shares a true match's float32 value (a real tie, or a float64 difference float32 rounds away);
those rows are recomputed with a stable full sort (`exact_order=True` forces it for every row).
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, list]

PROTOCOLS = ("sysu", "regdb", "llcm", "plain")
_UNIQUE_ID_CMC = {"sysu", "llcm"}
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


def keep_mask(protocol: str, q_pid: torch.Tensor, q_cam: Optional[torch.Tensor],
               g_pids: torch.Tensor, g_cams: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[C, G] bool in gallery order: entries that survive the protocol's removal rule (None = all)."""
    if protocol == "sysu":
        return ~((q_cam == 3).unsqueeze(1) & (g_cams == 2).unsqueeze(0))
    if protocol == "llcm":
        return ~((g_pids.unsqueeze(0) == q_pid.unsqueeze(1)) & (g_cams.unsqueeze(0) == q_cam.unsqueeze(1)))
    return None


def _distinct_before(labels: torch.Tensor, before: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[C] number of distinct gallery identities among the entries flagged in `before` [C, G]."""
    seen = torch.zeros(before.shape[0], num_labels, dtype=torch.uint8, device=before.device)
    seen.scatter_reduce_(1, labels.expand_as(before), before.view(torch.uint8), reduce="amax")
    return seen.sum(dim=1, dtype=torch.int64)


def _stable_argsort(dist: torch.Tensor) -> torch.Tensor:
    """Row-wise stable argsort (equal distances keep gallery order); NumPy on CPU, where torch.sort is slow."""
    if dist.device.type == "cpu":
        return torch.from_numpy(np.argsort(dist.numpy(), axis=1, kind="stable"))
    return torch.sort(dist, dim=1, stable=True).indices


def _chunk_stats_sorted(dist: torch.Tensor, q_pid: torch.Tensor, q_cam: Optional[torch.Tensor],
                        ctx: "_Gallery", protocol: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query of a chunk: (valid, CMC rank, AP, INP) from a full stable sort of each row.

    The exact path: rows whose true matches tie with other entries, or every row with exact_order=True;
    mirrors the reference loop step by step.
    """
    c, g = dist.shape
    order = _stable_argsort(dist)  # ties: ascending gallery index
    keep = keep_mask(protocol, q_pid, q_cam, ctx.pids, ctx.cams)
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


class _Removal:
    """The chunk's removed gallery entries: a block (sysu: the cam2 columns of the cam3 query rows) or a
    few (row, col) pairs (llcm: the query's own identity and camera, found among its candidates)."""

    def __init__(self, q_cam: Optional[torch.Tensor], ctx: "_Gallery", protocol: str, cand: torch.Tensor,
                 own_removed: torch.Tensor):
        empty = torch.zeros(0, dtype=torch.int64, device=cand.device)
        self.is_cam3: Optional[torch.Tensor] = None
        self.block_rows = self.block_cols = self.rows = self.cols = empty
        if protocol == "sysu" and ctx.cam2.numel():
            self.is_cam3 = q_cam == 3
            self.block_rows, self.block_cols = torch.nonzero(self.is_cam3).squeeze(1), ctx.cam2
        elif protocol == "llcm":
            self.rows, slot = torch.nonzero(own_removed, as_tuple=True)
            self.cols = cand[self.rows, slot]

    def per_row(self, c: int) -> torch.Tensor:
        """[C] number of removed entries in each row of the chunk."""
        count = torch.zeros(c, dtype=torch.int64, device=self.rows.device)
        if self.block_rows.numel():
            count[self.block_rows] += self.block_cols.numel()
        if self.rows.numel():
            count += torch.bincount(self.rows, minlength=c)
        return count

    def fill(self, values: torch.Tensor, value: float) -> None:
        """Write `value` at every removed entry of `values` [C, G] (in place; NumPy indexing on CPU)."""
        if values.device.type == "cpu":
            arr = values.numpy()
            if self.block_rows.numel():
                arr[np.ix_(self.block_rows.numpy(), self.block_cols.numpy())] = value
            if self.rows.numel():
                arr[self.rows.numpy(), self.cols.numpy()] = value
            return
        if self.block_rows.numel():
            values[self.block_rows.unsqueeze(1), self.block_cols.unsqueeze(0)] = value
        if self.rows.numel():
            values[self.rows, self.cols] = value

    def drop_from(self, flags: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`flags` [R, G] bool for the chunk rows `rows`, with every removed entry cleared (in place)."""
        if self.is_cam3 is not None:
            sub = torch.nonzero(self.is_cam3.index_select(0, rows)).squeeze(1)
            if sub.numel():
                flags[sub.unsqueeze(1), self.block_cols.unsqueeze(0)] = False
        if self.rows.numel():
            where = torch.full((int(self.rows.max()) + 1,), -1, dtype=torch.int64, device=rows.device)
            where[rows[rows < where.numel()]] = torch.nonzero(rows < where.numel()).squeeze(1)
            hit = where[self.rows]
            flags[hit[hit >= 0], self.cols[hit >= 0]] = False
        return flags


def _sorted_kept(dist: torch.Tensor, removal: _Removal) -> torch.Tensor:
    """Each row's distances ascending, as float32 values, with the removed entries set to +inf.

    +inf puts removed entries after every kept one. float32 because rounding is monotone: a count
    against float32 values brackets the exact one, and the caller checks that the bracket is tight
    (no other entry in a true match's float32 bucket) before trusting it. CPU: NumPy's SIMD sort of
    the one float32 copy, in place (~10x torch.sort there); GPU: torch.sort.
    """
    if dist.device.type == "cpu":
        with np.errstate(over="ignore"):  # a finite float64 beyond float32's range becomes +inf: handled
            values = torch.from_numpy(dist.numpy().astype(np.float32))  # the one copy (also for float32 input)
        removal.fill(values, float("inf"))
        values.numpy().sort(axis=1)
        return values
    values = dist.to(torch.float32, copy=True)
    removal.fill(values, float("inf"))
    return torch.sort(values, dim=1).values


def _check_finite(dist: torch.Tensor, ordered: torch.Tensor, removal: _Removal) -> None:
    """Raise on NaN / infinite distances, read off the sorted rows (NaN sorts last, -inf first, and a
    row holds exactly as many +inf as removed entries); only suspicious rows are re-read in full."""
    c, g = ordered.shape
    inf = torch.full((c, 1), float("inf"), dtype=ordered.dtype, device=ordered.device)
    finite_count = torch.searchsorted(ordered, inf).squeeze(1)
    odd = torch.isnan(ordered[:, -1]) | torch.isinf(ordered[:, 0]) | (finite_count != g - removal.per_row(c))
    if bool(odd.any()):  # float32 overflow of a huge finite float64 distance lands here too: re-check
        rows = torch.nonzero(odd).squeeze(1)
        if not bool(torch.isfinite(dist.index_select(0, rows)).all()):
            raise ValueError("distmat contains NaN or infinite values")


def _chunk_stats_fast(dist: torch.Tensor, q_pid: torch.Tensor, q_cam: Optional[torch.Tensor],
                      ctx: "_Gallery", protocol: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query of a chunk: (valid, CMC rank, AP, INP) from one value sort per row; tied rows redone exactly.

    Removed entries become +inf, so a true match's kept rank is 1 + the number of distances below it:
    a binary search of its distance in the row's sorted values (the sort needs no indices, which is
    what makes it cheap). The unique-identity rank is 1 + the distinct identities among entries
    strictly closer than the first match (one compare and one scatter). Only where a true match's
    distance equals another entry's does the order of equal distances matter; those rows go through
    the stable full sort (`_chunk_stats_sorted`), so results equal it everywhere.
    """
    c, g = dist.shape
    pos = torch.searchsorted(ctx.unique_pids, q_pid).clamp(max=ctx.num_labels - 1)
    has_id = ctx.unique_pids[pos] == q_pid
    cand = ctx.table[pos]  # [C, Pmax] gallery entries of the query's identity, padded with g
    cand_ok = (cand < g) & has_id.unsqueeze(1)
    cand = cand.clamp(max=g - 1)
    own_removed = torch.zeros_like(cand_ok)
    if protocol == "llcm":
        own_removed = cand_ok & (ctx.cams[cand] == q_cam.unsqueeze(1))
    elif protocol == "sysu":
        own_removed = cand_ok & (q_cam == 3).unsqueeze(1) & (ctx.cams[cand] == 2)
    cand_ok &= ~own_removed
    d = dist
    removal = _Removal(q_cam, ctx, protocol, cand, own_removed)
    inf = torch.full((), float("inf"), dtype=d.dtype, device=d.device)
    match_d = torch.sort(torch.where(cand_ok, d.gather(1, cand), inf), dim=1).values
    num_rel = cand_ok.sum(dim=1)
    valid = num_rel > 0
    ordered = _sorted_kept(d, removal)
    _check_finite(dist, ordered, removal)
    match32 = match_d.to(torch.float32)
    below = torch.searchsorted(ordered, match32)  # kept entries strictly closer than each true match ...
    p = match_d.shape[1]
    is_rel = torch.arange(p, device=d.device).unsqueeze(0) < num_rel.unsqueeze(1)
    after = ordered.gather(1, (below + 1).clamp(max=g - 1))
    # ... exactly, unless another entry shares the match's float32 value (a tie, or a float64 difference
    # that float32 rounds away): then those rows take the exact stable sort
    tied = ((after == match32) & (below + 1 < g) & is_rel).any(dim=1)

    kept_rank = (below + 1).to(torch.float64)
    k = torch.arange(1, p + 1, device=d.device, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=d.device)
    ap = torch.where(is_rel, k / kept_rank, zero).sum(dim=1) / num_rel.to(torch.float64).clamp_min(1.0)
    last = kept_rank.gather(1, (num_rel - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    inp = num_rel.to(torch.float64) / last
    if protocol in _UNIQUE_ID_CMC:
        # rank 1 unless some kept entry is closer than the first match: count identities only there
        cmc_rank = torch.ones_like(below[:, 0])
        rows = torch.nonzero(valid & (below[:, 0] > 0)).squeeze(1)
        if rows.numel():
            if d.device.type == "cpu":  # NumPy row gather + compare: ~2x torch's on one thread
                r = rows.numpy()
                closer = torch.from_numpy(d.numpy()[r] < match_d.numpy()[r, :1])
            else:
                closer = d.index_select(0, rows) < match_d.index_select(0, rows)[:, :1]
            closer = removal.drop_from(closer, rows)  # kept and strictly closer than the first match
            cmc_rank[rows] = _distinct_before(ctx.labels.unsqueeze(0), closer, ctx.num_labels) + 1
    else:
        cmc_rank = below[:, 0] + 1
    if bool(tied.any()):
        rows = torch.nonzero(tied).squeeze(1)
        exact = _chunk_stats_sorted(dist[rows], q_pid[rows], q_cam[rows] if q_cam is not None else None,
                                    ctx, protocol)
        for mine, theirs in zip((valid, cmc_rank, ap, inp), exact):
            mine[rows] = theirs.to(mine.dtype)
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
        self.cam2 = (torch.nonzero(cams == 2).squeeze(1) if cams is not None
                     else torch.zeros(0, dtype=torch.int64, device=pids.device))


def rank_metrics(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike,
                 q_cams: Optional[ArrayLike] = None, g_cams: Optional[ArrayLike] = None,
                 protocol: str = "sysu", max_rank: int = 20,
                 chunk_elements: int = _CHUNK_ELEMENTS, exact_order: bool = False) -> dict:
    """CMC[max_rank], mAP and mINP (fractions in [0, 1]) as the reference `eval_<protocol>` computes them.

    distmat: [num_query, num_gallery], smaller = more similar; numpy or torch (computation runs on
    its device). Cameras are the datasets' 1-based camera numbers. protocol: "sysu" (cam3 -> cam2
    removal, unique-identity CMC), "llcm" (same id and camera removal, unique-identity CMC),
    "regdb" or "plain" (no removal, plain CMC). Returns {"cmc": np.ndarray[max_rank] float64,
    "mAP": float, "mINP": float, "num_valid_queries": int}. Raises ValueError when no query has a
    true match in the gallery (the reference asserts the same). exact_order=True runs every query
    through the stable full sort (the slower path the fast one falls back to on ties; for tests).
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

    if exact_order and not bool(torch.isfinite(dist).all()):  # the fast path checks its sorted rows
        raise ValueError("distmat contains NaN or infinite values")
    nq, ng = dist.shape
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()  # exact
    chunk_fn = _chunk_stats_fast if exact_order is False else _chunk_stats_sorted
    hist = torch.zeros(max_rank + 1, dtype=torch.float64, device=device)  # hist[r-1]: CMC rank r
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_valid = torch.zeros((), dtype=torch.int64, device=device)
    ctx = _Gallery(gp, gc)
    per_query = ng + (ctx.num_labels if protocol in _UNIQUE_ID_CMC else 0) + ctx.max_per_id
    chunk = max(1, chunk_elements // per_query)
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
    """Negative cosine similarity -<q, g> [Q, G] in float64, so rankings tie only where the references' do.

    The community reference code computes `np.matmul(query_feat, gallery_feat.T)` on float64 numpy
    features and ranks `-distmat`. Features are upcast to float64 BEFORE normalising and multiplying:
    in float32, similarities closer than ~6e-8 collapse into exact ties (ordered by gallery index
    here, arbitrarily in the reference), which moved weakly trained results by up to 0.09 R1 points.
    Negation is exact, so no rounding ties are added (1 - <q, g> could merge distinct similarities).
    For unit vectors this ranks like the Euclidean distance. Cost: the matrix product runs in
    float64 (about 2x float32 on CPUs, far more on consumer GPUs) and the matrix is twice as large.
    """
    q = torch.nn.functional.normalize(query.to(torch.float64), dim=1)
    g = torch.nn.functional.normalize(gallery.to(torch.float64), dim=1)
    return -(q @ g.t())
