"""Checks of a run config against the shards it will read, done before any process group starts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from mip_dist.config import Config, ConfigError
from mip_dist.data.shard_index import INDEX_NAME, read_index
from mip_dist.data.shards import ShardError, check_regdb_split
from mip_dist.data.sources import ResolvedSource, label_space, single_index_dir
from mip_dist.data.stream import DataError
from mip_dist.eval.protocols import DATASET_PROTOCOLS

from .ds_config import load_ds_config
from .run_dir import RunDirError, resolve_run_dir

log = logging.getLogger(__name__)


def resolve_dataset(cfg: Config) -> Config:
    """data.dataset 'auto' becomes the dataset the shards' index.json names, so real shards need no
    data.dataset; it stays 'auto' without an index (check_data_for_run then names the missing file)."""
    if cfg.data.dataset != "auto" or cfg.data.multi_dataset:
        return cfg
    key = "data.train_urls" if cfg.data.train_urls else "data.shards"
    try:
        folder = single_index_dir(cfg.data)
    except (DataError, ValueError):
        return cfg  # a bad URL pattern: check_data_for_run reports it
    if not folder or not (Path(folder) / INDEX_NAME).is_file():
        return cfg
    try:
        cfg.data.dataset = read_index(folder)["dataset"]
    except ShardError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    log.info("data.dataset: %s (from %s)", cfg.data.dataset, Path(folder) / INDEX_NAME)
    return cfg


def protocol_misfit(protocols: list[str], dataset: str) -> Optional[str]:
    """Why `protocols` cannot evaluate shards of `dataset` (None when they can): the protocols that do not
    fit and the ones to use instead."""
    allowed = DATASET_PROTOCOLS.get(dataset)
    wrong = [p for p in protocols if allowed is not None and p not in allowed]
    if not wrong:
        return None
    return f"{', '.join(wrong)} cannot evaluate {dataset} shards; use {' or '.join(sorted(allowed))}"


def check_data_for_run(cfg: Config, log_to: Optional[logging.Logger] = None) -> tuple[int, int, list[ResolvedSource]]:
    """(num_classes, num_cameras, datasets) of the run's joint label space, after checking every dataset
    against the config; a missing or broken index, a refused URL or a mismatch is a ConfigError.
    `log_to` gets one line on how several datasets share the label and camera spaces."""
    key = "data.train_urls" if cfg.data.train_urls else "data.shards"
    try:
        num_classes, num_cameras, sources = label_space(cfg.data)
    except (DataError, ShardError, ValueError) as exc:
        hint = ("; data.dataset is auto (read from the shards' index.json): set data.dataset=synthetic to make "
                "the synthetic set there" if cfg.data.dataset == "auto" and isinstance(cfg.data.shards, str)
                and not cfg.data.train_urls and not (Path(cfg.data.shards) / INDEX_NAME).is_file() else "")
        raise ConfigError((str(exc) if str(exc).startswith("data.") else f"{key}: {exc}") + hint) from exc
    for src in sources:
        if src.index is not None:
            check_shards_for_run(cfg, src.index, src.path, multi_dataset=cfg.data.multi_dataset)
    if cfg.data.multi_dataset:
        check_dataset_protocols(cfg, [str(s.dataset) for s in sources])
        if num_classes < cfg.data.num_identities:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} needs {cfg.data.num_identities} identities "
                              f"per batch, but the {len(sources)} datasets hold only {num_classes}")
        if log_to is not None:
            log_to.info("%d datasets in one label space: %s", len(sources), "; ".join(
                f"{s.name} ({s.dataset}, weight {s.weight:g}): labels {s.label_offset}.."
                f"{s.label_offset + s.num_classes - 1}, cameras {s.camera_offset + 1}..{s.camera_offset + s.num_cameras}"
                for s in sources))
    return num_classes, num_cameras, sources


def check_shards_for_run(cfg: Config, index: dict, shards_dir: str, multi_dataset: bool = False) -> None:
    """Refuse, naming the key, a run that would fail later on these shards: another dataset than
    data.dataset, a protocol that cannot evaluate them (also with evaluation off: the exported model
    takes eval.protocols to launch/evaluate.py), another RegDB split, or a batch needing more
    identities than the training set has. In a multi-dataset run each index names its own dataset and
    protocol (data.shards[i].protocol), so only the split and size checks apply."""
    dataset = str(index.get("dataset"))
    if not multi_dataset and cfg.data.dataset not in ("auto", dataset):
        raise ConfigError(f"data.dataset: {cfg.data.dataset!r}, but the shards in {shards_dir} hold {dataset!r} "
                          f"(index.json); set data.dataset={dataset} or point data.shards at {cfg.data.dataset} shards")
    misfit = None if multi_dataset else protocol_misfit(list(cfg.eval.protocols), dataset)
    if misfit:
        raise ConfigError(f"eval.protocols: {misfit} ({shards_dir})")
    try:
        check_regdb_split(index, cfg.data.regdb_split, shards_dir)
    except ShardError as exc:
        raise ConfigError(str(exc)) from exc
    num_ids, classes = cfg.data.num_identities, int(index.get("num_classes", 0))
    if classes < num_ids and not multi_dataset:  # several datasets: their identities together
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} needs {num_ids} identities per batch "
                          f"(data.batch_size / (2 x data.num_instances)), but the training set in {shards_dir} "
                          f"has only {classes}")


def check_dataset_protocols(cfg: Config, datasets: list[str]) -> None:
    """In a multi-dataset run, each data.shards[i].protocol must apply to the dataset its index names."""
    for i, (src, dataset) in enumerate(zip(cfg.data.sources(), datasets)):
        allowed = DATASET_PROTOCOLS.get(dataset)
        if src.protocol and allowed is not None and src.protocol not in allowed:
            raise ConfigError(f"data.shards[{i}].protocol: {src.protocol} cannot evaluate {dataset} shards "
                              f"({src.path}); use {' or '.join(sorted(allowed))}")


def check_run_inputs(cfg: Config, world_size: int, resume: Optional[str], data: bool = True) -> None:
    """What a run needs before any process group starts, checked without side effects: the DeepSpeed config,
    the pretrained file, the datasets (unless `data` is False: made later, e.g. the demo's) and the run
    directory. Every problem is a ConfigError naming the key or file."""
    load_ds_config(cfg, world_size)
    pretrained = cfg.model.pretrained
    if pretrained and not pretrained.startswith("timm:") and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained: no such file {pretrained!r}; download the timm ViT checkpoint there, "
                          "pass model.pretrained=timm:<name> to let timm download it, or model.pretrained='' to "
                          "train from scratch")
    if data:
        check_data_for_run(cfg)
    try:
        resolve_run_dir(cfg, resume)
    except (RunDirError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
