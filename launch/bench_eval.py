"""Benchmark: vectorised `rank_metrics` vs the community per-query numpy loop, side by side in one run.

    python launch/bench_eval.py [--device cpu|cuda] [--trials 10] [--repeat 3] [--threads 1]

Problems are random but shaped like the real ones: SYSU-MM01 all-search single-shot (3,803 infrared
queries x 301 gallery images of 96 ids, one per (id, RGB camera), cam3 -> cam2 removal, 10 trials)
and RegDB (2,060 x 2,060, 206 ids x 10 images). Prints each side's time, the speed-up and the
largest absolute difference of CMC / mAP / mINP between the two. By default torch runs on one CPU
thread, like the numpy loop: the same single core on both sides (on a shared, busy machine more
intra-op threads can be slower, not faster).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mip_dist.eval.metrics import rank_metrics


def loop_eval(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank=20):
    """The reference `eval_sysu` / `eval_regdb` (Cross-Modal-Re-ID-baseline style): one query at a time."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1)
    pred_label = g_pids[indices]
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    num_valid_q = 0.0
    for q_idx in range(num_q):
        order = indices[q_idx]
        if protocol == "sysu":
            remove = (q_camids[q_idx] == 3) & (g_camids[order] == 2)
        else:
            remove = np.zeros(num_g, dtype=bool)
        keep = np.invert(remove)
        orig_cmc = matches[q_idx][keep]
        if protocol == "sysu":
            new_cmc = pred_label[q_idx][keep]
            new_index = np.unique(new_cmc, return_index=True)[1]
            new_cmc = [new_cmc[index] for index in sorted(new_index)]
            cmc = (np.asarray(new_cmc) == q_pids[q_idx]).astype(np.int32).cumsum()
        else:
            cmc = orig_cmc.cumsum()
        if not np.any(orig_cmc):
            continue
        pos_max_idx = np.max(np.where(orig_cmc == 1))
        hits = orig_cmc.cumsum()
        all_inp.append(hits[pos_max_idx] / (pos_max_idx + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.0
        tmp_cmc = np.asarray([x / (i + 1.0) for i, x in enumerate(hits)]) * orig_cmc
        all_ap.append(tmp_cmc.sum() / orig_cmc.sum())
    cmc = np.asarray(all_cmc).astype(np.float64).sum(0) / num_valid_q
    return cmc, float(np.mean(all_ap)), float(np.mean(all_inp))


def sysu_problems(trials: int, seed: int = 0) -> list[tuple]:
    """Per trial: distances [3803, 301], query/gallery ids and cameras (queries fixed, gallery redrawn)."""
    rng = np.random.default_rng(seed)
    q_pids = np.repeat(np.arange(96), 40)[:3803]
    q_cams = rng.choice([3, 6], size=q_pids.size)
    out = []
    for _ in range(trials):
        pairs = rng.choice(96 * 4, size=301, replace=False)  # 301 (id, RGB camera) pairs present
        g_pids, g_cams = pairs // 4, np.asarray([1, 2, 4, 5])[pairs % 4]
        dist = rng.random((q_pids.size, 301), dtype=np.float32) + 0.3 * (q_pids[:, None] != g_pids[None])
        out.append((dist.astype(np.float32), q_pids, g_pids, q_cams, g_cams))
    return out


def regdb_problem(seed: int = 1) -> tuple:
    """Distances [2060, 2060] with 206 ids x 10 images on both sides."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(206), 10)
    dist = rng.random((2060, 2060), dtype=np.float32) + 0.3 * (pids[:, None] != pids[None])
    return dist.astype(np.float32), pids, pids.copy(), None, None


def _max_diff(a: dict, b: tuple) -> float:
    return max(float(np.abs(a["cmc"] - b[0]).max()), abs(a["mAP"] - b[1]), abs(a["mINP"] - b[2]))


def bench(name: str, problems: list[tuple], protocol: str, device: torch.device, repeat: int) -> None:
    """Time the loop once and rank_metrics `repeat` times (best), check agreement, print the ratio."""
    tensors = [(torch.from_numpy(p[0]).to(device),) + p[1:] for p in problems]
    rank_metrics(*tensors[0][:3], *tensors[0][3:], protocol=protocol)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ref = [loop_eval(*p, protocol) for p in problems]
    t_loop = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        ours = [rank_metrics(t[0], t[1], t[2], t[3], t[4], protocol=protocol) for t in tensors]
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    diff = max(_max_diff(o, r) for o, r in zip(ours, ref))
    print(f"{name:<34} loop {t_loop * 1e3:9.1f} ms   rank_metrics ({device.type}) {best * 1e3:8.1f} ms   "
          f"speed-up {t_loop / best:6.1f}x   max |diff| {diff:.2e}   "
          f"(R1 {ours[0]['cmc'][0] * 100:.2f}, mAP {ours[0]['mAP'] * 100:.2f})")
    assert diff < 1e-6, f"{name}: rank_metrics disagrees with the loop by {diff}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    bench(f"SYSU 3803x301, {args.trials} trials", sysu_problems(args.trials), "sysu", device, args.repeat)
    bench("RegDB 2060x2060", [regdb_problem()], "regdb", device, args.repeat)
    d64 = [tuple([p[0].astype(np.float64)]) + p[1:] for p in sysu_problems(args.trials)]
    bench("SYSU float64 (sorting path)", d64, "sysu", device, args.repeat)


if __name__ == "__main__":
    main()
