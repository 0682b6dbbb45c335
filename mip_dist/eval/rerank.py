"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) on features, vectorised in torch.

Follows the widely copied `re_ranking(probFea, galFea, k1, k2, lambda_value)` (TransReID / AGW):
squared Euclidean distances over query+gallery, each row divided by its maximum; k-reciprocal sets
R(i, k1) expanded by the R(c, round(k1/2)) of their members that overlap R(i, k1) by more than 2/3;
Gaussian-kernel weights exp(-d) normalised per row (V); local query expansion over the k2 nearest
neighbours; Jaccard distance 1 - m / (2 - m) with m = sum_k min(V_ik, V_jk); final distance
(1 - lambda) * Jaccard + lambda * original. Differences, on purpose: V is float32 (the reference
stores float16), and nearest-neighbour lists use a stable sort (ties in index order).

Neighbour sets are dense boolean matrices; the Jaccard sum runs only over the non-zeros of V
(a sparse join by column), so memory stays near O((Q+G)^2) booleans plus the non-zero pairs.
"""
from __future__ import annotations

import torch

_PAIR_BUDGET = 1 << 24  # non-zero pairs joined per step of the Jaccard accumulation


def _topk_mask(rank: torch.Tensor, k: int) -> torch.Tensor:
    """[A, A] bool: mask[i, j] = j is among the first k entries of rank[i]."""
    n = rank.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool, device=rank.device)
    mask.scatter_(1, rank[:, :k], True)
    return mask


def _jaccard_overlap(v: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, A]: m[i, j] = sum_k min(v[i, k], v[j, k]) for the first `rows` rows, via a sparse join."""
    a = v.shape[0]
    r_all, c_all = v.nonzero(as_tuple=True)
    val_all = v[r_all, c_all]
    order = torch.argsort(c_all, stable=True)
    r_all, c_all, val_all = r_all[order], c_all[order], val_all[order]
    col_count = torch.bincount(c_all, minlength=a)
    col_start = torch.cumsum(col_count, 0) - col_count

    q_mask = r_all < rows
    rq, cq, vq = r_all[q_mask], c_all[q_mask], val_all[q_mask]
    out = torch.zeros(rows * a, dtype=v.dtype, device=v.device)
    pairs_per_entry = col_count[cq]
    start = 0
    while start < rq.numel():
        # take as many query entries as fit in the pair budget (at least one)
        csum = torch.cumsum(pairs_per_entry[start:], 0)
        stop = start + max(1, int(torch.searchsorted(csum, torch.tensor(_PAIR_BUDGET, device=v.device))))
        n_pairs = pairs_per_entry[start:stop]
        entry = torch.repeat_interleave(torch.arange(start, stop, device=v.device), n_pairs)
        offset = torch.arange(entry.numel(), device=v.device) - torch.repeat_interleave(
            torch.cumsum(n_pairs, 0) - n_pairs, n_pairs)
        partner = col_start[cq[entry]] + offset
        contrib = torch.minimum(vq[entry], val_all[partner])
        out.index_add_(0, rq[entry] * a + r_all[partner], contrib)
        start = stop
    return out.view(rows, a)


@torch.no_grad()
def re_ranking(query: torch.Tensor, gallery: torch.Tensor, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> torch.Tensor:
    """Re-ranked distance [Q, G] (smaller = more similar) from query [Q, F] and gallery [G, F] features."""
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"re_ranking needs query [Q, F] and gallery [G, F]; got {tuple(query.shape)} "
                         f"and {tuple(gallery.shape)}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re_ranking: k1={k1} and k2={k2} must be >= 1")
    nq = query.shape[0]
    feat = torch.cat([query, gallery]).float()
    a = feat.shape[0]
    sq = feat.pow(2).sum(1, keepdim=True)
    dist = (sq + sq.t() - 2.0 * feat @ feat.t()).clamp_min(0.0)
    dist = dist / dist.amax(dim=1, keepdim=True).clamp_min(1e-12)
    rank = torch.sort(dist, dim=1, stable=True).indices

    near = _topk_mask(rank, k1 + 1)
    recip = near & near.t()  # R(i, k1)
    k_half = int(round(k1 / 2))  # round-half-even, like np.around
    near_half = _topk_mask(rank, k_half + 1)
    recip_half = near_half & near_half.t()  # R(c, k1/2)
    overlap = recip.float() @ recip_half.float().t()  # |R(i,k1) & R(c,k1/2)|
    size_half = recip_half.sum(1).float()
    accept = recip & (overlap > (2.0 / 3.0) * size_half.unsqueeze(0))
    expanded = recip | ((accept.float() @ recip_half.float()) > 0)

    weight = torch.where(expanded, torch.exp(-dist), torch.zeros((), device=dist.device))
    v = weight / weight.sum(1, keepdim=True)
    if k2 != 1:
        v_qe = torch.empty_like(v)
        step = max(1, (1 << 24) // (k2 * a))
        for s in range(0, a, step):
            v_qe[s:s + step] = v[rank[s:s + step, :k2]].mean(dim=1)
        v = v_qe
    overlap_min = _jaccard_overlap(v, nq)
    jaccard = 1.0 - overlap_min / (2.0 - overlap_min)
    final = jaccard * (1.0 - lambda_value) + dist[:nq] * lambda_value
    return final[:, nq:]
