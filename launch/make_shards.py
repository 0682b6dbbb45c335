"""Write a VI-ReID dataset (SYSU-MM01, RegDB, LLCM or synthetic) as webdataset shards + index.json.

    python launch/make_shards.py --dataset sysu --root /data/SYSU-MM01 --out shards/sysu
    python launch/make_shards.py --dataset regdb --root /data/RegDB --regdb-split 3 --out shards/regdb3
    python launch/make_shards.py --dataset synthetic --root runs/data/synthetic_sysu --out runs/data/synthetic_sysu_shards
    python launch/make_shards.py --verify shards/sysu      # every listed shard present, its size and sha256

For `synthetic`, a root without a dataset is first filled by the synthetic generator (defaults of
`generate_synthetic`, or the --synthetic-* options). Re-running on unchanged input does nothing.
An --out that holds other shards (another dataset, split, input or settings) is refused unless
--overwrite is given; the new shards are then written beside it and swapped in only when complete.
A folder with files that are not shards is never written into. Errors: one `error:` line naming the
file, key or value, exit 2; the traceback only with --debug or MIP_DEBUG=1.

--verify DIR reads every shard DIR/index.json lists and prints one line per shard that is missing, of
another size or of another sha256, then a summary; it exits 1 if any shard is bad, 0 if all match.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from mip_dist.cli import debug_requested, report_error
from mip_dist.data.layouts import DatasetError
from mip_dist.data.shards import (DEFAULT_CHUNK_INSTANCES, DEFAULT_MAX_SHARD_BYTES, DEFAULT_MAX_SHARD_SAMPLES,
                                  INDEX_NAME, ShardError, verify_shards, write_shards)
from mip_dist.demo.synthetic import MARKER, generate_synthetic

EXIT_BAD_SHARDS = 1  # --verify found a shard that does not match index.json (2 stays "could not run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["sysu", "regdb", "llcm", "synthetic"])
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--out", help="output folder for *.tar and index.json")
    p.add_argument("--verify", metavar="DIR", help="check the shards in DIR against its index.json (size, sha256) "
                                                    "and write nothing")
    p.add_argument("--regdb-split", type=int, default=1, help="RegDB split 1..10")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    p.add_argument("--max-shard-samples", type=int, default=DEFAULT_MAX_SHARD_SAMPLES)
    p.add_argument("--workers", type=int, default=min(len(os.sched_getaffinity(0)), 8))
    p.add_argument("--seed", type=int, default=0, help="seed of the training-sample shuffle")
    p.add_argument("--chunk-instances", type=int, default=DEFAULT_CHUNK_INSTANCES,
                   help="training samples are written in identity chunks of this many visible + infrared "
                        "images (use the K of your PK batches, data.num_instances)")
    p.add_argument("--synthetic-ids", type=int, default=120, help="synthetic: training identities")
    p.add_argument("--synthetic-test-ids", type=int, default=40, help="synthetic: test identities")
    p.add_argument("--synthetic-images-per-camera", type=int, default=4)
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards of another dataset, split, input or settings already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    args = p.parse_args(argv)
    if args.verify is None:
        missing = [f"--{k}" for k in ("dataset", "root", "out") if getattr(args, k) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)} (or --verify DIR)")
    return args


class UsageError(ValueError):
    """A command-line value that cannot work; the message names the option."""


def check_args(args: argparse.Namespace) -> None:
    """Values that would fail deep inside the writer, refused up front with the option named."""
    if not 1 <= args.regdb_split <= 10:
        raise UsageError(f"--regdb-split {args.regdb_split}: RegDB has splits 1..10")
    for name in ("max_shard_bytes", "max_shard_samples", "workers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.dataset != "synthetic" and not Path(args.root).is_dir():
        raise UsageError(f"--root {args.root}: no such folder (the {args.dataset} dataset root)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")


def verify(folder: str, workers: int, debug: bool) -> int:
    """--verify: a line per bad shard and a summary; 1 if any shard is bad, 2 if the index cannot be read."""
    try:
        checked, bad = verify_shards(folder, workers)
    except Exception as exc:  # noqa: BLE001 - every failure is one line; --debug shows the traceback
        return report_error(exc, debug, known=(ShardError,))
    for line in bad:
        print(f"bad shard {line}")
    if bad:
        print(f"{len(bad)} of {checked} shards in {folder} do not match its {INDEX_NAME}: rewrite them with "
              "make_shards.py ... --overwrite, or restore them from a good copy")
        return EXIT_BAD_SHARDS
    print(f"all {checked} shards in {folder} match its {INDEX_NAME} (size and sha256)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Generate (synthetic only, if absent), shard, print a summary; or, with --verify, check a folder."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verify is not None:
        return verify(args.verify, args.workers, debug_requested(args.debug))
    start = time.time()
    try:
        check_args(args)
        if args.dataset == "synthetic" and not (Path(args.root) / MARKER).is_file():  # refuses a tree it did not write
            print(f"generating the synthetic dataset at {args.root} ...")
            generate_synthetic(args.root, num_train_ids=args.synthetic_ids, num_test_ids=args.synthetic_test_ids,
                               images_per_camera=args.synthetic_images_per_camera, seed=args.synthetic_seed,
                               workers=args.workers)
        index = write_shards(args.dataset, args.root, args.out, regdb_split=args.regdb_split,
                             max_shard_bytes=args.max_shard_bytes, max_shard_samples=args.max_shard_samples,
                             workers=args.workers, seed=args.seed, progress=not args.quiet,
                             overwrite=args.overwrite, replace_outdated=False,
                             chunk_instances=args.chunk_instances)
    except Exception as exc:  # noqa: BLE001 - every failure is one line; --debug shows the traceback
        return report_error(exc, debug_requested(args.debug), known=(DatasetError, ShardError, FileExistsError, UsageError))
    c = index["counts"]
    print(f"{args.dataset}: {c['train']['total']} train images ({index['num_classes']} identities), "
          f"{c['test']['total']} test images, {len(index['shards'])} shards, "
          f"{len(index['skipped'])} skipped, in {time.time() - start:.1f}s -> {args.out}")
    for s in index["skipped"]:
        print(f"  skipped {s['path']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
