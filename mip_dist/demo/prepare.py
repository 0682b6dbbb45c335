"""Make the embedded synthetic dataset and its shards on demand, so a fresh clone can train at once.

A run on `data.dataset: synthetic` (one shard folder, no data.train_urls) gets its data here before
training: local rank 0 writes, the other ranks wait. The demo writes only into folders it owns: data.root
must be absent, empty or a tree the synthetic generator wrote (its marker file), and data.shards absent,
empty or holding synthetic shards. Anything else (a real dataset's tree or shards) is refused with a
ConfigError before a single file is touched.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mip_dist.config import ConfigError, DataConfig
from mip_dist.data.layouts import DatasetError, detect_layout
from mip_dist.data.shards import ShardError, describe_index, inspect_folder, shards_up_to_date, write_shards

from .synthetic import MARKER, generate_synthetic, is_up_to_date

log = logging.getLogger(__name__)


def needs_synthetic_data(data_cfg: DataConfig) -> bool:
    """True when the run trains on the synthetic set, which is made on demand (not for URLs or a dataset list)."""
    return data_cfg.dataset == "synthetic" and not data_cfg.train_urls and not data_cfg.multi_dataset


def _generator_args(data_cfg: DataConfig) -> dict:
    """The synthetic generator's arguments for the data.synthetic_* settings (SYSU layout, training image size)."""
    return {"num_train_ids": data_cfg.synthetic_ids, "num_test_ids": data_cfg.synthetic_test_ids,
            "images_per_camera": data_cfg.synthetic_images_per_camera, "seed": data_cfg.synthetic_seed,
            "layout": "sysu", "img_size": tuple(data_cfg.img_size)}


def synthetic_shards_ready(data_cfg: DataConfig) -> bool:
    """True when data.root was written by this generator version with these settings and data.shards
    holds the shards of that very tree (so waiting ranks never read shards that are being replaced)."""
    if not data_cfg.root or not data_cfg.shards or not is_up_to_date(data_cfg.root, **_generator_args(data_cfg)):
        return False
    try:
        index = shards_up_to_date("synthetic", data_cfg.root, data_cfg.shards, seed=data_cfg.synthetic_seed,
                                  chunk_instances=data_cfg.num_instances)
    except (DatasetError, ShardError, OSError):  # the tree is being replaced right now
        return False
    return index is not None and index.get("dataset") == "synthetic"


def check_synthetic_targets(data_cfg: DataConfig) -> None:
    """Refuse (ConfigError naming the folder, what it holds and the key to change) folders the demo does not own."""
    if data_cfg.dataset != "synthetic":
        raise ConfigError(f"data.dataset is {data_cfg.dataset!r}: only the synthetic set is made on demand; "
                          "write real-dataset shards with launch/make_shards.py")
    if data_cfg.shards:
        _check_shards_folder(Path(data_cfg.shards))
    if not data_cfg.root or not data_cfg.shards:
        raise ConfigError("data.root and data.shards must both be set to make the synthetic shards")
    _check_root_folder(Path(data_cfg.root))


def _check_shards_folder(folder: Path) -> None:
    """data.shards must be absent, empty or hold synthetic shards (and nothing else)."""
    try:
        contents = inspect_folder(folder)
    except ShardError as exc:
        raise ConfigError(f"data.shards: {exc}") from exc
    if contents.empty:
        return
    found = contents.index.get("dataset") if contents.index is not None else None
    if found is not None and found != "synthetic":
        raise ConfigError(f"data.shards: {folder} holds {describe_index(contents.index)} according to its "
                          f"index.json; data.dataset is 'synthetic', whose demo data would replace them: set "
                          f"data.dataset={found} to train on these shards, or point data.shards at another folder")
    if contents.other or found is None:
        raise ConfigError(f"data.shards: {folder} holds {contents.describe()}, not the synthetic demo's shards; "
                          "the demo writes only into an empty folder or its own: point data.shards at another "
                          "folder, or set data.dataset to the dataset these files belong to")


def _check_root_folder(root: Path) -> None:
    """data.root must be absent, empty or a tree the synthetic generator wrote."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} exists and is not a folder")
    entries = sorted(p.name for p in root.iterdir())
    if not entries or MARKER in entries:
        return
    layout = detect_layout(str(root))
    if layout is not None:
        raise ConfigError(f"data.root: {root} holds a {layout} dataset tree, not one the synthetic generator wrote "
                          f"(no {MARKER}); set data.dataset={layout} and write its shards with "
                          "launch/make_shards.py, or point data.root at an empty folder for the synthetic set")
    raise ConfigError(f"data.root: {root} is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}) "
                      f"and was not written by the synthetic generator (no {MARKER}); point data.root at an empty "
                      "folder for the synthetic set, or set data.dataset to the dataset it holds")


def ensure_synthetic_shards(data_cfg: DataConfig, *, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic SYSU-layout set at data.root (cached) and shard it into data.shards (idempotent)."""
    check_synthetic_targets(data_cfg)
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))
    generate_synthetic(data_cfg.root, **_generator_args(data_cfg), workers=workers)
    index = write_shards("synthetic", data_cfg.root, data_cfg.shards, workers=workers, seed=data_cfg.synthetic_seed,
                         progress=progress, chunk_instances=data_cfg.num_instances)
    log.info("synthetic shards ready at %s", data_cfg.shards)
    return index


def prepare_synthetic(data_cfg: DataConfig, world_size: int, wait_s: float = 1800.0) -> None:
    """Make (or remake, after a generator change) the synthetic set and its shards: local rank 0 writes, others
    wait; every rank first refuses folders the demo does not own (a real dataset's tree or shards), before any write."""
    check_synthetic_targets(data_cfg)
    if synthetic_shards_ready(data_cfg):
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 or world_size == 1:
        log.info("preparing the synthetic visible-infrared set at %s -> shards %s", data_cfg.root, data_cfg.shards)
        ensure_synthetic_shards(data_cfg, progress=int(os.environ.get("RANK", "0")) == 0)
        return
    deadline = time.monotonic() + wait_s
    while not synthetic_shards_ready(data_cfg):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {wait_s:.0f}s for local rank 0 to write {Path(data_cfg.shards) / 'index.json'}")
        time.sleep(2.0)
