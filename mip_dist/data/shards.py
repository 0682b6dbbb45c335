"""Write a dataset as webdataset tar shards plus the `index.json` the stream, trainer and evaluator read.

Why shards: sequential reads of a few large files stream well from local disks, NFS or HTTP, and
each (rank, worker) can own whole shards. Image bytes are stored exactly as on disk (no re-encode);
each sample also carries a json with its identity, contiguous train label, camera, modality, source
path and key. Training samples are shuffled (seeded) before they are cut into size-bounded shards;
shards are written in parallel; undecodable images are reported and left out; a re-run on unchanged
input (same fingerprint) does nothing, and any run writes the same bytes for the same input.
Sample keys are unique by construction. A run writes into a temporary sibling folder that replaces
the output folder only when complete, and it never replaces files that are not shards, nor another
dataset's shards unless told to (`overwrite`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tarfile
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mip_dist.data.grouping import REPEAT_MARK, identity_chunks
from mip_dist.data.layouts import read_dataset, relative_path
from mip_dist.data.records import MODALITY_NAMES, Record

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: training samples in identity chunks; 1 (globally shuffled) is still read
READABLE_VERSIONS = (1, 2)
DEFAULT_CHUNK_INSTANCES = 4  # K of the paper's PK batches
INDEX_NAME = "index.json"
SHARD_PATTERN = re.compile(r"^(train|test)-(\d{6})\.tar$")
DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD_SAMPLES = 500
TAR_BLOCK = 512
TAR_RECORD = 10240  # tar files end padded to a multiple of this
KEY_HASH_CHARS = 10  # hex digits of the path hash that tells apart keys whose names sanitise alike
SAFE_STEM = re.compile(r"^[A-Za-z0-9_/-]+$")  # stems that sanitise without losing a character (besides '/')
INDEX_KEYS = ("version", "dataset", "regdb_split", "counts", "identity_map", "num_classes", "num_cameras",
              "shards", "test_records", "skipped", "fingerprint", "train_layout")
NEW_IN_V2 = ("train_layout",)  # absent from version-1 indexes, which are still read


class ShardError(ValueError):
    """Shards or index.json that cannot be used; the message names the file."""


class ShardsExistError(ShardError):
    """The output folder holds something the writer must not replace (other shards, other files)."""


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


def _pack(items: list[_Item], sizes: list[int], max_bytes: int, max_samples: int,
          cut_ok: Optional[list[bool]] = None) -> list[list[_Item]]:
    """Cut an ordered item list into consecutive groups under both bounds (at least one unit each),
    cutting only before items marked in `cut_ok` (the first item of an identity chunk).

    The byte bound counts tar headers and block padding exactly; the file is then padded to tar's
    10 KiB record, so a shard is at most max_bytes rounded up to a multiple of 10 KiB (a single chunk
    larger than the bounds gets a shard of its own)."""
    cut_ok = cut_ok if cut_ok is not None else [True] * len(items)
    units: list[tuple[list[_Item], list[int]]] = []
    for item, size, ok in zip(items, sizes, cut_ok):
        if ok or not units:
            units.append(([], []))
        units[-1][0].append(item)
        units[-1][1].append(size)
    groups: list[list[_Item]] = []
    cur: list[_Item] = []
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


# ----------------------------------------------------------------------------------- writer


def _params(dataset: str, regdb_split: int, seed: int, max_shard_bytes: int, max_shard_samples: int,
            chunk_instances: int = DEFAULT_CHUNK_INSTANCES) -> dict:
    """The settings that, with the input files, determine the shard bytes (part of the fingerprint)."""
    if max_shard_bytes < 1 or max_shard_samples < 1:
        raise ShardError(f"max_shard_bytes ({max_shard_bytes}) and max_shard_samples "
                         f"({max_shard_samples}) must be positive")
    if chunk_instances < 1:
        raise ShardError(f"chunk_instances ({chunk_instances}) must be >= 1")
    return {"regdb_split": regdb_split if dataset == "regdb" else None, "seed": seed,
            "max_shard_bytes": max_shard_bytes, "max_shard_samples": max_shard_samples,
            "chunk_instances": chunk_instances}


def shards_up_to_date(dataset: str, root: str, out: str, *, regdb_split: int = 1,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      max_shard_samples: int = DEFAULT_MAX_SHARD_SAMPLES, seed: int = 0,
                      chunk_instances: int = DEFAULT_CHUNK_INSTANCES) -> Optional[dict]:
    """The index in `out` if write_shards with these arguments would leave it as it is, else None."""
    params = _params(dataset, regdb_split, seed, max_shard_bytes, max_shard_samples, chunk_instances)
    return _up_to_date(Path(out), fingerprint(dataset, root, read_dataset(dataset, root, regdb_split), params))


def write_shards(dataset: str, root: str, out: str, *, regdb_split: int = 1,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 max_shard_samples: int = DEFAULT_MAX_SHARD_SAMPLES, workers: int = 2, seed: int = 0,
                 progress: bool = True, overwrite: bool = False, replace_outdated: bool = True,
                 chunk_instances: int = DEFAULT_CHUNK_INSTANCES) -> dict:
    """Shard dataset `dataset` at `root` into `out`; returns the index (also written as index.json).
    Training samples are written in identity chunks of `chunk_instances` visible + infrared images
    (mip_dist/data/grouping.py), shards cut only between chunks.
    What `out` may already hold is decided by check_output_folder; the write goes to a temporary sibling
    folder swapped in when complete, so an interrupted write leaves the old shards as they were."""
    params = _params(dataset, regdb_split, seed, max_shard_bytes, max_shard_samples, chunk_instances)
    records = read_dataset(dataset, root, regdb_split)
    fp = fingerprint(dataset, root, records, params)
    out_dir = Path(out)
    existing = _up_to_date(out_dir, fp)
    if existing is not None:
        log.info("shards in %s are up to date (fingerprint %s)", out_dir, fp[:12])
        return existing
    check_output_folder(out_dir, dataset, params["regdb_split"], overwrite=overwrite,
                        replace_outdated=replace_outdated)
    keys = assign_keys(relative_path(r, root) for r in records)
    target = out_dir.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    pool = _pool(workers)
    try:
        reasons = _check_all(records, pool, progress)
        skipped = [{"path": relative_path(r, root), "reason": why}
                   for r, why in zip(records, reasons) if why is not None]
        for s in skipped:
            log.warning("skipping undecodable image %s: %s", s["path"], s["reason"])
        kept = [r for r, why in zip(records, reasons) if why is None]
        index = _plan_and_write(dataset, root, tmp, kept, keys, params, seed, pool, progress)
        index["skipped"] = skipped
        index["fingerprint"] = fp
        index = {k: index[k] for k in INDEX_KEYS}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        _install(tmp, target)
    finally:
        if pool is not None:
            pool.shutdown()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d shards (%d train, %d test samples, %d skipped) to %s", len(index["shards"]),
             index["counts"]["train"]["total"], index["counts"]["test"]["total"], len(skipped), out_dir)
    return index


# ----------------------------------------------------------------------------------- output folder


def _is_shard_file(name: str) -> bool:
    """A name the writer itself creates in an output folder: a shard, the index, or their temporaries."""
    if name in (INDEX_NAME, INDEX_NAME + ".tmp"):
        return True
    return bool(SHARD_PATTERN.match(name[:-4] if name.endswith(".tar.tmp") else name))


def _some(names: Iterable[str], n: int = 3) -> str:
    """A few names for a message, with how many more there are."""
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def describe_index(index: dict) -> str:
    """What an index holds, in words: dataset, RegDB split, image counts."""
    dataset = index.get("dataset")
    split = f" of RegDB split {index.get('regdb_split')}" if dataset == "regdb" else ""
    try:
        counts = f" ({index['counts']['train']['total']} train / {index['counts']['test']['total']} test images)"
    except (KeyError, TypeError):
        counts = ""
    return f"{dataset} shards{split}{counts}"


@dataclass(frozen=True)
class FolderContents:
    """What an output folder holds, so a writer can tell its own shards from anything else."""

    path: Path
    index: Optional[dict]  # index.json, parsed; None when absent or unreadable
    index_problem: Optional[str]  # why index.json could not be read
    shard_files: tuple[str, ...]  # names the writer creates
    other: tuple[str, ...]  # everything else

    @property
    def empty(self) -> bool:
        """Absent, or a folder with nothing in it."""
        return not self.shard_files and not self.other

    def describe(self) -> str:
        """What is there, in words, for an error message."""
        if self.other:
            return f"files that are not shards ({_some(self.other)})"
        if self.index_problem is not None:
            return f"an {INDEX_NAME} that cannot be read ({self.index_problem})"
        if self.index is None:
            return f"shard files but no {INDEX_NAME} ({_some(self.shard_files)})"
        return describe_index(self.index)


def inspect_folder(folder: Path) -> FolderContents:
    """Classify the entries of `folder` (read only)."""
    if not folder.exists():
        return FolderContents(folder, None, None, (), ())
    if not folder.is_dir():
        raise ShardsExistError(f"{folder} exists and is not a folder")
    names = sorted(p.name for p in folder.iterdir())
    ours = tuple(n for n in names if _is_shard_file(n) and (folder / n).is_file())
    other = tuple(n for n in names if n not in ours)
    index: Optional[dict] = None
    problem: Optional[str] = None
    if INDEX_NAME in ours:
        try:
            loaded = json.loads((folder / INDEX_NAME).read_text())
            if isinstance(loaded, dict):
                index = loaded
            else:
                problem = "not a JSON object"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = str(exc)
    return FolderContents(folder, index, problem, ours, other)


def check_output_folder(out_dir: Path, dataset: str, regdb_split: Optional[int], *, overwrite: bool,
                        replace_outdated: bool) -> None:
    """Refuse, before anything is written, what must not be replaced: files that are not shards always, another
    dataset's or split's shards unless `overwrite`, shards from other input or settings unless `replace_outdated`."""
    contents = inspect_folder(out_dir)
    if contents.empty:
        return
    if contents.other:
        raise ShardsExistError(f"{out_dir} holds {contents.describe()}; shards are written only into an empty "
                               "folder or one that holds nothing but shards: choose another output folder")
    index = contents.index
    same = index is not None and index.get("dataset") == dataset and index.get("regdb_split") == regdb_split
    if overwrite or (same and replace_outdated):
        return
    what = contents.describe() + (" written from other input or settings" if same else "")
    raise ShardsExistError(f"{out_dir} already holds {what}; pass --overwrite to replace them, or choose "
                           "another output folder")


def _sibling(folder: Path, tag: str) -> Path:
    """A fresh hidden path beside `folder` (same file system, so renames between them are atomic)."""
    return folder.parent / f".{folder.name}.{tag}-{uuid.uuid4().hex[:8]}"


def _install(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` in place of `target`: a rename when `target` is absent or empty,
    else a swap (old renamed aside, new renamed in, old removed) that never loses the old shards."""
    if target.exists() and not any(target.iterdir()):
        try:
            target.rmdir()
        except OSError:  # e.g. a mount point: move the files in, the index last
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == INDEX_NAME):
                os.replace(f, target / f.name)
            tmp.rmdir()
            return
    if not target.exists():
        tmp.rename(target)
        return
    old = _sibling(target, "old")
    try:
        target.rename(old)
    except OSError as exc:
        raise ShardError(f"cannot move {target} aside to replace it ({exc}); write into another folder") from exc
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    left = inspect_folder(old)
    if left.other:  # someone put files there while we wrote: keep them
        log.warning("kept the previous contents of %s at %s: it now holds %s", target, old, left.describe())
        return
    shutil.rmtree(old)


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


def _repeat_of(item: _Item, repeat: int) -> _Item:
    """The item itself, or its n-th extra copy (padding of an identity chunk) under key `key~n`."""
    if repeat == 0:
        return item
    return _Item(item.src, item.ext, {**item.meta, "key": f"{item.meta['key']}{REPEAT_MARK}{repeat}"})


def _identities(items: list[_Item]) -> dict[str, list[int]]:
    """Per training label in a shard: [infrared, visible] sample counts (what a reader can plan with)."""
    counts: dict[str, list[int]] = {}
    for it in items:
        counts.setdefault(str(it.meta["label"]), [0, 0])[it.meta["modality"]] += 1
    return counts


def _plan_and_write(dataset: str, root: str, out_dir: Path, kept: list[Record], keys: dict[str, str],
                    params: dict, seed: int, pool: Optional[ProcessPoolExecutor], progress: bool) -> dict:
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
    def item(r: Record) -> _Item:
        rel = relative_path(r, root)
        key = keys[rel]
        label = identity_map[r.pid] if r.split == "train" else -1
        return _Item(r.path, image_ext(r.path), {"pid": r.pid, "label": label, "camera": r.camera,
                                                 "modality": r.modality, "path": rel, "key": key})

    test_items = [item(r) for r in test]
    base_items = [item(r) for r in train]
    chunks = identity_chunks([it.meta["label"] for it in base_items], [it.meta["modality"] for it in base_items],
                             params["chunk_instances"], seed)
    train_items = [_repeat_of(base_items[slot.item], slot.repeat) for chunk in chunks for slot in chunk]
    starts = [j == 0 for chunk in chunks for j in range(len(chunk))]
    groups: list[tuple[str, str, list[_Item]]] = []
    for split, items, cut_ok in (("train", train_items, starts), ("test", test_items, [True] * len(test_items))):
        sizes = [os.path.getsize(it.src) for it in items]
        packed = _pack(items, sizes, params["max_shard_bytes"], params["max_shard_samples"], cut_ok)
        for i, grp in enumerate(packed):
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
               "bytes": results[name][3],
               **({"images": sum(REPEAT_MARK not in it.meta["key"] for it in grp), "identities": _identities(grp)}
                  if split == "train" else {})}
              for split, name, grp in groups]
    return {
        "version": INDEX_VERSION, "dataset": dataset, "regdb_split": params["regdb_split"],
        "train_layout": {"kind": "identity_chunks", "chunk_instances": params["chunk_instances"]},
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
    try:
        _check_unique_test_keys(index, path)
    except ShardError:  # an index holding a key twice is never "up to date": rewrite it
        return None
    for s in index.get("shards", []):
        f = out_dir / s["name"]
        if not f.is_file() or f.stat().st_size != s.get("bytes"):
            return None
    return index


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
    _check_unique_test_keys(index, path)
    return index


def _check_unique_test_keys(index: dict, path: Path) -> None:
    """Two test records under one key would share one image's feature at evaluation: refuse them."""
    first: dict[str, str] = {}
    for r in index.get("test_records") or []:
        key = r.get("key")
        if key in first:
            raise ShardError(f"{path}: test_records hold key {key!r} twice ({first[key]} and {r.get('path')}); "
                             "these shards were written by an older writer: rewrite them with "
                             "`python launch/make_shards.py ... --overwrite`")
        first[key] = r.get("path")


def check_split_keys(shards_dir: str, split: str, index: Optional[dict] = None) -> None:
    """Refuse shards of one split that store a sample key twice (reads tar headers only, not images)."""
    index = index if index is not None else read_index(shards_dir)
    seen: dict[str, str] = {}
    for url in shard_urls(shards_dir, split, index):
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

