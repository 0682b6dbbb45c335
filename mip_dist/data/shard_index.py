"""Read and check a shard folder's `index.json`: what the stream, trainer and evaluator rely on."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Optional

INDEX_VERSION = 2  # 2: training samples in identity chunks; 1 (globally shuffled) is still read
READABLE_VERSIONS = (1, 2)
INDEX_NAME = "index.json"
INDEX_KEYS = ("version", "dataset", "regdb_split", "counts", "identity_map", "num_classes", "num_cameras",
              "shards", "test_records", "skipped", "fingerprint", "train_layout")
NEW_IN_V2 = ("train_layout",)  # absent from version-1 indexes, which are still read


class ShardError(ValueError):
    """Shards or index.json that cannot be used; the message names the file."""


def describe_index(index: dict) -> str:
    """What an index holds, in words: dataset, RegDB split, image counts."""
    dataset = index.get("dataset")
    split = f" of RegDB split {index.get('regdb_split')}" if dataset == "regdb" else ""
    try:
        counts = f" ({index['counts']['train']['total']} train / {index['counts']['test']['total']} test images)"
    except (KeyError, TypeError):
        counts = ""
    return f"{dataset} shards{split}{counts}"



def read_index(shards_dir: str) -> dict:
    """Load and check `index.json` in `shards_dir` (keys, version, listed shards present)."""
    path = Path(shards_dir) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"no {INDEX_NAME} in {shards_dir}: write shards first with "
                         f"`python launch/make_shards.py --dataset ... --root ... --out {shards_dir}`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from exc
    missing = [k for k in INDEX_KEYS if k not in index and not (k in NEW_IN_V2 and index.get("version") == 1)]
    if missing:
        raise ShardError(f"{path}: missing keys {missing}")
    if index["version"] not in READABLE_VERSIONS:
        raise ShardError(f"{path}: version {index['version']} is not supported (expected one of {READABLE_VERSIONS})")
    for s in index["shards"]:
        if not (Path(shards_dir) / s["name"]).is_file():
            raise ShardError(f"{path}: lists shard {s['name']}, which is missing from {shards_dir}")
    if index["num_classes"] != len(index["identity_map"]):
        raise ShardError(f"{path}: num_classes {index['num_classes']} != {len(index['identity_map'])} "
                         f"identities in identity_map")
    check_unique_test_keys(index, path)
    return index


def check_unique_test_keys(index: dict, path: Path) -> None:
    """Two test records under one key would share one image's feature at evaluation: refuse them."""
    first: dict[str, str] = {}
    for r in index.get("test_records") or []:
        key = r.get("key")
        if key in first:
            raise ShardError(f"{path}: test_records hold key {key!r} twice ({first[key]} and {r.get('path')}); "
                             "these shards were written by an older writer: rewrite them with "
                             "`python launch/make_shards.py ... --overwrite`")
        first[key] = r.get("path")


_KEYS_CHECKED: set[tuple] = set()  # (split, (path, size, mtime) of each shard) already scanned in this process


def check_split_keys(shards_dir: str, split: str, index: Optional[dict] = None) -> None:
    """Refuse shards of one split that store a sample key twice (reads tar headers only, not images). Each
    unchanged set of shards is scanned once per process: evaluations during training do not rescan it."""
    index = index if index is not None else read_index(shards_dir)
    urls = shard_urls(shards_dir, split, index)
    stamp = (split, tuple((str(Path(u).resolve()), Path(u).stat().st_size, Path(u).stat().st_mtime_ns) for u in urls))
    if stamp in _KEYS_CHECKED:
        return
    seen: dict[str, str] = {}
    for url in urls:
        name = Path(url).name
        with tarfile.open(url) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext != "json":  # one json per sample
                    continue
                if key in seen:
                    where = "twice in this shard" if seen[key] == name else f"again (first in {seen[key]})"
                    raise ShardError(f"{Path(shards_dir) / name}: sample key {key!r} is stored {where}; "
                                     f"the {split} split must not repeat a key: rewrite the shards with "
                                     "`python launch/make_shards.py ... --overwrite`")
                seen[key] = name
    _KEYS_CHECKED.add(stamp)


def check_regdb_split(index: dict, regdb_split: int, shards_dir: str) -> None:
    """A RegDB split is fixed when the shards are written: refuse a config that asks for another one."""
    if index["dataset"] == "regdb" and index["regdb_split"] != regdb_split:
        raise ShardError(f"data.regdb_split={regdb_split}, but the shards in {shards_dir} hold RegDB split "
                         f"{index['regdb_split']}; write split {regdb_split} with `python launch/make_shards.py "
                         f"--dataset regdb --regdb-split {regdb_split} ...` or set data.regdb_split="
                         f"{index['regdb_split']}")


def shard_urls(shards_dir: str, split: str, index: Optional[dict] = None) -> list[str]:
    """Paths of the `split` shards listed in the index, in index order."""
    index = index if index is not None else read_index(shards_dir)
    return [str(Path(shards_dir) / s["name"]) for s in index["shards"] if s["split"] == split]
