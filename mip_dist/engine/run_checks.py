"""Checks of a run config against the shards it will read, done before any process group starts."""
from __future__ import annotations

from mip_dist.config import Config, ConfigError
from mip_dist.data.shards import ShardError, check_regdb_split
from mip_dist.eval.protocols import DATASET_PROTOCOLS


def check_shards_for_run(cfg: Config, index: dict, shards_dir: str) -> None:
    """Refuse, naming the key, a run that would fail later on these shards: another dataset than
    data.dataset, a protocol the final evaluation cannot apply, another RegDB split, or a batch
    needing more identities than the training set has."""
    dataset = str(index.get("dataset"))
    if cfg.data.dataset != dataset:
        raise ConfigError(f"data.dataset: {cfg.data.dataset!r}, but the shards in {shards_dir} hold {dataset!r} "
                          f"(index.json); set data.dataset={dataset} or point data.shards at {cfg.data.dataset} shards")
    allowed = DATASET_PROTOCOLS.get(dataset)
    if cfg.train.eval_every_epochs > 0 and allowed is not None:
        wrong = [p for p in cfg.eval.protocols if p not in allowed]
        if wrong:
            raise ConfigError(f"eval.protocols: {', '.join(wrong)} cannot evaluate {dataset} shards ({shards_dir}); "
                              f"use {' or '.join(sorted(allowed))}")
    try:
        check_regdb_split(index, cfg.data.regdb_split, shards_dir)
    except ShardError as exc:
        raise ConfigError(str(exc)) from exc
    num_ids, classes = cfg.data.num_identities, int(index.get("num_classes", 0))
    if classes < num_ids:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} needs {num_ids} identities per batch "
                          f"(data.batch_size / (2 x data.num_instances)), but the training set in {shards_dir} "
                          f"has only {classes}")
