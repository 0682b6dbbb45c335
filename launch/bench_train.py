"""Training throughput, measured side by side in one run.

CPU (always): the tiny config trained with 1 rank (`python launch/train.py`) and with 2 ranks
(`deepspeed --num_gpus 2 launch/train.py`, gloo) on the same synthetic shards; prints img/s of each
and the 2-rank / 1-rank ratio.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mip_dist.data.shards import write_shards  # noqa: E402
from mip_dist.data.synthetic import generate_synthetic  # noqa: E402
from mip_dist.engine.distributed import free_port  # noqa: E402

TRAIN = str(REPO / "launch" / "train.py")


def make_shards(work: Path, img_size: tuple[int, int], ids: int, per_camera: int) -> Path:
    """Synthetic SYSU-layout data and its shards under `work` (reused when already there)."""
    tag = f"{img_size[0]}x{img_size[1]}_{ids}_{per_camera}"
    root = generate_synthetic(str(work / f"synthetic_{tag}"), num_train_ids=ids, num_test_ids=4,
                              images_per_camera=per_camera, seed=0, layout="sysu", img_size=img_size)
    out = work / f"shards_{tag}"
    write_shards("synthetic", str(root), str(out), workers=2, progress=False)
    return out


def run(cmd: list[str], run_dir: Path, warmup: int, images_per_step: int) -> dict:
    """Launch one training run; img/s over the steps after `warmup` from its metrics.jsonl."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"benchmark run failed ({proc.returncode}): {' '.join(cmd)}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if r.get("kind") == "train" and r["step"] > warmup]
    seconds = sum(r["step_time"] for r in timed)
    return {"img_s": images_per_step * len(timed) / seconds, "steps": len(timed), "wall_s": wall,
            "data_wait": sum(r["data_wait"] * r["step_time"] for r in timed) / seconds}


def overrides(shards: Path, out: Path, name: str, steps: int, extra: list[str]) -> list[str]:
    """Common run overrides: one epoch of `steps` steps, log every step, no eval, no step checkpoints."""
    return [f"data.shards={shards}", f"data.steps_per_epoch={steps}", "train.epochs=1",
            "train.log_every=1", "train.eval_every_epochs=0", "train.ckpt_every_steps=0",
            f"train.output_dir={out}", f"train.run_name={name}", *extra]


def cpu_bench(args: argparse.Namespace, work: Path) -> None:
    """Tiny config, 1 rank vs 2 ranks (gloo) on this machine."""
    shards = make_shards(work, (128, 64), ids=16, per_camera=4)
    out = work / "runs"
    batch = 16
    extra = ["data.workers=1", "train.device=cpu", f"data.batch_size={batch}", *args.override]
    results: dict[str, list[dict]] = {"1 rank": [], "2 ranks": []}
    for rep in range(args.repeats):
        for label, world in (("1 rank", 1), ("2 ranks", 2)):
            name = f"cpu_{world}r_{rep}_{int(time.time())}"
            ov = overrides(shards, out, name, args.steps, extra)
            if world == 1:
                cmd = [sys.executable, TRAIN, "--config", "configs/tiny.yaml", *ov]
            else:
                cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                       str(free_port()), TRAIN, "--config", "configs/tiny.yaml", *ov]
            results[label].append(run(cmd, out / name, args.warmup, batch * world))
    report("CPU, tiny config (fp32, batch 16 per rank)", results, base="1 rank")


def gpu_bench(args: argparse.Namespace, work: Path) -> None:
    """Paper setting in bf16 on one GPU: fused Triton prompt attention vs literal concatenation."""
    shards = make_shards(work, (256, 128), ids=32, per_camera=4)
    out = work / "runs"
    batch = 64
    extra = ["data.workers=6", "train.precision=bf16", f"data.batch_size={batch}", "model.pretrained=",
             *args.override]
    results: dict[str, list[dict]] = {"concat": [], "triton": []}
    for rep in range(args.repeats):
        for impl in ("concat", "triton"):
            name = f"gpu_{impl}_{rep}_{int(time.time())}"
            cmd = [sys.executable, TRAIN, "--config", "configs/mip_vitb16_sysu.yaml",
                   *overrides(shards, out, name, args.steps, extra + [f"attention.impl={impl}"])]
            results[impl].append(run(cmd, out / name, args.warmup, batch))
    report("GPU, ViT-B/16 256x128 batch 64 bf16 (paper setting)", results, base="concat")


def report(title: str, results: dict[str, list[dict]], base: str) -> None:
    """Print img/s per configuration (best of repeats) and the ratio to `base`."""
    print(f"\n{title}")
    best = {k: max(v, key=lambda r: r["img_s"]) for k, v in results.items()}
    for label, r in best.items():
        print(f"  {label:>8}: {r['img_s']:8.1f} img/s  ({r['steps']} timed steps, data wait "
              f"{100 * r['data_wait']:.0f}%, run wall {r['wall_s']:.0f}s)")
    for label, r in best.items():
        if label != base:
            print(f"  ratio {label} / {base}: {r['img_s'] / best[base]['img_s']:.2f}x")


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
