"""Checks of a run config against the shards it will read, done before any process group starts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import yaml

from mip_dist.config import Config, ConfigError, from_dict, to_dict
from mip_dist.data.shard_index import INDEX_NAME, read_index
from mip_dist.data.shards import ShardError, check_regdb_split
from mip_dist.data.sources import ResolvedSource, dataset_identity, label_space, same_datasets, single_index_dir
from mip_dist.data.stream import DataError
from mip_dist.eval.protocols import DATASET_PROTOCOLS

from .ds_config import load_ds_config
from .run_dir import RunDirError, resolve_run_dir
from .safe_load import CheckpointError
from .tags import saved_client_state

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


def check_run_inputs(cfg: Config, world_size: int, resume: Optional[str], data: bool = True,
                     allow_changes: tuple[str, ...] = ()) -> None:
    """What a run needs before any process group starts, checked without side effects: the DeepSpeed config,
    the pretrained file, the datasets (unless `data` is False: made later, e.g. the demo's), the run
    directory and, when resuming, that the run's saved config and world size still hold (`allow_changes`:
    the keys --allow-config-change permits). Every problem is a ConfigError naming the key or file."""
    load_ds_config(cfg, world_size)
    pretrained = cfg.model.pretrained
    if pretrained and not pretrained.startswith("timm:") and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained: no such file {pretrained!r}; download the timm ViT checkpoint there, "
                          "pass model.pretrained=timm:<name> to let timm download it, or model.pretrained='' to "
                          "train from scratch")
    if data:
        check_data_for_run(cfg)
    check_allowed_changes(allow_changes)
    try:
        _, tag = resolve_run_dir(cfg, resume)
    except (RunDirError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    if tag is not None:
        check_resume(cfg, tag, world_size, allow_changes)


# Keys whose change alters what a step, an epoch or the weights mean: compared with the run's saved config on
# resume (every model key but the free ones; the datasets by content, see same_datasets). Of these, the
# changeable ones may differ with --allow-config-change: the LR schedule is recomputed from the step count,
# and more epochs only extend the run.
RESUME_FIXED = ("model.", "data.batch_size", "data.num_instances", "data.shards", "data.train_urls", "data.dataset",
                "data.regdb_split", "data.img_size", "data.steps_per_epoch", "data.resampled", "train.grad_accum",
                "train.zero_stage", "train.precision")
RESUME_CHANGEABLE = ("train.epochs", "optim.", "model.drop_path", "model.drop_rate", "model.attn_drop_rate",
                     "model.prompt_dropout")
RESUME_FREE = ("model.pretrained",)  # the checkpoint's weights replace what it loads
_DATA_KEYS = ("data.shards", "data.train_urls")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    """True if `key` is one of the patterns or lies under one ending in '.'."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested config dict (lists kept whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _pattern(key: str) -> str:
    """An --allow-config-change entry as a pattern: 'optim', 'optim.*' and 'optim.' all mean every optim key."""
    key = key.strip()
    if key.endswith(".*"):
        return key[:-1]
    return key if "." in key else key + "."


def check_allowed_changes(allow_changes: tuple[str, ...]) -> None:
    """Refuse an --allow-config-change entry that is no config key, or that no resume can honour."""
    known = _flat(to_dict(Config()))
    for entry in allow_changes:
        p = _pattern(entry)
        if not any(_matches(k, (p,)) for k in known):
            raise ConfigError(f"--allow-config-change {entry}: no such config key")
        fixed = [k for k in known if _matches(k, (p,)) and _matches(k, RESUME_FIXED) and not
                 _matches(k, RESUME_CHANGEABLE + RESUME_FREE)]
        if fixed:
            raise ConfigError(f"--allow-config-change {entry}: {', '.join(fixed[:4])} cannot change when resuming "
                              "(the checkpoint's steps, epochs or weights would mean something else); start a new "
                              "run instead (model.pretrained=<run>/model_final.pt starts from its weights)")


def _saved_config(tag: Path, state: dict[str, Any]) -> dict:
    """The config the tag was trained with: its client state's, else the run folder's config.yaml."""
    if isinstance(state.get("mip_config"), dict):
        return state["mip_config"]
    path = tag.parent.parent / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--resume: {tag} holds no config and {path} cannot be read ({exc}); the resume "
                          "cannot be checked") from exc


def _shown(value: Any) -> str:
    """A config value short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_changes(saved: dict, saved_datasets: Optional[list[dict]], cfg: Config) -> dict[str, str]:
    """{key: 'old -> new'} for every guarded key that differs from the run's saved config (datasets by content)."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    out = {}
    for key in sorted(set(old) | set(new)):
        if not _matches(key, RESUME_FIXED + RESUME_CHANGEABLE) or _matches(key, RESUME_FREE + _DATA_KEYS):
            continue
        if key == "data.dataset" and "auto" in (old.get(key), new.get(key)):
            continue  # resolved from index.json at start-up; the datasets are compared below
        if old.get(key) != new.get(key):
            out[key] = f"{_shown(old.get(key))} -> {_shown(new.get(key))}"
    if saved_datasets is None:
        try:
            saved_datasets = dataset_identity(from_dict(saved).data)
        except (ConfigError, ValueError):
            saved_datasets = []
    if not same_datasets(saved_datasets, dataset_identity(cfg.data)):
        key = "data.train_urls" if cfg.data.train_urls else "data.shards"
        out[key] = f"other datasets than the run's ({', '.join(str(d.get('path')) for d in saved_datasets) or '?'})"
    return out


def check_resume(cfg: Config, tag: Path, world_size: int, allow_changes: tuple[str, ...] = (),
                 state: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """Refuse, in one line before any start-up, a resume of `tag` by another world size or with guarded keys
    changed (every one listed) unless --allow-config-change permits them; returns the permitted changes."""
    if state is None:
        try:
            state = saved_client_state(tag)
        except CheckpointError as exc:
            raise ConfigError(f"--resume: {exc}") from exc
    saved_world = state.get("world_size")
    if saved_world is not None and int(saved_world) != world_size:
        raise ConfigError(f"--resume: checkpoint {tag} was written by {saved_world} ranks and this job has "
                          f"{world_size}; an exact resume needs the same world size: start {saved_world} processes")
    changes = resume_changes(_saved_config(tag, state), state.get("datasets"), cfg)
    patterns = tuple(_pattern(a) for a in allow_changes)
    refused = {k: v for k, v in changes.items() if not (_matches(k, RESUME_CHANGEABLE) and _matches(k, patterns))}
    if refused:
        changeable = [k for k in refused if _matches(k, RESUME_CHANGEABLE)]
        fixed = [k for k in refused if k not in changeable]
        hint = (f"; pass --allow-config-change {' '.join(changeable)} to continue with the new value(s)"
                if changeable else "")
        hint += (f"; {', '.join(fixed)} cannot change in a resumed run: resume with the run's values or start a "
                 "new run (model.pretrained=<run>/model_final.pt starts from its weights)" if fixed else "")
        raise ConfigError(f"--resume: {tag.parent.parent} was trained with another config: "
                          f"{'; '.join(f'{k}: {v}' for k, v in refused.items())}{hint}")
    epoch = state.get("epoch")
    if "train.epochs" in changes and epoch is not None and cfg.train.epochs < int(epoch):
        raise ConfigError(f"train.epochs: {cfg.train.epochs} is below the {epoch} epochs checkpoint {tag} has "
                          "already trained")
    return changes
