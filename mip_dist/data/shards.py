"""Write a dataset as webdataset tar shards plus the `index.json` the stream, trainer and evaluator read.

Why shards: sequential reads of a few large files stream well from local disks, NFS or HTTP, and
each (rank, worker) can own whole shards. Image bytes are stored exactly as on disk (no re-encode);
each sample also carries a json with its identity, contiguous train label, camera, modality, source
path and key. Training samples are written in identity chunks (grouping.py), shuffled chunk by chunk
(seeded), and cut into size-bounded shards between chunks (shard_plan.py);
shards are written in parallel; undecodable images are reported and left out; a re-run on unchanged
input (same fingerprint) does nothing, and any run writes the same bytes for the same input.
Sample keys are unique by construction. A run writes into a temporary sibling folder that replaces
the output folder only when complete, and it never replaces files that are not shards, nor another
dataset's shards unless told to (`overwrite`; shard_folder.py). Reading an index is shard_index.py; its
names are re-exported here for the callers that import them from this module. `verify_shards` checks a
folder against its index (every listed shard present, its size and sha256): make_shards.py --verify.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mip_dist.data.grouping import identity_chunks, image_key, repeat_key
from mip_dist.data.layouts import read_dataset, relative_path
from mip_dist.data.records import MODALITY_NAMES, Record

from .shard_folder import check_output_folder, inspect_folder, install_folder, sibling  # noqa: F401
from .shard_index import (INDEX_KEYS, INDEX_NAME, INDEX_VERSION, ShardError, check_regdb_split,  # noqa: F401
                          check_split_keys, check_unique_test_keys, describe_index, read_index, shard_urls)
from .shard_plan import Item, assign_keys, image_ext, pack_shards, sample_key  # noqa: F401
from .shard_reader import hash_mismatch, shard_size_error

log = logging.getLogger(__name__)

DEFAULT_CHUNK_INSTANCES = 4  # K of the paper's PK batches
DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD_SAMPLES = 500


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


def _write_one_shard(path: str, items: list[Item]) -> tuple[str, int, str, int]:
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
    tmp = sibling(target, "tmp")
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
        install_folder(tmp, target)
    finally:
        if pool is not None:
            pool.shutdown()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


def _repeat_of(item: Item, repeat: int) -> Item:
    """The item itself, or its n-th extra copy (padding of an identity chunk) under key `key~n`."""
    if repeat == 0:
        return item
    return Item(item.src, item.ext, {**item.meta, "key": repeat_key(item.meta["key"], repeat)})


def _distinct_images(items: list[Item]) -> int:
    """Items that are images of the dataset, not chunk-padding copies (key `key~n`)."""
    return sum(image_key(it.meta["key"]) == it.meta["key"] for it in items)


class _WriteProgress:
    """The shard writer's bar: dataset images against their total, padding copies counted beside them."""

    def __init__(self, images: int, enabled: bool) -> None:
        self.bar = tqdm(total=images, desc="writing shards", unit="img", disable=not enabled)
        self.copies = 0

    def wrote(self, items: list[Item]) -> None:
        """One shard written: advance by its distinct images, report its padding copies."""
        distinct = _distinct_images(items)
        self.copies += len(items) - distinct
        self.bar.update(distinct)
        if self.copies:
            self.bar.set_postfix(padding_copies=self.copies)

    def close(self) -> None:
        """Finish the bar (at 100%: every image counted once)."""
        self.bar.close()


def _train_counts(items: list[Item]) -> dict:
    """index.json's counts for a train shard: distinct images (not chunk-padding copies) and identities."""
    return {"images": _distinct_images(items),
            "identities": _identities(items)}


def _identities(items: list[Item]) -> dict[str, list[int]]:
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
    def item(r: Record) -> Item:
        rel = relative_path(r, root)
        key = keys[rel]
        label = identity_map[r.pid] if r.split == "train" else -1
        return Item(r.path, image_ext(r.path), {"pid": r.pid, "label": label, "camera": r.camera,
                                                 "modality": r.modality, "path": rel, "key": key})

    test_items = [item(r) for r in test]
    base_items = [item(r) for r in train]
    chunks = identity_chunks([it.meta["label"] for it in base_items], [it.meta["modality"] for it in base_items],
                             params["chunk_instances"], seed)
    train_items = [_repeat_of(base_items[slot.item], slot.repeat) for chunk in chunks for slot in chunk]
    starts = [j == 0 for chunk in chunks for j in range(len(chunk))]
    groups: list[tuple[str, str, list[Item]]] = []
    for split, items, cut_ok in (("train", train_items, starts), ("test", test_items, [True] * len(test_items))):
        sizes = [os.path.getsize(it.src) for it in items]
        packed = pack_shards(items, sizes, params["max_shard_bytes"], params["max_shard_samples"], cut_ok)
        for i, grp in enumerate(packed):
            groups.append((split, f"{split}-{i:06d}.tar", grp))

    results: dict[str, tuple[str, int, str, int]] = {}
    progress_bar = _WriteProgress(len(kept), progress)
    if pool is None:
        for _, name, grp in groups:
            results[name] = _write_one_shard(str(out_dir / name), grp)
            progress_bar.wrote(grp)
    else:
        futures = {pool.submit(_write_one_shard, str(out_dir / name), grp): name for _, name, grp in groups}
        for fut, name in futures.items():
            results[name] = fut.result()
            progress_bar.wrote(next(g for _, n, g in groups if n == name))
    progress_bar.close()
    shards = [{"name": name, "split": split, "count": results[name][1], "sha256": results[name][2],
               "bytes": results[name][3],
               **(_train_counts(grp) if split == "train" else {})}
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
        check_unique_test_keys(index, path)
    except ShardError:  # an index holding a key twice is never "up to date": rewrite it
        return None
    for s in index.get("shards", []):
        f = out_dir / s["name"]
        if not f.is_file() or f.stat().st_size != s.get("bytes"):
            return None
    return index


# ----------------------------------------------------------------------------------- verify


def _listed_shards(folder: Path) -> list[dict]:
    """The shard entries of a folder's index.json (refused when there is none or it cannot be read)."""
    path = folder / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"no {INDEX_NAME} in {folder}: nothing to verify against")
    try:
        shards = json.loads(path.read_text())["shards"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ShardError(f"{path}: cannot be read as a shard index ({exc})") from exc
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise ShardError(f"{path}: 'shards' is not a list of shard entries")
    return shards


def shard_problem(folder: Path, entry: dict) -> Optional[str]:
    """Why one listed shard is not the file index.json describes (missing, size, sha256), else None."""
    path = folder / entry["name"]
    if not path.is_file():
        return "missing"
    wrong_size = shard_size_error(str(path), entry.get("bytes"))
    if wrong_size is not None:
        return wrong_size
    if not entry.get("sha256"):
        return "index.json lists no sha256: cannot be verified"
    got = _sha256(path)
    return None if got == entry["sha256"] else hash_mismatch(got, entry["sha256"])


def verify_shards(folder: str, workers: int = 1) -> tuple[int, list[str]]:
    """Check every shard a folder's index.json lists (present, size, sha256 of all its bytes): the number
    checked and one line per bad shard, so a copy or a disk can be trusted before a run reads it."""
    base = Path(folder)
    shards = _listed_shards(base)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL on large blocks
        problems = list(pool.map(lambda s: shard_problem(base, s), shards))
    return len(shards), [f"{base / s['name']}: {p}" for s, p in zip(shards, problems) if p is not None]
