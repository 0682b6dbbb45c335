"""Benchmark: the demo's training cost, variants side by side, optionally as on a CPU without AVX-512.

Each variant is configs/demo.yaml plus key=value overrides (`--variant "name: k=v k=v"`, repeatable; the
first variant is the base). One training step = forward + MIP loss + backward + the trainer's optimizer
step on a batch of `data.batch_size` random images, the demo's model and thread count. The variants are
timed in turns, round after round, in one process; printed: img/s (best round), its ratio to the base's,
the step count of the variant's schedule, its projected training time at that rate and that time as a
fraction of the base's.

`--isa avx2` re-runs this script with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2, so PyTorch, oneDNN and MKL use 256-bit vectors as on a CPU without
AVX-512 (the demo's time promise is for such a 2-core CPU).

`--stem` times the demo's convolutional stem alone (forward + backward), its input in the plain NCHW layout
against channels-last (the layout `ConvStemEmbed` hands its convolutions).

`--data` times the demo's data path instead, in turns: its train stream per batch without and with
`data.cache_mb` (epochs after the first, which fills the cache), and one batch's augmentation by
torchvision image by image and by `TrainAugment` (on the demo's synthetic set, made if missing).

    python launch/bench_demo.py --isa avx2 --variant "before: model.stem_strides=[2,2,1,2,1,2] ..."
    python launch/bench_demo.py --isa avx2 --data
    python launch/bench_demo.py --isa avx2 --stem
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mip_dist.config import Config, load_config
from mip_dist.data.stream import TrainStream, build_train_stream
from mip_dist.data.transforms import RandomChannel, TrainAugment, train_transform
from mip_dist.demo.people import SYSU_STYLES
from mip_dist.demo.prepare import prepare_synthetic
from mip_dist.engine.optim import build_optimizer, build_param_groups
from mip_dist.losses import MIPLoss
from mip_dist.model import build_model, param_category

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name: k=v k=v' -> (name, overrides); a bare 'name' has no overrides."""
    name, _, rest = text.partition(":")
    return name.strip(), shlex.split(rest)


def steps_of(cfg: Config) -> int:
    """Optimizer steps of the configured schedule (the synthetic set's train images, PK batches)."""
    images = cfg.data.synthetic_ids * len(SYSU_STYLES) * cfg.data.synthetic_images_per_camera
    return cfg.train.epochs * (images // cfg.data.batch_size)


class Step:
    """One variant's model, loss, optimizer and batch; calling it runs one timed training step."""

    def __init__(self, cfg: Config) -> None:
        torch.manual_seed(0)
        self.model = build_model(cfg.model, cfg.attention, num_classes=cfg.data.synthetic_ids,
                                 num_cameras=len(SYSU_STYLES))
        self.criterion = MIPLoss(cfg.loss)
        self.optimizer = build_optimizer(build_param_groups(self.model.named_parameters(), cfg.optim, param_category),
                                         cfg.optim)  # the trainer's optimizer and parameter groups
        b, k = cfg.data.batch_size, cfg.data.num_instances
        self.images = torch.randn(b, 3, *cfg.model.img_size)
        self.pids = torch.arange(b) // (2 * k)
        self.modality = (torch.arange(b) // k) % 2
        self.camera = torch.where(self.modality == 0, 0, 2)

    def __call__(self) -> float:
        """Seconds of one forward + loss + backward + AdamW step."""
        t0 = time.perf_counter()
        loss, _ = self.criterion(self.model(self.images, self.modality, self.camera), self.pids, self.modality,
                                 epoch=1000)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - t0


def bench(variants: list[tuple[str, list[str]]], rounds: int, steps: int, warmup: int) -> None:
    """Time the variants in turns; print img/s, ratios and projected training times."""
    cfgs = {name: load_config(DEMO_CONFIG, ov) for name, ov in variants}
    runs = {name: Step(cfg) for name, cfg in cfgs.items()}
    for run in runs.values():
        for _ in range(warmup):
            run()
    best = best_in_turns({name: (lambda _, run=run: sum(run() for _ in range(steps)) / steps)
                          for name, run in runs.items()}, rounds)
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    print(f"demo training step, {torch.get_num_threads()} threads, ATen ISA {isa}, best of {rounds} rounds "
          f"x {steps} steps")
    base = variants[0][0]
    for name, _ in variants:
        cfg = cfgs[name]
        img_s = cfg.data.batch_size / best[name]
        total = steps_of(cfg) * best[name]
        base_img_s = cfgs[base].data.batch_size / best[base]
        print(f"  {name:>12}: {img_s:7.1f} img/s  x{img_s / base_img_s:.2f} vs {base}  "
              f"{steps_of(cfg)} steps of {cfg.data.batch_size} -> {total / 60:5.1f} min of training "
              f"({total / (steps_of(cfgs[base]) * best[base]):.2f} of {base}'s)")


def bench_stem(rounds: int, steps: int, warmup: int) -> None:
    """The demo's conv stem, forward + backward, on NCHW and channels-last input, timed in turns."""
    cfg = load_config(DEMO_CONFIG, [])
    stem = Step(cfg).model.patch_embed.proj
    images = torch.randn(cfg.data.batch_size, 3, *cfg.model.img_size)
    layouts = {"NCHW": images, "channels-last": images.contiguous(memory_format=torch.channels_last)}
    runs = {name: (lambda x=x: stem(x).sum().backward()) for name, x in layouts.items()}
    for run in runs.values():
        _repeat(run, warmup)
    best = best_in_turns({name: (lambda _, run=run: _repeat(run, steps) / steps) for name, run in runs.items()},
                         rounds)
    print(f"demo conv stem, forward + backward, batch {cfg.data.batch_size}, {torch.get_num_threads()} threads, "
          f"best of {rounds} rounds x {steps} steps")
    for name in runs:
        print(f"  {name:>14}: {best[name] * 1e3:6.2f} ms  x{best[name] / best['NCHW']:.2f} of NCHW's time")


def bench_data(data_root: str, rounds: int, batches: int) -> None:
    """The demo's data path, ms per batch: the stream without and with its cache, torchvision's per-image
    augmentation against TrainAugment's; each pair timed in turns, best round kept."""
    cfg = load_config(DEMO_CONFIG, [f"data.root={data_root}/synthetic_sysu", f"data.shards={data_root}/shards"]
                      if data_root else [])
    prepare_synthetic(cfg.data, world_size=1)
    streams = {"stream, no cache": build_train_stream(dataclasses.replace(cfg.data, cache_mb=0), seed=0, rank=0,
                                                      world_size=1),
               f"stream, data.cache_mb={cfg.data.cache_mb}": build_train_stream(cfg.data, seed=0, rank=0, world_size=1)}
    for stream in streams.values():
        _batches(stream, 0, stream.steps_per_epoch)  # the first epoch fills the cache
    b, size = cfg.data.batch_size, cfg.data.img_size
    images = [torch.randint(0, 256, (3, *size), dtype=torch.uint8) for _ in range(b)]
    visible = [i < b // 2 for i in range(b)]
    chain, channel = train_transform(size, cfg.data.augment), RandomChannel(0.5)
    augment = TrainAugment(size, cfg.data.augment, cfg.data.channel_aug)
    augments = {
        "augment, torchvision per image": lambda: torch.stack(
            [chain(channel(img) if vis and cfg.data.channel_aug else img) for img, vis in zip(images, visible)]),
        "augment, TrainAugment": lambda: augment(images, visible),
    }
    best = best_in_turns({**{name: (lambda r, stream=stream: _batches(stream, r + 1, batches) / batches)
                             for name, stream in streams.items()},
                          **{name: (lambda _, run=run: _repeat(run, batches) / batches)
                             for name, run in augments.items()}}, rounds)
    print(f"demo data path, batches of {b}, {torch.get_num_threads()} threads, best of {rounds} rounds x {batches} "
          "batches")
    for pair in (list(streams), list(augments)):
        for name in pair:
            print(f"  {name:>32}: {best[name] * 1e3:6.2f} ms/batch  x{best[pair[0]] / best[name]:.2f} vs the first")


def best_in_turns(timed: dict[str, Callable[[int], float]], rounds: int) -> dict[str, float]:
    """Each entry's least seconds over `rounds` rounds (it gets the round's index); the entries take turns, in
    reverse order every other round, so a drift in the machine's speed reaches them all alike."""
    best = {name: float("inf") for name in timed}
    for r in range(rounds):
        for name in (list(timed) if r % 2 == 0 else list(timed)[::-1]):
            best[name] = min(best[name], timed[name](r))
    return best


def _batches(stream: TrainStream, epoch: int, n: int) -> float:
    """Seconds to draw n batches of the given epoch."""
    stream.set_epoch(epoch)
    t0, it = time.perf_counter(), iter(stream)
    for _ in range(n):
        next(it)
    return time.perf_counter() - t0


def _repeat(run: Callable[[], object], n: int) -> float:
    """Seconds of n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="'name: key=value ...' (repeatable; "
                    "the first is the base; default: the demo alone)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores, like the demo)")
    ap.add_argument("--isa", choices=["default", "avx2"], default="default", help="avx2: run as on a CPU "
                    "without AVX-512 (re-executes this script with the ISA variables set)")
    ap.add_argument("--data", action="store_true", help="time the data path (stream cache, batched augmentation)")
    ap.add_argument("--stem", action="store_true", help="time the conv stem on NCHW vs channels-last input")
    ap.add_argument("--data-root", default="", help="--data: a folder for the synthetic set (default: the demo's "
                    "own, made if missing)")
    ap.add_argument("--batches", type=int, default=40, help="--data: timed batches per variant per round")
    args = ap.parse_args()
    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env={**os.environ, **AVX2_ENV}).returncode)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.data:
        bench_data(args.data_root, args.rounds, args.batches)
        return
    if args.stem:
        bench_stem(args.rounds, args.steps, args.warmup)
        return
    variants = [parse_variant(v) for v in args.variant] or [("demo", [])]
    bench(variants, args.rounds, args.steps, args.warmup)


if __name__ == "__main__":
    main()
