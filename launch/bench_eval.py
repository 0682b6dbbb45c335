"""Benchmark: vectorised `rank_metrics` vs a per-query NumPy loop, side by side in one run; float64 distance cost.

    python launch/bench_eval.py [--device cpu|cuda] [--trials 10] [--repeat 3] [--threads 1]

Baseline: the per-query loop the community reference code is built on (argsort of one query's
distances, the removal mask, `np.unique(..., return_index=True)` for the first occurrence of each
identity, AP/INP from cumulative sums), written as well as NumPy allows; its argsort is stable, so
equal distances order like `rank_metrics` and the two agree to 1e-6 even with ties.

Problems are random but shaped like the real ones: SYSU-MM01 all-search single-shot (3,803
infrared queries x 301 gallery images of 96 ids, one per (id, RGB camera), many repeated gallery
identities, cam3 -> cam2 removal, queries whose id is not in the gallery, duplicated gallery images
that tie exactly, 10 trials) in float64 (what the evaluator ranks) and float32, and RegDB (2,060 x
2,060, 206 ids x 10 images). Prints each side's time, the speed-up and the largest absolute
difference of CMC / mAP / mINP. torch runs on one CPU thread by default, like the loop: the same
single core on both sides; times are the best of --repeat runs, in CPU time of this process on CPU
(robust to other processes sharing the machine), wall time on a GPU. Last, the cost of float64 distances: `pairwise_distance` (float64) vs
the same product in float32 on SYSU all-search sizes.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mip_dist.eval.metrics import pairwise_distance, rank_metrics


def loop_eval(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray,
              g_cams: np.ndarray, protocol: str, max_rank: int = 20) -> tuple[np.ndarray, float, float]:
    """Per-query reference loop (argsort per query, removal mask, np.unique first occurrence): the baseline."""
    cmc_sum = np.zeros(max_rank)
    aps, inps = [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        if protocol == "sysu":
            order = order[~((q_cams[i] == 3) & (g_cams[order] == 2))]
        ranked = g_pids[order]
        match = ranked == q_pids[i]
        if not match.any():
            continue
        if protocol == "sysu":  # unique-identity CMC: identities in order of first appearance
            _, first = np.unique(ranked, return_index=True)
            rank = int(np.flatnonzero(ranked[np.sort(first)] == q_pids[i])[0])
        else:
            rank = int(np.argmax(match))
        if rank < max_rank:
            cmc_sum[rank:] += 1
        pos = np.flatnonzero(match) + 1.0
        aps.append(float(np.mean(np.arange(1, pos.size + 1) / pos)))
        inps.append(pos.size / pos[-1])
    return cmc_sum / len(aps), float(np.mean(aps)), float(np.mean(inps))


def sysu_problems(trials: int, seed: int = 0, dtype: type = np.float64) -> list[tuple]:
    """Per trial: distances [3803, 301], query/gallery ids and cameras (queries fixed, gallery redrawn).

    Query ids 0..99 against gallery ids 0..95 (some queries have no match), cameras 3/6 vs 1/2/4/5,
    and two duplicated gallery images (equal distances in every row: exact ties).
    """
    rng = np.random.default_rng(seed)
    q_pids = np.repeat(np.arange(100), 39)[:3803]
    q_cams = rng.choice([3, 6], size=q_pids.size)
    out = []
    for _ in range(trials):
        pairs = rng.choice(96 * 4, size=301, replace=False)  # 301 (id, RGB camera) pairs present
        g_pids, g_cams = pairs // 4, np.asarray([1, 2, 4, 5])[pairs % 4]
        dist = rng.random((q_pids.size, 301)) + 0.3 * (q_pids[:, None] != g_pids[None])
        for src, dst in ((0, 1), (2, 3)):  # duplicated images: same id, camera and distances
            g_pids[dst], g_cams[dst], dist[:, dst] = g_pids[src], g_cams[src], dist[:, src]
        out.append((dist.astype(dtype), q_pids, g_pids, q_cams, g_cams))
    return out


def regdb_problem(seed: int = 1) -> tuple:
    """Distances [2060, 2060] with 206 ids x 10 images on both sides."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(206), 10)
    dist = rng.random((2060, 2060)) + 0.3 * (pids[:, None] != pids[None])
    return dist, pids, pids.copy(), None, None


def _max_diff(a: dict, b: tuple) -> float:
    """Largest absolute CMC / mAP / mINP difference between rank_metrics and the loop."""
    return max(float(np.abs(a["cmc"] - b[0]).max()), abs(a["mAP"] - b[1]), abs(a["mINP"] - b[2]))


def _best_time(fn, repeat: int, device: torch.device) -> tuple[float, object]:
    """Best of `repeat` calls (and the last result): CPU time of this process on CPU (both sides are
    single-threaded, and CPU time is what other processes on a shared machine disturb least), wall
    time with a GPU."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    return best, out


def bench(name: str, problems: list[tuple], protocol: str, device: torch.device, repeat: int) -> None:
    """Per problem, best of `repeat` for the loop and for rank_metrics, interleaved (a load change hits both);
    sums over problems; checks 1e-6 agreement; prints the speed-up."""
    tensors = [(torch.from_numpy(p[0]).to(device),) + p[1:] for p in problems]
    rank_metrics(*tensors[0], protocol=protocol)  # warm-up
    t_loop = t_ours = diff = 0.0
    first = None
    for prob, tens in zip(problems, tensors):
        dt, ref = _best_time(lambda: loop_eval(*prob, protocol), repeat, device)
        t_loop += dt
        dt, ours = _best_time(lambda: rank_metrics(*tens, protocol=protocol), repeat, device)
        t_ours += dt
        diff = max(diff, _max_diff(ours, ref))
        first = first or ours
    print(f"{name:<34} loop {t_loop * 1e3:9.1f} ms   rank_metrics ({device.type}) {t_ours * 1e3:8.1f} ms   "
          f"speed-up {t_loop / t_ours:6.1f}x   max |diff| {diff:.2e}   "
          f"(R1 {first['cmc'][0] * 100:.2f}, mAP {first['mAP'] * 100:.2f})")
    if diff >= 1e-6:
        raise SystemExit(f"error: {name}: rank_metrics disagrees with the loop by {diff:.2e}")


def bench_distance(device: torch.device, repeat: int, dim: int = 768) -> None:
    """float64 pairwise_distance vs the float32 product, SYSU all-search sized (3,803 x 6,775 features)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3803, dim, generator=gen).to(device)
    g = torch.randn(6775, dim, generator=gen).to(device)

    def f32() -> torch.Tensor:
        """The old float32 distance."""
        return -(torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).t())

    times = {}
    for name, fn in (("float32", f32), ("float64", lambda: pairwise_distance(q, g))):
        fn()
        best = float("inf")
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    print(f"{'distances 3803x6775, dim ' + str(dim):<34} float32 {times['float32'] * 1e3:8.1f} ms   "
          f"float64 {times['float64'] * 1e3:8.1f} ms   ({times['float64'] / times['float32']:.1f}x, "
          f"{3803 * 6775 * 8 / 2**20:.0f} MiB instead of {3803 * 6775 * 4 / 2**20:.0f} MiB)")


def main() -> None:
    """Parse options, run every benchmark, print one line each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} CPU threads, device {device}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    bench(f"SYSU 3803x301 f64, {args.trials} trials", sysu_problems(args.trials), "sysu", device, args.repeat)
    bench(f"SYSU 3803x301 f32, {args.trials} trials", sysu_problems(args.trials, dtype=np.float32), "sysu", device,
          args.repeat)
    bench("RegDB 2060x2060 f64", [regdb_problem()], "regdb", device, args.repeat)
    bench_distance(device, args.repeat)


if __name__ == "__main__":
    main()
