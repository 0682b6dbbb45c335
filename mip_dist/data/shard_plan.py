"""Where each sample goes in a shard: its tar key, its file extension, and the cut of an ordered sample
list into shards under a byte and a sample bound (only between identity chunks)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .shard_index import ShardError

TAR_BLOCK = 512
TAR_RECORD = 10240  # tar files end padded to a multiple of this
KEY_HASH_CHARS = 10  # hex digits of the path hash that tells apart keys whose names sanitise alike
SAFE_STEM = re.compile(r"^[A-Za-z0-9_/-]+$")  # stems that sanitise without losing a character (besides '/')


@dataclass(frozen=True)
class Item:
    """One sample to write: where its bytes are and what its json says."""

    src: str
    ext: str
    meta: dict


def sample_key(rel: str) -> str:
    """Tar key of a sample: its relative path without extension, '/' and '.' replaced (webdataset
    splits a name at the first dot of its base name)."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def assign_keys(rels: Iterable[str]) -> dict[str, str]:
    """Tar key of every relative path, unique by construction: a path whose name loses characters to
    sanitising (`ä.jpg`), or whose key another path shares (`a.jpg`, `a.png`), gets a suffix hashed from
    its own path, so a key never depends on file order and two images never share one."""
    rels = list(rels)
    by_key: dict[str, list[str]] = {}
    for rel in rels:
        by_key.setdefault(sample_key(rel), []).append(rel)
    keys: dict[str, str] = {}
    for key, group in by_key.items():
        for rel in group:
            stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
            lossy = len(group) > 1 or not SAFE_STEM.match(stem)
            keys[rel] = f"{key}_{hashlib.sha256(rel.encode()).hexdigest()[:KEY_HASH_CHARS]}" if lossy else key
    owner: dict[str, str] = {}
    for rel, key in keys.items():
        if key in owner:
            raise ShardError(f"{owner[key]} and {rel} map to the same sample key {key!r}; rename one of them")
        owner[key] = rel
    return keys


def image_ext(path: str) -> str:
    """Extension under which the stored bytes go into the tar (jpeg -> jpg)."""
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def pack_shards(items: list[Item], sizes: list[int], max_bytes: int, max_samples: int,
          cut_ok: Optional[list[bool]] = None) -> list[list[Item]]:
    """Cut an ordered item list into consecutive groups under both bounds (at least one unit each),
    cutting only before items marked in `cut_ok` (the first item of an identity chunk).

    The byte bound counts tar headers and block padding exactly; the file is then padded to tar's
    10 KiB record, so a shard is at most max_bytes rounded up to a multiple of 10 KiB (a single chunk
    larger than the bounds gets a shard of its own)."""
    cut_ok = cut_ok if cut_ok is not None else [True] * len(items)
    units: list[tuple[list[Item], list[int]]] = []
    for item, size, ok in zip(items, sizes, cut_ok):
        if ok or not units:
            units.append(([], []))
        units[-1][0].append(item)
        units[-1][1].append(size)
    groups: list[list[Item]] = []
    cur: list[Item] = []
    cur_bytes = 0
    def member(n: int, name: str) -> int:  # header block (+ PAX blocks for long names) + padded data
        header = TAR_BLOCK if len(name) < 100 else 3 * TAR_BLOCK + len(name) // TAR_BLOCK * TAR_BLOCK
        return header + (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK

    for unit, unit_sizes in units:
        need = sum(member(size, f"{it.meta['key']}.{it.ext}")
                   + member(len(json.dumps(it.meta, sort_keys=True).encode()), f"{it.meta['key']}.json")
                   for it, size in zip(unit, unit_sizes))
        if cur and (cur_bytes + need + 2 * TAR_BLOCK > max_bytes or len(cur) + len(unit) > max_samples):
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.extend(unit)
        cur_bytes += need
    if cur:
        groups.append(cur)
    return groups
