"""k-reciprocal re-ranking against a loop port of the widely used `re_ranking` (float32 V, stable sort)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mip_dist.eval.rerank import re_ranking


def loop_re_ranking(q, g, k1, k2, lam):
    """Zhong et al.'s reference algorithm, element by element (numpy, float32 weights)."""
    feat = np.concatenate([q, g]).astype(np.float32)
    nq, a = q.shape[0], feat.shape[0]
    sq = (feat ** 2).sum(1, keepdims=True)
    dist = np.maximum(sq + sq.T - 2.0 * feat @ feat.T, 0.0)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")
    v = np.zeros((a, a), dtype=np.float32)
    half = int(np.around(k1 / 2))
    for i in range(a):
        fwd = rank[i, :k1 + 1]
        bwd = rank[fwd, :k1 + 1]
        recip = fwd[np.where(bwd == i)[0]]
        expansion = recip
        for cand in recip:
            c_fwd = rank[cand, :half + 1]
            c_bwd = rank[c_fwd, :half + 1]
            c_recip = c_fwd[np.where(c_bwd == cand)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(a)])
    jac = np.zeros((nq, a), dtype=np.float32)
    inv = [np.where(v[:, c] != 0)[0] for c in range(a)]
    for i in range(nq):
        tmin = np.zeros(a, dtype=np.float32)
        for c in np.where(v[i] != 0)[0]:
            tmin[inv[c]] += np.minimum(v[i, c], v[inv[c], c])
        jac[i] = 1 - tmin / (2 - tmin)
    return (jac * (1 - lam) + dist[:nq] * lam)[:, nq:]


@pytest.mark.parametrize("nq,ng,k1,k2", [(12, 30, 6, 3), (20, 25, 5, 1), (7, 40, 20, 6)])
def test_matches_loop_port(nq, ng, k1, k2):
    rng = np.random.default_rng(nq * 100 + ng)
    centres = rng.normal(size=(6, 16))
    q = centres[rng.integers(0, 6, nq)] + 0.5 * rng.normal(size=(nq, 16))
    g = centres[rng.integers(0, 6, ng)] + 0.5 * rng.normal(size=(ng, 16))
    expected = loop_re_ranking(q, g, k1, k2, 0.3)
    got = re_ranking(torch.from_numpy(q).float(), torch.from_numpy(g).float(), k1=k1, k2=k2, lambda_value=0.3)
    assert got.shape == (nq, ng)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-5, rtol=0)


def test_rejects_mismatched_features():
    with pytest.raises(ValueError, match="query"):
        re_ranking(torch.zeros(3, 4), torch.zeros(5, 6))
