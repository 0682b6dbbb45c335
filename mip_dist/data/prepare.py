"""Make the embedded synthetic dataset and its shards on demand, so a fresh clone can train at once."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from mip_dist.config import DataConfig

from .shards import INDEX_NAME, write_shards
from .synthetic import generate_synthetic, is_up_to_date

log = logging.getLogger(__name__)


def _generator_args(data_cfg: DataConfig) -> dict:
    """The synthetic generator's arguments for the data.synthetic_* settings (SYSU layout, training image size)."""
    return {"num_train_ids": data_cfg.synthetic_ids, "num_test_ids": data_cfg.synthetic_test_ids,
            "images_per_camera": data_cfg.synthetic_images_per_camera, "seed": data_cfg.synthetic_seed,
            "layout": "sysu", "img_size": tuple(data_cfg.img_size)}


def synthetic_shards_ready(data_cfg: DataConfig) -> bool:
    """True when data.shards has an index and data.root was written by this generator version with these settings."""
    return (Path(data_cfg.shards) / INDEX_NAME).is_file() and is_up_to_date(data_cfg.root, **_generator_args(data_cfg))


def ensure_synthetic_shards(data_cfg: DataConfig, *, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic SYSU-layout set at data.root (cached) and shard it into data.shards (idempotent)."""
    if data_cfg.dataset != "synthetic":
        raise ValueError(f"data.dataset is {data_cfg.dataset!r}: only the synthetic set is made on demand; "
                         "write real-dataset shards with launch/make_shards.py")
    if not data_cfg.root or not data_cfg.shards:
        raise ValueError("data.root and data.shards must both be set to make the synthetic shards")
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))
    generate_synthetic(data_cfg.root, **_generator_args(data_cfg), workers=workers)
    index = write_shards("synthetic", data_cfg.root, data_cfg.shards, workers=workers, seed=data_cfg.synthetic_seed,
                         progress=progress)
    log.info("synthetic shards ready at %s", Path(data_cfg.shards) / INDEX_NAME)
    return index
