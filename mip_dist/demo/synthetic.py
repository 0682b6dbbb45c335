"""Synthetic visible-infrared pedestrians written in the SYSU-MM01 (or RegDB) layout.

Why: the demo and the tests must run the same readers, shards and stream as the real (licensed)
datasets, on data where cross-modality matching is learnable but colour does not transfer (how a
person looks in each modality: people.py and render.py). Identities are rendered in parallel;
everything is seeded by (seed, pid, camera, image index), so the bytes do not depend on the workers.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from .people import REGDB_STYLES, SYSU_STYLES, sample_identity, sample_view
from .render import render

log = logging.getLogger(__name__)

GENERATOR_VERSION = 4
MARKER = ".synthetic.json"
LAYOUTS = ("sysu", "regdb")


@dataclass(frozen=True)
class _Task:
    """All images of one identity (picklable unit of parallel work)."""

    root: str
    pid: int
    seed: int
    layout: str
    images_per_camera: int
    size: tuple[int, int]


def _write_identity(task: _Task) -> int:
    """Render and save every image of one identity; returns the number of files written."""
    idn = sample_identity(task.seed, task.pid)
    styles = SYSU_STYLES if task.layout == "sysu" else REGDB_STYLES
    written = 0
    for cam, style in styles.items():
        if task.layout == "sysu":
            folder = Path(task.root) / f"cam{cam}" / f"{task.pid:04d}"
        else:
            folder = Path(task.root) / ("Thermal" if style.infrared else "Visible") / str(task.pid)
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(task.images_per_camera):
            rng = np.random.default_rng([task.seed, task.pid, cam, n])
            img = render(idn, style, sample_view(rng), rng, task.size)
            if task.layout == "sysu":
                Image.fromarray(img).save(folder / f"{n + 1:04d}.jpg", quality=92)
            else:
                kind = "t" if style.infrared else "v"
                Image.fromarray(img).save(folder / f"{kind}_{task.pid:04d}_{n + 1:02d}.bmp")
            written += 1
    return written


def _split_ids(num_train_ids: int, num_test_ids: int, seed: int) -> tuple[list[int], list[int]]:
    """Identity ids 1..N, shuffled (seeded) into train and test sets, each sorted."""
    pids = np.arange(1, num_train_ids + num_test_ids + 1)
    np.random.default_rng([seed, 1]).shuffle(pids)
    return sorted(int(p) for p in pids[:num_train_ids]), sorted(int(p) for p in pids[num_train_ids:])


def _write_lists(root: Path, layout: str, train: list[int], test: list[int], seed: int,
                 images_per_camera: int) -> None:
    """SYSU exp/*.txt (train split 3:1 into train/val as in the real set) or RegDB idx files."""
    if layout == "sysu":
        exp = root / "exp"
        exp.mkdir(parents=True, exist_ok=True)
        n_val = max(1, len(train) // 4) if len(train) > 1 else 0
        val = set(train[:: max(1, len(train) // max(n_val, 1))][:n_val]) if n_val else set()
        (exp / "train_id.txt").write_text(",".join(str(p) for p in train if p not in val) + "\n")
        (exp / "val_id.txt").write_text(",".join(str(p) for p in sorted(val)) + "\n")
        (exp / "test_id.txt").write_text(",".join(str(p) for p in test) + "\n")
        return
    idx = root / "idx"
    idx.mkdir(parents=True, exist_ok=True)
    everyone = sorted(train + test)
    for t in range(1, 11):  # ten random train/test partitions of the same people, as in RegDB
        perm = list(everyone)
        np.random.default_rng([seed, 2, t]).shuffle(perm)
        parts = {"train": sorted(perm[: len(train)]), "test": sorted(perm[len(train):])}
        for part, ids in parts.items():
            for folder, mod, kind in (("Visible", "visible", "v"), ("Thermal", "thermal", "t")):
                lines = [f"{folder}/{p}/{kind}_{p:04d}_{n + 1:02d}.bmp {p}"
                         for p in ids for n in range(images_per_camera)]
                (idx / f"{part}_{mod}_{t}.txt").write_text("\n".join(lines) + "\n")


def generate_synthetic(root: str, num_train_ids: int = 120, num_test_ids: int = 40,
                       images_per_camera: int = 4, seed: int = 0, layout: str = "sysu",
                       img_size: tuple[int, int] = (256, 128), workers: Optional[int] = None) -> Path:
    """Write (or reuse, if the marker matches) a synthetic dataset at `root`; returns its path.

    layout "sysu": cam1..cam6/{pid:04d}/{n:04d}.jpg (cam3, cam6 single-channel infrared) and
    exp/{train,val,test}_id.txt. layout "regdb": Visible/, Thermal/ (.bmp) and idx/ for splits 1..10,
    `images_per_camera` images per modality. Generation happens in a temporary sibling folder that
    is renamed into place, so an interrupted run never leaves a half-written dataset behind.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if num_train_ids < 2 or num_test_ids < 1 or images_per_camera < 1:
        raise ValueError(f"need num_train_ids >= 2, num_test_ids >= 1, images_per_camera >= 1; got "
                         f"{num_train_ids}, {num_test_ids}, {images_per_camera}")
    params = _params(num_train_ids, num_test_ids, images_per_camera, seed, layout, img_size)
    target = Path(root)
    if _marker_matches(target, params):
        log.info("synthetic dataset at %s is up to date", target)
        return target
    if target.exists() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise FileExistsError(f"{target} exists, is not empty and was not written by the synthetic "
                              f"generator (no {MARKER}); refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        train, test = _split_ids(num_train_ids, num_test_ids, seed)
        tasks = [_Task(str(tmp), pid, seed, layout, images_per_camera, (int(img_size[0]), int(img_size[1])))
                 for pid in sorted(train + test)]
        workers = workers or min(len(os.sched_getaffinity(0)), 8)
        if workers > 1 and len(tasks) > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                total = sum(pool.imap_unordered(_write_identity, tasks, chunksize=4))
        else:
            total = sum(map(_write_identity, tasks))
        _write_lists(tmp, layout, train, test, seed, images_per_camera)
        (tmp / MARKER).write_text(json.dumps({**params, "images": total}, indent=1))
        _install(tmp, target, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic %s dataset: %d identities, %d images at %s", layout,
             num_train_ids + num_test_ids, total, target)
    return target


def _params(num_train_ids: int, num_test_ids: int, images_per_camera: int, seed: int, layout: str,
            img_size: tuple[int, int]) -> dict:
    """What a synthetic tree was written with (the marker's content, less the image count)."""
    return {"version": GENERATOR_VERSION, "num_train_ids": num_train_ids, "num_test_ids": num_test_ids,
            "images_per_camera": images_per_camera, "seed": seed, "layout": layout,
            "img_size": [int(img_size[0]), int(img_size[1])]}


def is_up_to_date(root: str, **generator_args: Any) -> bool:
    """True when `root` holds what this generator version writes for these `generate_synthetic` arguments."""
    return _marker_matches(Path(root), _params(**generator_args))


def _marker_matches(target: Path, params: dict) -> bool:
    """True when `target` holds a complete synthetic dataset written with exactly `params`."""
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return {k: saved.get(k) for k in params} == params


def _install(tmp: Path, target: Path, params: dict) -> None:
    """Move the finished tree into place (replacing an outdated synthetic tree, never foreign data)."""
    if target.exists():
        if _marker_matches(target, params):  # another process finished the same work first
            return
        if (target / MARKER).is_file():
            shutil.rmtree(target)
        else:
            target.rmdir()  # an empty folder; anything else was refused up front
    try:
        tmp.rename(target)
    except OSError:
        if not _marker_matches(target, params):
            raise

