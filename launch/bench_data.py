"""Benchmark: decoded + augmented training images per second, shard stream vs a folder of JPEGs.

Both sides run the same torchvision v2 training transforms, batch size and DataLoader worker count
on the same synthetic SYSU-layout set (generated and sharded on first use, cached afterwards):
- shard stream: `build_train_stream` (webdataset tars -> PK buffer -> decode -> augment), with its shard
  verification (sha256 of each tar's bytes as they are read) and without it: what verification costs;
- folder: an ImageFolder-like map-style Dataset over the image files, shuffled DataLoader, decoding
  with PIL as torchvision's ImageFolder does, and again with the stream's decoder (isolates I/O).
Runs are interleaved and each is repeated; the best of the repetitions is reported, since the
machine may be shared. The first batch of every run (worker start, buffer fill) is not timed. The stream
hands over uint8 images (its float steps, normalise / erase / grey, run later on the training device),
the folder float32 ones: each side is timed up to what it gives the trainer.

    python launch/bench_data.py                 # 1 and 2 workers, 256x128, batch 64
    python launch/bench_data.py --workers 1 2 4 --batches 40
    python launch/bench_data.py --workers 8 14 --seconds 30 --json rows.json   # the stream alone, timed
    python launch/bench_data.py --scale         # PK batch quality vs number of identities (no images)

`--seconds` times the training stream alone (`build_train_stream`, pinned batches when CUDA is there) for
about that long per worker count, after its first batch; it prints a line per worker count (img/s, img/s
per worker, bytes per batch for the device) and, with `--json`, rewrites {"rows": [{"workers", "img_s",
"img_s_per_worker", "batches", "seconds"}, ...]} after each row, so an interrupted run keeps its rows.

`--scale` drives the stream's own PK buffer and batcher with metadata-only samples (10 visible + 10
infrared per identity, 8 x (4 + 4) batches, 2,000-sample buffer) over the two training layouts a shard
writer can produce: globally shuffled (index version 1) and identity chunks (version 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from mip_dist.config import DataConfig
from mip_dist.data.layouts import read_dataset
from mip_dist.data.shards import write_shards
from mip_dist.data.stream import build_train_stream
from mip_dist.data.transforms import IMAGE_OPS, decode_rgb, decode_rgb_pil, train_transform
from mip_dist.demo.synthetic import MARKER, generate_synthetic


class FolderDataset(Dataset):
    """ImageFolder-like: one file read + decode + transform per item."""

    def __init__(self, paths: list[str], labels: list[int], img_size: tuple[int, int],
                 decode: Callable[[bytes, str], torch.Tensor]) -> None:
        self.paths, self.labels, self.decode = paths, labels, decode
        self.tf = train_transform(img_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with open(self.paths[i], "rb") as f:
            data = f.read()
        return self.tf(self.decode(data, self.paths[i].rsplit(".", 1)[-1])), self.labels[i]


def timed(batches: Iterable, n: int, batch_size: int) -> float:
    """Images/s over batches 2..n+1 (the first batch includes start-up)."""
    it = iter(batches)
    next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch_size / (time.perf_counter() - start)


def device_bytes(batch: dict) -> tuple[int, int]:
    """(bytes of the tensors the trainer copies to the device for the images, those of float32 images)."""
    images = batch["images"]
    ops = sum(batch[k].nbytes for k in IMAGE_OPS if k in batch)
    return images.nbytes + ops, images.numel() * 4


def stream_rate(cfg: DataConfig, seconds: float) -> tuple[dict, float, float]:
    """One worker count's JSON row, read for about `seconds` after the stream's first batch, and the mean
    bytes per batch the trainer copies for its images (and as float32 images)."""
    it = iter(build_train_stream(cfg, seed=0, rank=0, world_size=1))
    next(it)
    n, moved, as_float = 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        got, full = device_bytes(next(it))
        n, moved, as_float = n + 1, moved + got, as_float + full
    elapsed = time.perf_counter() - start
    img_s = n * cfg.batch_size / elapsed
    row = {"workers": cfg.workers, "img_s": round(img_s, 1), "img_s_per_worker": round(img_s / max(cfg.workers, 1), 1),
           "batches": n, "seconds": round(elapsed, 3)}
    return row, moved / max(n, 1), as_float / max(n, 1)


def run_timed(shards: Path, args: argparse.Namespace, size: tuple[int, int]) -> int:
    """Time the stream per worker count; print a line and rewrite the JSON after each."""
    rows = []
    for w in args.workers:
        cfg = DataConfig(shards=str(shards), batch_size=args.batch_size, num_instances=args.num_instances,
                         img_size=size, workers=w, buffer_size=1024, steps_per_epoch=10**9)
        row, moved, as_float = stream_rate(cfg, args.seconds)
        print(f"workers {w:>3}: {row['img_s']:8.1f} img/s, {row['img_s_per_worker']:7.1f} img/s per worker "
              f"({row['batches']} batches in {row['seconds']:.1f} s); {moved / 2**20:.2f} MiB per batch to the "
              f"device ({as_float / 2**20:.2f} MiB as float32)", flush=True)
        rows.append(row)
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
            tmp.replace(args.json)
    return 0


def run_scale(ids_list: list[int], batches: int) -> int:
    """Print the PK batch-quality table for each identity count and layout, side by side."""
    from mip_dist.data.pk_sim import simulate

    print("identities  layout     K  dup/batch  short ids   ids seen  read/batch  unused  ms/batch  batches")
    for ids in ids_list:
        n = batches or (0 if ids <= 5000 else 2000)
        runs = [("shuffled", 4, 4), ("chunks", 4, 4)] + ([("chunks", 8, 4)] if ids == ids_list[0] else [])
        for layout, k, chunk_k in runs:
            st = simulate(ids, 10, layout=layout, k=k, chunk_k=chunk_k, batches=n, num_ids=64 // (2 * k))
            print(f"{ids:>10}  {layout:<9} {k:>2}  {st.duplicate_fraction:>8.1%}  {st.short_identity_fraction:>9.1%}"
                  f"  {st.identities_covered:>9.1%}  {st.samples_read_per_batch:>10.1f}  {st.unused_read_fraction:>6.1%}"
                  f"  {st.ms_per_batch:>8.2f}  {st.batches:>7}")
    print("(one epoch = all images / 64 up to 5,000 identities, else a 2,000-batch window, so 'ids seen' is not an "
          "epoch's coverage there; K 8 on chunks of 4: a run whose data.num_instances exceeds the shards' "
          "--chunk-instances)")
    buffer = DataConfig.buffer_size
    print(f"buffer memory: at most data.buffer_size = {buffer:,} samples per dataset per loader worker, each its "
          f"stored image bytes plus its metadata; e.g. {buffer * 20 / 1024:.0f} MiB at 20 KB per stored image, "
          f"{buffer * 100 / 1024:.0f} MiB at 100 KB; independent of the number of identities")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Generate/shard if needed, run the interleaved measurements, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mip_bench_data"))
    p.add_argument("--ids", type=int, default=120, help="training identities (plus 40 test)")
    p.add_argument("--images-per-camera", type=int, default=4)
    p.add_argument("--img-size", type=int, nargs=2, default=[256, 128])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-instances", type=int, default=4)
    p.add_argument("--batches", type=int, default=20, help="timed batches per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=None,
                   help="time the training stream alone for about this long per worker count")
    p.add_argument("--json", default=None, help="with --seconds: write the rows here (rewritten after each)")
    p.add_argument("--scale", action="store_true", help="simulate PK batch quality at many identity counts")
    p.add_argument("--scale-ids", type=int, nargs="+", default=[400, 5000, 50000])
    p.add_argument("--scale-batches", type=int, default=0,
                   help="batches per simulation (0: one epoch up to 5,000 identities, 2,000 batches above)")
    args = p.parse_args(argv)
    if args.scale:
        return run_scale(args.scale_ids, args.scale_batches)
    if args.json and args.seconds is None:
        p.error("--json needs --seconds")
    torch.set_num_threads(1)
    work = Path(args.work)
    size = (args.img_size[0], args.img_size[1])

    root = work / f"synthetic_{args.ids}_{args.images_per_camera}_{size[0]}x{size[1]}"
    fresh = not (root / MARKER).is_file()
    start = time.perf_counter()
    generate_synthetic(str(root), num_train_ids=args.ids, num_test_ids=40, images_per_camera=args.images_per_camera,
                       img_size=size, workers=min(len(os.sched_getaffinity(0)), 8))
    gen_s = time.perf_counter() - start
    records = [r for r in read_dataset("synthetic", str(root)) if r.split == "train"]
    n_images = len(records) + 40 * 6 * args.images_per_camera
    print(f"synthetic set: {n_images} images at {size[0]}x{size[1]} "
          + (f"generated in {gen_s:.1f}s on {len(os.sched_getaffinity(0))} cores" if fresh else "(cached)"))
    shards = work / (root.name + "_shards")
    start = time.perf_counter()
    index = write_shards("synthetic", str(root), str(shards), workers=2, progress=False)
    print(f"shards: {len(index['shards'])} in {shards} ({time.perf_counter() - start:.1f}s, cached if unchanged)")
    if args.seconds is not None:
        return run_timed(shards, args, size)

    label_of = {int(k): v for k, v in index["identity_map"].items()}
    paths, labels = [r.path for r in records], [label_of[r.pid] for r in records]
    b = args.batch_size
    results: dict[tuple[str, int], float] = {}

    def run_stream(w: int, verify: bool = True) -> float:
        cfg = DataConfig(shards=str(shards), batch_size=b, num_instances=args.num_instances, img_size=size,
                         workers=w, buffer_size=1024, steps_per_epoch=args.batches + 1)
        return timed(build_train_stream(cfg, seed=0, rank=0, world_size=1, verify=verify), args.batches, b)

    def run_folder(w: int, decode: Callable[[bytes, str], torch.Tensor]) -> float:
        ds = FolderDataset(paths, labels, size, decode)
        loader = DataLoader(ds, batch_size=b, shuffle=True, num_workers=w, drop_last=True,
                            generator=torch.Generator().manual_seed(0), persistent_workers=False)
        return timed(loader, args.batches, b)

    variants = {"shard stream": run_stream,
                "shard stream, no verify": lambda w: run_stream(w, verify=False),
                "folder, PIL decode": lambda w: run_folder(w, lambda d, e: decode_rgb_pil(d)),
                "folder, same decoder": lambda w: run_folder(w, decode_rgb)}
    for rep in range(args.repeats):
        for w in args.workers:
            for name, fn in variants.items():
                ips = fn(w)
                results[(name, w)] = max(results.get((name, w), 0.0), ips)
                print(f"  rep {rep} workers {w} {name:22s} {ips:8.1f} img/s", flush=True)

    print(f"\nDecoded + augmented images/s at {size[0]}x{size[1]}, batch {b}, best of {args.repeats} "
          f"(higher is better):")
    print(f"{'workers':>7} | {'shard stream':>12} | {'folder (PIL)':>12} | {'ratio':>5} | "
          f"{'folder (same decoder)':>21} | {'ratio':>5}")
    for w in args.workers:
        s, f1, f2 = (results[("shard stream", w)], results[("folder, PIL decode", w)],
                     results[("folder, same decoder", w)])
        print(f"{w:>7} | {s:12.1f} | {f1:12.1f} | {s / f1:4.2f}x | {f2:21.1f} | {s / f2:4.2f}x")
    print(f"\nshard verification (sha256 while reading), images/s with and without it, best of {args.repeats}:")
    for w in args.workers:
        on, off = results[("shard stream", w)], results[("shard stream, no verify", w)]
        print(f"{w:>7} workers | verify on {on:9.1f} | verify off {off:9.1f} | cost {1 - on / off:6.1%}")
    if len(args.workers) > 1:
        w0, w1 = args.workers[0], args.workers[-1]
        for name in variants:
            print(f"scaling {w0} -> {w1} workers, {name}: {results[(name, w1)] / results[(name, w0)]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
