"""Training throughput, measured side by side in one run.

CPU (always): the tiny config trained with 1 rank (`python launch/train.py`, all cores, and one core)
and with 2 ranks (`deepspeed --num_gpus 2 launch/train.py`, gloo, half the cores each) on the same
synthetic shards; prints img/s of each and the ratios to one rank on one core. (On a machine shared
with other work, a multi-threaded single process can be far slower than its thread count suggests:
idle OpenMP threads spin; the per-configuration thread budgets make that visible.)
GPU (when CUDA is present): the paper setting (ViT-B/16, 256x128, batch 64, bf16) on one GPU with
attention.impl=triton vs attention.impl=concat; prints img/s of each and the ratio.

    python launch/bench_train.py [--steps 12] [--warmup 3] [--repeats 1] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mip_dist.config import load_config
from mip_dist.demo.prepare import ensure_synthetic_shards
from mip_dist.engine.distributed import free_port

REPO = Path(__file__).resolve().parent.parent

TRAIN = str(REPO / "launch" / "train.py")


def synthetic_data(config: str, work: Path, tag: str, ids: int, per_camera: int, extra: list[str]) -> list[str]:
    """Overrides pointing a config at a synthetic SYSU-layout set under `work`, made now (reused if there)."""
    ov = ["data.dataset=synthetic", f"data.root={work / ('synthetic_' + tag)}",
          f"data.shards={work / ('shards_' + tag)}", f"data.synthetic_ids={ids}", "data.synthetic_test_ids=4",
          f"data.synthetic_images_per_camera={per_camera}"]
    ensure_synthetic_shards(load_config(REPO / config, ov + extra).data, progress=False)
    return ov


def run(cmd: list[str], run_dir: Path, warmup: int, images_per_step: int, threads: int | None = None) -> dict:
    """Launch one training run (OMP_NUM_THREADS=threads per rank if given); img/s over the steps after
    `warmup` from its metrics.jsonl."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"benchmark run failed ({proc.returncode}): {' '.join(cmd)}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if r.get("kind") == "train" and r["step"] > warmup]
    seconds = sum(r["step_time"] for r in timed)
    return {"img_s": images_per_step * len(timed) / seconds, "steps": len(timed), "wall_s": wall,
            "data_wait": sum(r["data_wait"] * r["step_time"] for r in timed) / seconds}


def overrides(data: list[str], out: Path, name: str, steps: int, extra: list[str]) -> list[str]:
    """Common run overrides: one epoch of `steps` steps, log every step, no eval, no step checkpoints."""
    return [*data, f"data.steps_per_epoch={steps}", "train.epochs=1", "train.log_every=1",
            "train.eval_every_epochs=0", "train.ckpt_every_steps=0", f"train.output_dir={out}",
            f"train.run_name={name}", *extra]


def cpu_bench(args: argparse.Namespace, work: Path) -> None:
    """Tiny config on this machine's cores: 1 rank (all cores, and 1 core) vs 2 ranks (half the cores each)."""
    out = work / "runs"
    batch = 16
    cores = os.cpu_count() or 2
    extra = ["data.workers=1", "train.device=cpu", f"data.batch_size={batch}", *args.override]
    data = synthetic_data("configs/tiny.yaml", work, "tiny", ids=32, per_camera=4, extra=extra)
    half = max(1, cores // 2)
    plans = {f"1 rank x {cores} threads": (1, cores), f"2 ranks x {half} threads": (2, half),
             "1 rank x 1 thread": (1, 1)}
    results: dict[str, list[dict]] = {k: [] for k in plans}
    for rep in range(args.repeats):
        for label, (world, threads) in plans.items():
            name = f"cpu_{world}r{threads}t_{rep}_{time.time_ns()}"
            ov = overrides(data, out, name, args.steps, extra)
            if world == 1:
                cmd = [sys.executable, TRAIN, "--config", "configs/tiny.yaml", *ov]
            else:
                cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port",
                       str(free_port()), TRAIN, "--config", "configs/tiny.yaml", *ov]
            results[label].append(run(cmd, out / name, args.warmup, batch * world, threads))
    best = report(f"CPU ({cores} cores), tiny config (fp32, batch {batch} per rank, gloo)", results,
                  base="1 rank x 1 thread")
    one, two = best[f"1 rank x {cores} threads"]["img_s"], best[f"2 ranks x {half} threads"]["img_s"]
    print(f"  ratio 2 ranks / 1 rank on the same {cores} cores: {two / one:.2f}x")


def gpu_bench(args: argparse.Namespace, work: Path) -> None:
    """Paper setting in bf16 on one GPU: fused Triton prompt attention vs literal concatenation."""
    out = work / "runs"
    batch = 64
    extra = ["data.workers=6", "train.precision=bf16", f"data.batch_size={batch}", "model.pretrained=",
             *args.override]
    data = synthetic_data("configs/mip_vitb16_sysu.yaml", work, "vitb", ids=32, per_camera=4, extra=extra)
    results: dict[str, list[dict]] = {"concat": [], "triton": []}
    for rep in range(args.repeats):
        for impl in ("concat", "triton"):
            name = f"gpu_{impl}_{rep}_{time.time_ns()}"
            cmd = [sys.executable, TRAIN, "--config", "configs/mip_vitb16_sysu.yaml",
                   *overrides(data, out, name, args.steps, extra + [f"attention.impl={impl}"])]
            results[impl].append(run(cmd, out / name, args.warmup, batch))
    report("GPU, ViT-B/16 256x128 batch 64 bf16 (paper setting)", results, base="concat")


def report(title: str, results: dict[str, list[dict]], base: str) -> dict[str, dict]:
    """Print img/s per configuration (best of repeats) and the ratio to `base`; returns the best runs."""
    print(f"\n{title}")
    best = {k: max(v, key=lambda r: r["img_s"]) for k, v in results.items()}
    for label, r in best.items():
        print(f"  {label:>22}: {r['img_s']:8.1f} img/s  ({r['steps']} timed steps, data wait "
              f"{100 * r['data_wait']:.0f}%, run wall {r['wall_s']:.0f}s)")
    for label, r in best.items():
        if label != base:
            print(f"  ratio {label} / {base}: {r['img_s'] / best[base]['img_s']:.2f}x")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (best is reported)")
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU comparison even if CUDA is present")
    p.add_argument("override", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="mip_bench_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
        cpu_bench(args, work)
        if torch.cuda.is_available() and not args.cpu_only:
            gpu_bench(args, work)


if __name__ == "__main__":
    main()
