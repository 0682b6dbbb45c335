"""The training datasets of a run, resolved: shard URLs, image counts and their place in one label space.

Several datasets (`data.shards` as a list of `ShardSource`) train as one: identities are relabelled
into one label space, each dataset's after the previous datasets' (label_offset = their num_classes
summed), and each dataset keeps its own cameras for the model's camera embedding, after the previous
datasets' (camera_offset = their num_cameras summed). A single folder, or `data.train_urls`, is one
source with offsets 0, so its labels and cameras are the shards' own.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from mip_dist.config import DataConfig

from .shard_index import INDEX_NAME, read_index, shard_urls
from .shard_reader import DataError
from .urls import check_urls, expand_urls, listed_per_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """One training dataset of a run, as the stream and the trainer need it."""

    name: str  # data.shards[i].name (default: the folder's name)
    path: str  # shard folder ("" for data.train_urls without an index beside them)
    weight: float  # relative share of a batch's identities
    dataset: Optional[str]  # index.json "dataset" (sysu, regdb, llcm, synthetic), None without an index
    index: Optional[dict]
    urls: tuple[str, ...]
    images: dict[str, int]  # per-url training images, where the index lists them (padding copies excluded)
    shard_bytes: dict[str, int]  # per-url tar size, where the index lists it
    label_offset: int  # added to the shards' training labels
    camera_offset: int  # added to the shards' cameras
    num_classes: Optional[int]  # identities of this dataset (None without an index)
    num_cameras: Optional[int]

    @property
    def total_images(self) -> Optional[int]:
        """Training images in the selected shards (the whole training split if the index lacks a shard's count)."""
        if self.index is None:
            return None
        if self.images and len(self.images) == len(self.urls):
            return sum(self.images.values())
        return int(self.index["counts"]["train"]["total"])


def _index_dir_for(data_cfg: DataConfig, urls: list[str]) -> str:
    """Where data.train_urls' index.json is: data.shards when it names one folder, else beside the shards."""
    sources = data_cfg.sources()
    if len(sources) > 1:
        raise DataError("data.train_urls is one dataset's shards; it cannot be combined with a list of datasets "
                        "in data.shards")
    if sources:
        return sources[0].path
    if urlparse(urls[0]).scheme in ("", "file"):
        return str(Path(urlparse(urls[0]).path).parent)
    return ""


def single_index_dir(data_cfg: DataConfig) -> str:
    """The folder whose index.json describes a one-dataset run ("" when none is known), read before the checks."""
    if data_cfg.train_urls:
        return _index_dir_for(data_cfg, expand_urls(data_cfg.train_urls))
    sources = data_cfg.sources()
    return sources[0].path if len(sources) == 1 and not data_cfg.multi_dataset else ""


def _resolve(name: str, path: str, weight: float, urls: list[str], index: Optional[dict], label_offset: int,
             camera_offset: int) -> ResolvedSource:
    """One source's record; the offsets place it after the sources before it."""
    # images, not samples: chunk padding repeats some images, and an epoch covers each image once
    images = listed_per_url(urls, index, lambda s: s.get("images", s["count"]))
    return ResolvedSource(name=name, path=path, weight=weight, dataset=index["dataset"] if index else None,
                          index=index, urls=tuple(urls), images=images,
                          shard_bytes=listed_per_url(urls, index, lambda s: s.get("bytes")),
                          label_offset=label_offset, camera_offset=camera_offset,
                          num_classes=int(index["num_classes"]) if index else None,
                          num_cameras=int(index["num_cameras"]) if index else None)


def resolve_sources(data_cfg: DataConfig) -> list[ResolvedSource]:
    """Every training dataset of the run (data.train_urls, else each data.shards folder's train shards),
    URLs checked, with its label and camera offsets."""
    if data_cfg.train_urls:
        urls = check_urls(expand_urls(data_cfg.train_urls), data_cfg.allow_pipe, "data.train_urls")
        index_dir = _index_dir_for(data_cfg, urls)
        index = read_index(index_dir) if index_dir and (Path(index_dir) / INDEX_NAME).is_file() else None
        name = Path(index_dir).name if index_dir else "train_urls"
        return [_resolve(name, index_dir, 1.0, urls, index, 0, 0)]
    configured = data_cfg.sources()
    if not configured:
        raise DataError("data.shards (a folder with index.json, or a list of datasets) or data.train_urls must be set")
    seen: dict[str, str] = {}
    out: list[ResolvedSource] = []
    labels = cameras = 0
    for i, src in enumerate(configured):
        key = "data.shards" if isinstance(data_cfg.shards, str) else f"data.shards[{i}]"
        index = read_index(src.path)
        where = str(Path(src.path).resolve())
        same = seen.get(where) or seen.get(f"fp:{index.get('fingerprint')}")
        if same is not None:
            how = "" if where in seen else " (a copy: its index.json has the same fingerprint)"
            raise DataError(f"{key}: {src.path} is already listed as dataset {same!r}{how}; each dataset once "
                            "(its identities would get two labels)")
        seen[where] = src.name
        if index.get("fingerprint"):
            seen[f"fp:{index['fingerprint']}"] = src.name
        urls = check_urls(shard_urls(src.path, "train", index), data_cfg.allow_pipe, key)
        out.append(_resolve(src.name, src.path, float(src.weight), urls, index, labels, cameras))
        labels += out[-1].num_classes
        cameras += out[-1].num_cameras
    return out


def label_space(data_cfg: DataConfig) -> tuple[int, int, list[ResolvedSource]]:
    """(num_classes, num_cameras, sources) of the run's joint label and camera spaces: what the model's
    classifier and camera embedding are built for, and what a batch's labels are checked against."""
    sources = resolve_sources(data_cfg)
    missing = [s.name for s in sources if s.index is None]
    if missing:
        raise DataError(f"no {INDEX_NAME} found for the training shards of {', '.join(missing)}: the number of "
                        "identities and cameras is unknown; set data.shards to the folder holding it")
    last = sources[-1]
    return last.label_offset + last.num_classes, last.camera_offset + last.num_cameras, sources


def _fingerprint(folder: str) -> Optional[str]:
    """The fingerprint a shard folder's index.json records (its content, whatever the path), None if unreadable."""
    try:
        return str(json.loads((Path(folder) / INDEX_NAME).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dataset_identity(data_cfg: DataConfig) -> list[dict]:
    """The training datasets in order, by content: [{fingerprint, path, weight}] (order and weights set the
    label offsets and batch shares; the fingerprint outlives a move or copy of the folder)."""
    if data_cfg.train_urls:
        try:
            folder = single_index_dir(data_cfg)
        except (DataError, ValueError):  # a bad pattern: the data checks name it
            folder = ""
        return [{"fingerprint": _fingerprint(folder) if folder else None, "path": folder or data_cfg.train_urls,
                 "weight": 1.0}]
    return [{"fingerprint": _fingerprint(s.path), "path": str(Path(s.path).resolve()), "weight": float(s.weight)}
            for s in data_cfg.sources()]


def same_datasets(a: list[dict], b: list[dict]) -> bool:
    """True if two `dataset_identity` lists name the same data: equal fingerprints (or paths, where a
    fingerprint is unknown), in the same order, with the same weights."""
    def same(x: dict, y: dict) -> bool:
        known = x.get("fingerprint") and y.get("fingerprint")
        return (x["fingerprint"] == y["fingerprint"] if known else x.get("path") == y.get("path")) \
            and float(x.get("weight", 1.0)) == float(y.get("weight", 1.0))

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
