"""rank_metrics against hand-computed rankings and a per-query loop written like the reference code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mip_dist.eval.metrics import pairwise_distance, rank_metrics


def loop_reference(distmat, q_pids, g_pids, q_cams, g_cams, protocol, max_rank=20):
    """The community eval_sysu / eval_llcm / eval_regdb, query by query, with a STABLE argsort.

    Only change besides the stable sort: a curve shorter than max_rank is padded with its last value.
    """
    indices = np.argsort(distmat, axis=1, kind="stable")
    pred_label = g_pids[indices]
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(distmat.shape[0]):
        order = indices[q]
        if protocol == "sysu":
            remove = (q_cams[q] == 3) & (g_cams[order] == 2)
        elif protocol == "llcm":
            remove = (g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q])
        else:
            remove = np.zeros(len(order), dtype=bool)
        keep = np.invert(remove)
        orig_cmc = matches[q][keep]
        if not np.any(orig_cmc):
            continue
        if protocol in ("sysu", "llcm"):
            labels = pred_label[q][keep]
            first = np.unique(labels, return_index=True)[1]
            labels = np.asarray([labels[i] for i in sorted(first)])
            cmc = (labels == q_pids[q]).astype(np.int32).cumsum()
        else:
            cmc = orig_cmc.cumsum()
        cmc[cmc > 1] = 1
        if len(cmc) < max_rank:
            cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1])])
        all_cmc.append(cmc[:max_rank])
        hits = orig_cmc.cumsum()
        last = np.max(np.where(orig_cmc == 1))
        all_inp.append(hits[last] / (last + 1.0))
        precision = np.asarray([x / (i + 1.0) for i, x in enumerate(hits)]) * orig_cmc
        all_ap.append(precision.sum() / orig_cmc.sum())
    if not all_cmc:
        return None
    return np.asarray(all_cmc, dtype=np.float64).mean(0), float(np.mean(all_ap)), float(np.mean(all_inp))


def _one(distances, q_pid, q_cam, g_pids, g_cams, protocol, dtype=np.float64):
    """rank_metrics for one query given as plain lists."""
    return rank_metrics(np.asarray([distances], dtype=dtype), np.asarray([q_pid]), np.asarray(g_pids),
                        np.asarray([q_cam]), np.asarray(g_cams), protocol=protocol, max_rank=5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
class TestHandComputed:
    def test_sysu_cam3_query_loses_cam2_gallery(self, dtype):
        # ranked: pid1@cam2 (removed for a cam3 query), pid2@cam1, pid1@cam1, pid3@cam4
        d, g_pids, g_cams = [0.1, 0.2, 0.3, 0.4], [1, 2, 1, 3], [2, 1, 1, 4]
        r = _one(d, 1, 3, g_pids, g_cams, "sysu", dtype)
        np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])
        assert r["mAP"] == pytest.approx(0.5) and r["mINP"] == pytest.approx(0.5)
        # the same ranking for a cam6 query keeps the cam2 image: AP = (1/1 + 2/3) / 2, INP = 2/3
        r = _one(d, 1, 6, g_pids, g_cams, "sysu", dtype)
        np.testing.assert_allclose(r["cmc"], [1, 1, 1, 1, 1])
        assert r["mAP"] == pytest.approx(5 / 6) and r["mINP"] == pytest.approx(2 / 3)

    def test_unique_identity_cmc_versus_plain(self, dtype):
        # ranked ids 2, 2, 3, 1: unique list [2, 3, 1] puts the match at rank 3; plain CMC at rank 4
        d, g_pids, g_cams = [0.1, 0.2, 0.3, 0.4], [2, 2, 3, 1], [1, 4, 5, 1]
        np.testing.assert_allclose(_one(d, 1, 6, g_pids, g_cams, "sysu", dtype)["cmc"], [0, 0, 1, 1, 1])
        r = _one(d, 1, 6, g_pids, g_cams, "regdb", dtype)
        np.testing.assert_allclose(r["cmc"], [0, 0, 0, 1, 1])
        assert r["mAP"] == pytest.approx(0.25) and r["mINP"] == pytest.approx(0.25)

    def test_ties_keep_gallery_index_order(self, dtype):
        # all distances equal: stable order is gallery order, so ids [2, 1, 1] rank the match 2nd
        r = _one([0.5, 0.5, 0.5], 1, 6, [2, 1, 1], [1, 1, 4], "sysu", dtype)
        np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])
        assert r["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2) and r["mINP"] == pytest.approx(2 / 3)
        r = _one([0.5, 0.5, 0.5], 1, 6, [1, 1, 2], [1, 4, 1], "sysu", dtype)
        np.testing.assert_allclose(r["cmc"], [1, 1, 1, 1, 1])
        assert r["mAP"] == pytest.approx(1.0) and r["mINP"] == pytest.approx(1.0)
        # -0.0 and +0.0 tie as well
        r = _one([0.0, -0.0], 1, 6, [2, 1], [1, 1], "regdb", dtype)
        np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])

    def test_llcm_removes_same_identity_same_camera(self, dtype):
        d, g_pids, g_cams = [0.1, 0.2, 0.3], [1, 2, 1], [4, 5, 5]
        r = _one(d, 1, 4, g_pids, g_cams, "llcm", dtype)
        np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])
        assert r["mAP"] == pytest.approx(0.5)
        # another identity's image from the query camera is kept
        r = _one(d, 1, 4, [2, 1, 1], [4, 5, 4], "llcm", dtype)
        np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])
        assert r["mAP"] == pytest.approx(0.5) and r["mINP"] == pytest.approx(0.5)

    def test_queries_without_match_are_skipped(self, dtype):
        dist = np.asarray([[0.1, 0.2], [0.3, 0.1], [0.2, 0.1]], dtype=dtype)
        q_pids, q_cams = np.asarray([1, 9, 1]), np.asarray([6, 6, 3])
        g_pids, g_cams = np.asarray([2, 1]), np.asarray([1, 2])
        # query 0: match 2nd (AP .5); query 1: id absent; query 2 (cam3): its only match is in cam2
        r = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, protocol="sysu", max_rank=2)
        assert r["num_valid_queries"] == 1
        np.testing.assert_allclose(r["cmc"], [0, 1])
        assert r["mAP"] == pytest.approx(0.5) and r["mINP"] == pytest.approx(0.5)
        with pytest.raises(ValueError, match="no query has a true match"):
            rank_metrics(dist[1:2], q_pids[1:2], g_pids, q_cams[1:2], g_cams, protocol="sysu")


def test_bad_arguments_are_named():
    d = np.zeros((2, 3))
    with pytest.raises(ValueError, match="protocol='market'"):
        rank_metrics(d, [1, 2], [1, 2, 3], [3, 3], [1, 1, 1], protocol="market")
    with pytest.raises(ValueError, match="needs q_cams and g_cams"):
        rank_metrics(d, [1, 2], [1, 2, 3], protocol="sysu")
    with pytest.raises(ValueError, match="g_pids has shape"):
        rank_metrics(d, [1, 2], [1, 2], protocol="regdb")
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(np.full((2, 3), np.nan), [1, 2], [1, 2, 3], protocol="regdb")


def _random_problem(rng, nq, ng, n_ids, tie_levels):
    """Distances with many exact ties (few levels) or none, ids and cameras drawn at random."""
    if tie_levels:
        dist = rng.integers(0, tie_levels, size=(nq, ng)).astype(np.float64) / tie_levels
    else:
        dist = rng.normal(size=(nq, ng))
    return (dist, rng.integers(0, n_ids, nq), rng.integers(0, n_ids, ng),
            rng.integers(1, 10, nq), rng.integers(1, 10, ng))


@pytest.mark.parametrize("protocol", ["sysu", "llcm", "regdb"])
def test_matches_per_query_loop_on_random_problems(protocol):
    rng = np.random.default_rng({"sysu": 0, "llcm": 1, "regdb": 2}[protocol])
    checked = 0
    for trial in range(60):
        nq, ng = int(rng.integers(1, 70)), int(rng.integers(1, 90))
        n_ids = int(rng.integers(1, 15))
        tie_levels = [0, 2, 5, 50][trial % 4]
        dist, q_pids, g_pids, q_cams, g_cams = _random_problem(rng, nq, ng, n_ids, tie_levels)
        if protocol == "sysu":  # make the cam3 -> cam2 rule bite often
            q_cams, g_cams = rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng)
        max_rank = int(rng.integers(1, 25))
        for dtype in (np.float64, np.float32):  # the sorted path and the sort-free path
            d = dist.astype(dtype)
            expected = loop_reference(d, q_pids, g_pids, q_cams, g_cams, protocol, max_rank)
            if expected is None:
                continue
            chunk = int(rng.choice([8, 1 << 22]))  # tiny chunks exercise the chunk loop
            got = rank_metrics(torch.from_numpy(d) if trial % 2 else d, q_pids, g_pids, q_cams, g_cams,
                               protocol=protocol, max_rank=max_rank, chunk_elements=chunk)
            np.testing.assert_allclose(got["cmc"], expected[0], atol=1e-6, rtol=0)
            assert got["mAP"] == pytest.approx(expected[1], abs=1e-6)
            assert got["mINP"] == pytest.approx(expected[2], abs=1e-6)
            checked += 1
    assert checked > 60


@pytest.mark.parametrize("protocol", ["sysu", "llcm", "regdb"])
def test_fast_path_equals_exact_stable_sort_with_many_ties(protocol):
    rng = np.random.default_rng(11)
    for levels in (0, 3, 30):  # no ties, ties everywhere, some ties: tied rows take the exact path
        dist, q_pids, g_pids, q_cams, g_cams = _random_problem(rng, 40, 60, 4, levels)
        if protocol == "sysu":
            q_cams, g_cams = rng.choice([3, 6], 40), rng.choice([1, 2, 4, 5], 60)
        for dtype in (np.float64, np.float32):
            d = dist.astype(dtype)
            fast = rank_metrics(d, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
            exact = rank_metrics(d, q_pids, g_pids, q_cams, g_cams, protocol=protocol, exact_order=True)
            np.testing.assert_allclose(fast["cmc"], exact["cmc"], atol=1e-12)
            assert fast["mAP"] == pytest.approx(exact["mAP"], abs=1e-12)
            assert fast["mINP"] == pytest.approx(exact["mINP"], abs=1e-12)


def test_sysu_sized_problem_and_dtypes():
    rng = np.random.default_rng(5)
    nq, ng = 400, 301
    dist = rng.random((nq, ng))
    q_pids, g_pids = rng.integers(0, 96, nq), rng.integers(0, 96, ng)
    q_cams, g_cams = rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng)
    for d in (dist, dist.astype(np.float32), torch.from_numpy(dist).to(torch.bfloat16)):
        d_np = d.float().numpy() if isinstance(d, torch.Tensor) else d
        expected = loop_reference(d_np.astype(np.float64), q_pids, g_pids, q_cams, g_cams, "sysu")
        got = rank_metrics(d, torch.from_numpy(q_pids), g_pids, q_cams, torch.from_numpy(g_cams))
        np.testing.assert_allclose(got["cmc"], expected[0], atol=1e-6)
        assert got["mAP"] == pytest.approx(expected[1], abs=1e-6)
        assert got["mINP"] == pytest.approx(expected[2], abs=1e-6)
        assert got["cmc"].shape == (20,) and np.all(np.diff(got["cmc"]) >= 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_equals_cpu():
    rng = np.random.default_rng(7)
    dist, q_pids, g_pids, q_cams, g_cams = _random_problem(rng, 500, 300, 40, 5)
    for dtype in (torch.float32, torch.float64):
        d = torch.from_numpy(dist).to(dtype)
        cpu = rank_metrics(d, q_pids, g_pids, q_cams, g_cams, protocol="llcm")
        gpu = rank_metrics(d.cuda(), q_pids, g_pids, q_cams, g_cams, protocol="llcm")
        np.testing.assert_allclose(gpu["cmc"], cpu["cmc"], atol=1e-12)
        assert gpu["mAP"] == pytest.approx(cpu["mAP"], abs=1e-12)


def test_pairwise_distance_is_negative_cosine_in_float64():
    q, g = torch.randn(5, 8), torch.randn(7, 8)
    d = pairwise_distance(q * 3.0, g)
    assert d.dtype == torch.float64
    expected = -torch.nn.functional.cosine_similarity((q * 3.0)[:, None].double(), g[None].double(), dim=-1)
    torch.testing.assert_close(d, expected, atol=1e-12, rtol=0)


def test_float64_distances_break_the_ties_float32_creates():
    # Gallery 0 (wrong id) is 1e-4 rad away from the query, gallery 1 (right id) is the query's own
    # direction. In float32 both cosine similarities round to exactly 1.0: a tie, which the stable
    # order resolves in favour of gallery 0 (R1 = 0). The references compute in float64, where
    # gallery 1 is strictly closer (R1 = 1); so must we.
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 1e-4], [1.0, 0.0]])
    as_float32 = -(torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).t())
    assert as_float32[0, 0] == as_float32[0, 1]  # the float32 tie this test is about
    d = pairwise_distance(query, gallery)
    q64, g64 = query.double().numpy(), gallery.double().numpy()
    g64 = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    reference = -(q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ g64.T  # the references' float64 numpy
    assert d[0, 1] < d[0, 0]
    np.testing.assert_array_equal(np.argsort(d.numpy()[0], kind="stable"), np.argsort(reference[0], kind="stable"))
    r = rank_metrics(d, [7], [3, 7], [3], [1, 4], protocol="sysu")
    assert r["cmc"][0] == 1.0 and r["mAP"] == 1.0
    r32 = rank_metrics(as_float32, [7], [3, 7], [3], [1, 4], protocol="sysu")
    assert r32["cmc"][0] == 0.0  # what the float32 distances gave


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_distance_is_refused_even_next_to_removed_entries(bad):
    rng = np.random.default_rng(3)
    d = rng.random((6, 8))
    q_cams, g_cams = [3, 3, 6, 6, 3, 6], [1, 2, 2, 4, 5, 1, 2, 4]
    d[4, 3] = bad  # a kept entry of a cam3 query whose cam2 entries are removed (+inf internally)
    with pytest.raises(ValueError, match="NaN or infinite"):
        rank_metrics(d, [1, 2, 3, 1, 2, 3], [1, 2, 3, 1, 2, 3, 1, 2], q_cams, g_cams, protocol="sysu")


def test_huge_finite_float64_distances_are_ranked_exactly():
    rng = np.random.default_rng(4)
    dist, q_pids, g_pids, q_cams, g_cams = _random_problem(rng, 30, 40, 5, 0)
    dist[:, ::3] = 1e39 * (1 + rng.random((30, 14)))  # beyond float32's range: +inf once rounded
    fast = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, protocol="llcm")
    exact = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, protocol="llcm", exact_order=True)
    np.testing.assert_allclose(fast["cmc"], exact["cmc"], atol=1e-12)
    assert fast["mAP"] == pytest.approx(exact["mAP"], abs=1e-12)
    assert fast["mINP"] == pytest.approx(exact["mINP"], abs=1e-12)
