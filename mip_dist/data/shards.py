"""Write a dataset as webdataset tar shards plus the `index.json` the stream, trainer and evaluator read.

Why shards: sequential reads of a few large files stream well from local disks, NFS or HTTP, and
each (rank, worker) can own whole shards. Image bytes are stored exactly as on disk (no re-encode);
each sample also carries a json with its identity, contiguous train label, camera, modality, source
path and key. Training samples are shuffled (seeded) before they are cut into size-bounded shards;
shards are written in parallel; undecodable images are reported and left out; a re-run on unchanged
input (same fingerprint) does nothing, and any run writes the same bytes for the same input.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mip_dist.data.layouts import read_dataset, relative_path
from mip_dist.data.records import MODALITY_NAMES, Record

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = re.compile(r"^(train|test)-(\d{6})\.tar$")
DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD_SAMPLES = 500
TAR_BLOCK = 512
TAR_RECORD = 10240  # tar files end padded to a multiple of this
INDEX_KEYS = ("version", "dataset", "regdb_split", "counts", "identity_map", "num_classes", "num_cameras",
              "shards", "test_records", "skipped", "fingerprint")


class ShardError(ValueError):
    """Shards or index.json that cannot be used; the message names the file."""


@dataclass(frozen=True)
class _Item:
    """One sample to write: where its bytes are and what its json says."""

    src: str
    ext: str
    meta: dict


# ----------------------------------------------------------------------------------- helpers


def sample_key(rel: str) -> str:
    """Tar key of a sample: its relative path without extension, '/' and '.' replaced (webdataset
    splits a name at the first dot of its base name)."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def image_ext(path: str) -> str:
    """Extension under which the stored bytes go into the tar (jpeg -> jpg)."""
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def check_image(path: str) -> Optional[str]:
    """None if the file decodes completely, else the reason it does not."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return "empty image"
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_chunk(paths: list[str]) -> list[Optional[str]]:
    """Decode check of a chunk of files (one process-pool task)."""
    return [check_image(p) for p in paths]


def _sha256(path: Path) -> str:
    """Checksum of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_one_shard(path: str, items: list[_Item]) -> tuple[str, int, str, int]:
    """Write one tar (reproducibly: fixed mtime/owner), return (name, count, sha256, bytes)."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="mip", group="mip", mode=0o444)  # int mtime: no PAX header
        for item in items:
            with open(item.src, "rb") as img:
                data = img.read()
            meta = json.dumps(item.meta, sort_keys=True).encode()
            writer.write({"__key__": item.meta["key"], item.ext: data, "json": meta})
        writer.close()
    os.replace(tmp, final)
    return final.name, len(items), _sha256(final), final.stat().st_size


def _pool(workers: int) -> Optional[ProcessPoolExecutor]:
    """A fork-based process pool, or None to work inline."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"))


def fingerprint(dataset: str, root: str, records: list[Record], params: dict) -> str:
    """Hash of everything that determines the shard bytes: parameters and each file's identity."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": INDEX_VERSION, "dataset": dataset, **params}, sort_keys=True).encode())
    for r in records:
        st = os.stat(r.path)
        h.update(f"{relative_path(r, root)}|{st.st_size}|{st.st_mtime_ns}|{r.pid}|{r.camera}|"
                 f"{r.modality}|{r.split}\n".encode())
    return h.hexdigest()


def _counts(records: Iterable[Record]) -> dict:
    """Totals per modality and per camera (camera keys as strings, numerically sorted)."""
    recs = list(records)
    by_cam: dict[int, int] = {}
    for r in recs:
        by_cam[r.camera] = by_cam.get(r.camera, 0) + 1
    return {"total": len(recs),
            "by_modality": {MODALITY_NAMES[m]: sum(r.modality == m for r in recs) for m in sorted(MODALITY_NAMES)},
            "by_camera": {str(c): by_cam[c] for c in sorted(by_cam)}}


def _pack(items: list[_Item], sizes: list[int], max_bytes: int, max_samples: int) -> list[list[_Item]]:
    """Cut an ordered item list into consecutive groups under both bounds (at least one item each).

    The byte bound counts tar headers and block padding exactly; the file is then padded to tar's
    10 KiB record, so a shard is at most max_bytes rounded up to a multiple of 10 KiB."""
    groups: list[list[_Item]] = []
    cur: list[_Item] = []
    cur_bytes = 0
    def member(n: int, name: str) -> int:  # header block (+ PAX blocks for long names) + padded data
        header = TAR_BLOCK if len(name) < 100 else 3 * TAR_BLOCK + len(name) // TAR_BLOCK * TAR_BLOCK
        return header + (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK

    for item, size in zip(items, sizes):
        key = item.meta["key"]
        need = (member(size, f"{key}.{item.ext}")
                + member(len(json.dumps(item.meta, sort_keys=True).encode()), f"{key}.json"))
        if cur and (cur_bytes + need + 2 * TAR_BLOCK > max_bytes or len(cur) >= max_samples):
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += need
    if cur:
        groups.append(cur)
    return groups


# ----------------------------------------------------------------------------------- writer


def write_shards(dataset: str, root: str, out: str, *, regdb_split: int = 1,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 max_shard_samples: int = DEFAULT_MAX_SHARD_SAMPLES, workers: int = 2, seed: int = 0,
                 progress: bool = True) -> dict:
    """Shard dataset `dataset` at `root` into `out`; returns the index (also written as index.json)."""
    if max_shard_bytes < 1 or max_shard_samples < 1:
        raise ShardError(f"max_shard_bytes ({max_shard_bytes}) and max_shard_samples "
                         f"({max_shard_samples}) must be positive")
    records = read_dataset(dataset, root, regdb_split)
    params = {"regdb_split": regdb_split if dataset == "regdb" else None, "seed": seed,
              "max_shard_bytes": max_shard_bytes, "max_shard_samples": max_shard_samples}
    fp = fingerprint(dataset, root, records, params)
    out_dir = Path(out)
    existing = _up_to_date(out_dir, fp)
    if existing is not None:
        log.info("shards in %s are up to date (fingerprint %s)", out_dir, fp[:12])
        return existing
    out_dir.mkdir(parents=True, exist_ok=True)

    pool = _pool(workers)
    try:
        reasons = _check_all(records, pool, progress)
        skipped = [{"path": relative_path(r, root), "reason": why}
                   for r, why in zip(records, reasons) if why is not None]
        for s in skipped:
            log.warning("skipping undecodable image %s: %s", s["path"], s["reason"])
        kept = [r for r, why in zip(records, reasons) if why is None]
        index = _plan_and_write(dataset, root, out_dir, kept, params, seed, pool, progress)
    finally:
        if pool is not None:
            pool.shutdown()
    index["skipped"] = skipped
    index["fingerprint"] = fp
    index = {k: index[k] for k in INDEX_KEYS}
    _remove_stale(out_dir, {s["name"] for s in index["shards"]})
    tmp = out_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX_NAME)
    log.info("wrote %d shards (%d train, %d test samples, %d skipped) to %s", len(index["shards"]),
             index["counts"]["train"]["total"], index["counts"]["test"]["total"], len(skipped), out_dir)
    return index


def _check_all(records: list[Record], pool: Optional[ProcessPoolExecutor], progress: bool) -> list[Optional[str]]:
    """Decode every image (in parallel); None = fine, else the reason it is skipped."""
    paths = [r.path for r in records]
    chunks = [paths[i:i + 64] for i in range(0, len(paths), 64)]
    results: list[Optional[str]] = []
    bar = tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress, leave=False)
    mapped = pool.map(_check_chunk, chunks) if pool is not None else map(_check_chunk, chunks)
    for res in mapped:
        results.extend(res)
        bar.update(len(res))
    bar.close()
    return results


def _plan_and_write(dataset: str, root: str, out_dir: Path, kept: list[Record], params: dict, seed: int,
                    pool: Optional[ProcessPoolExecutor], progress: bool) -> dict:
    """Labels, keys, shuffled train order, shard groups; write the tars; the index without skipped."""
    train = [r for r in kept if r.split == "train"]
    test = [r for r in kept if r.split == "test"]
    if not train:
        raise ShardError(f"{dataset} at {root}: no decodable training images")
    identity_map = {pid: i for i, pid in enumerate(sorted({r.pid for r in train}))}
    one_modality = sorted(p for p in identity_map
                          if len({r.modality for r in train if r.pid == p}) < 2)
    if one_modality:
        log.warning("%d training identities have images of one modality only (e.g. %s); cross-modality "
                    "PK batches never pick them", len(one_modality), one_modality[:5])
    keys: dict[str, int] = {}

    def item(r: Record) -> _Item:
        rel = relative_path(r, root)
        key = sample_key(rel)
        if key in keys:  # two paths that sanitise to the same key: disambiguate, deterministically
            keys[key] += 1
            key = f"{key}_{keys[key]}"
        keys.setdefault(key, 0)
        label = identity_map[r.pid] if r.split == "train" else -1
        return _Item(r.path, image_ext(r.path), {"pid": r.pid, "label": label, "camera": r.camera,
                                                 "modality": r.modality, "path": rel, "key": key})

    test_items = [item(r) for r in test]
    train_items = [item(r) for r in train]
    order = np.random.default_rng([seed, 4242]).permutation(len(train_items))
    train_items = [train_items[i] for i in order]
    groups: list[tuple[str, str, list[_Item]]] = []
    for split, items in (("train", train_items), ("test", test_items)):
        sizes = [os.path.getsize(it.src) for it in items]
        for i, grp in enumerate(_pack(items, sizes, params["max_shard_bytes"], params["max_shard_samples"])):
            groups.append((split, f"{split}-{i:06d}.tar", grp))

    results: dict[str, tuple[str, int, str, int]] = {}
    bar = tqdm(total=len(kept), desc="writing shards", unit="img", disable=not progress)
    if pool is None:
        for _, name, grp in groups:
            results[name] = _write_one_shard(str(out_dir / name), grp)
            bar.update(len(grp))
    else:
        futures = {pool.submit(_write_one_shard, str(out_dir / name), grp): name for _, name, grp in groups}
        for fut, name in futures.items():
            results[name] = fut.result()
            bar.update(results[name][1])
    bar.close()
    shards = [{"name": name, "split": split, "count": results[name][1], "sha256": results[name][2],
               "bytes": results[name][3]} for split, name, _ in groups]
    return {
        "version": INDEX_VERSION, "dataset": dataset, "regdb_split": params["regdb_split"],
        "counts": {"train": _counts(train), "test": _counts(test)},
        "identity_map": {str(p): l for p, l in identity_map.items()},
        "num_classes": len(identity_map), "num_cameras": max(r.camera for r in kept),
        "shards": shards,
        "test_records": [{"key": it.meta["key"], "pid": it.meta["pid"], "camera": it.meta["camera"],
                          "modality": it.meta["modality"], "path": it.meta["path"]} for it in test_items],
    }


def _up_to_date(out_dir: Path, fp: str) -> Optional[dict]:
    """The existing index if it was written from the same input and all its shards are present."""
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if index.get("fingerprint") != fp:
        return None
    for s in index.get("shards", []):
        f = out_dir / s["name"]
        if not f.is_file() or f.stat().st_size != s.get("bytes"):
            return None
    return index


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete shards of an earlier, larger run (only files named like our own shards)."""
    for f in out_dir.iterdir():
        if SHARD_PATTERN.match(f.name) and f.name not in keep:
            f.unlink()
        elif f.name.endswith(".tar.tmp") and SHARD_PATTERN.match(f.name[:-4]):
            f.unlink()


# ----------------------------------------------------------------------------------- reading


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
    missing = [k for k in INDEX_KEYS if k not in index]
    if missing:
        raise ShardError(f"{path}: missing keys {missing}")
    if index["version"] != INDEX_VERSION:
        raise ShardError(f"{path}: version {index['version']} is not supported (expected {INDEX_VERSION})")
    for s in index["shards"]:
        if not (Path(shards_dir) / s["name"]).is_file():
            raise ShardError(f"{path}: lists shard {s['name']}, which is missing from {shards_dir}")
    if index["num_classes"] != len(index["identity_map"]):
        raise ShardError(f"{path}: num_classes {index['num_classes']} != {len(index['identity_map'])} "
                         f"identities in identity_map")
    return index


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

