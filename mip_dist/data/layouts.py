"""Readers that turn a dataset root (SYSU-MM01, RegDB, LLCM, synthetic) into Records.

Layouts, as the datasets ship them (each reader's docstring has the details):
- SYSU-MM01: cam1..cam6/<pid:04d>/*.jpg, identity lists exp/{train,val,test}_id.txt; cameras 3 and 6
  are infrared, the others visible.
- RegDB: Visible/ and Thermal/ trees, `relative/path label` lists idx/{train,test}_{visible,thermal}_<split>.txt.
- LLCM: idx/train_{vis,nir}.txt lists for training; test ids in idx/test_id.txt, images under
  test_vis/cam1..9/<pid:04d>/ and test_nir/cam{1,2,4..9}/<pid:04d>/ (no NIR camera 3).
Every reader checks what it reads: a missing index file, a
malformed line or an identity with no image at all raises `DatasetError` naming the file and line;
quirks the real datasets are known to have (an identity missing from some cameras) are counted in a
`ReadReport` and logged once as a summary warning.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

from mip_dist.data.records import INFRARED, VISIBLE, Record

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SYSU_CAMERAS = (1, 2, 3, 4, 5, 6)
SYSU_INFRARED_CAMERAS = (3, 6)
LLCM_VISIBLE_CAMERAS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
LLCM_INFRARED_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
DATASETS = ("sysu", "regdb", "llcm", "synthetic")


class DatasetError(ValueError):
    """A dataset tree that cannot be read; the message names the file (and line) at fault."""


@dataclass
class ReadReport:
    """Counted, tolerated quirks of a dataset tree (e.g. SYSU ids without a folder in a camera)."""

    missing_camera_folders: list[tuple[int, int]] = field(default_factory=list)  # (pid, camera)

    @property
    def warning_count(self) -> int:
        """How many tolerated quirks were met."""
        return len(self.missing_camera_folders)


def read_dataset(name: str, root: str, regdb_split: int = 1,
                 report: Optional[ReadReport] = None) -> list[Record]:
    """All train and test records of dataset `name` under `root` ("synthetic" uses the SYSU layout)."""
    report = report if report is not None else ReadReport()
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    if name in ("sysu", "synthetic"):
        return read_sysu(root, report)
    if name == "regdb":
        return read_regdb(root, regdb_split)
    if name == "llcm":
        return read_llcm(root, report)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------- helpers


def _list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (deterministic record order)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_id_list(path: Path) -> list[int]:
    """Comma-separated integer ids (SYSU exp/*.txt, LLCM idx/test_id.txt); blank lines are ignored."""
    if not path.is_file():
        raise DatasetError(f"missing id list {path}")
    ids: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        for token in line.split(","):
            token = token.strip()
            if not token:
                continue
            if not token.isdigit():
                raise DatasetError(f"{path}:{lineno}: {token!r} is not an integer identity id "
                                   f"(expected comma-separated integers)")
            ids.append(int(token))
    if not ids:
        raise DatasetError(f"{path}: no identity ids found (expected one line of comma-separated ids)")
    seen: set[int] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})
    if dups:
        raise DatasetError(f"{path}: identity ids listed twice: {dups[:10]}")
    return ids


def read_path_label_file(path: Path, root: Path) -> list[tuple[Path, int, int]]:
    """`relative/path label` lines (RegDB, LLCM idx files) -> (absolute path, label, line number)."""
    if not path.is_file():
        raise DatasetError(f"missing index file {path}")
    out: list[tuple[Path, int, int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{path}:{lineno}: expected 'relative/path label', got {line.strip()!r}")
        image = root / _inside_root(parts[0], path, lineno)
        if not image.is_file():
            raise DatasetError(f"{path}:{lineno}: image {image} does not exist")
        out.append((image, int(parts[1]), lineno))
    if not out:
        raise DatasetError(f"{path}: no 'path label' lines found")
    return out


def _inside_root(rel: str, index_file: Path, lineno: int) -> PurePosixPath:
    """An index line's path, refused if absolute or if it climbs with '..': only files under the root are packed."""
    posix = PurePosixPath(rel)
    if posix.is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive or ".." in posix.parts:
        raise DatasetError(f"{index_file}:{lineno}: {rel!r} points outside the dataset root "
                           f"(absolute or '..' path); index lines must name files under the root")
    return posix


def detect_layout(root: str) -> Optional[str]:
    """Which dataset layout a folder holds ("sysu", "regdb", "llcm"), from its index files; None if none."""
    base = Path(root)
    if (base / "exp" / "train_id.txt").is_file() and (base / "cam1").is_dir():
        return "sysu"
    if any((base / "idx").glob("train_visible_*.txt")):
        return "regdb"
    if (base / "idx" / "train_vis.txt").is_file():
        return "llcm"
    return None


def _summarise(report: ReadReport, dataset: str, root: str) -> None:
    """One warning line for all tolerated quirks instead of one per folder."""
    if report.warning_count:
        pids = sorted({p for p, _ in report.missing_camera_folders})
        log.warning("%s at %s: %d (identity, camera) folders are missing (%d identities affected, "
                    "e.g. %s); tolerated, as in the real dataset", dataset, root,
                    report.warning_count, len(pids), report.missing_camera_folders[:5])


# ----------------------------------------------------------------------------------- SYSU-MM01


def read_sysu(root: str, report: Optional[ReadReport] = None) -> list[Record]:
    """SYSU-MM01: train = exp/train_id + exp/val_id, test = exp/test_id; cam3/cam6 are infrared."""
    report = report if report is not None else ReadReport()
    base = Path(root)
    exp = base / "exp"
    splits = {
        "train": [(exp / "train_id.txt", i) for i in read_id_list(exp / "train_id.txt")]
        + [(exp / "val_id.txt", i) for i in read_id_list(exp / "val_id.txt")],
        "test": [(exp / "test_id.txt", i) for i in read_id_list(exp / "test_id.txt")],
    }
    train_ids = {i for _, i in splits["train"]}
    overlap = sorted(train_ids & {i for _, i in splits["test"]})
    if overlap:
        raise DatasetError(f"{exp}: ids {overlap[:10]} are listed both for training "
                           f"(train_id.txt/val_id.txt) and in test_id.txt")
    if len(train_ids) != len(splits["train"]):
        raise DatasetError(f"{exp}: some ids appear in both train_id.txt and val_id.txt")
    for cam in SYSU_CAMERAS:
        if not (base / f"cam{cam}").is_dir():
            raise DatasetError(f"missing camera folder {base / f'cam{cam}'}")
    records: list[Record] = []
    for split, entries in splits.items():
        for list_file, pid in entries:
            found = 0
            for cam in SYSU_CAMERAS:
                folder = base / f"cam{cam}" / f"{pid:04d}"
                if not folder.is_dir():
                    report.missing_camera_folders.append((pid, cam))
                    continue
                modality = INFRARED if cam in SYSU_INFRARED_CAMERAS else VISIBLE
                for image in _list_images(folder):
                    records.append(Record(str(image), pid, cam, modality, split))
                    found += 1
            if found == 0:
                raise DatasetError(f"{list_file}: identity {pid} has no images in any camera "
                                   f"(looked for {base}/cam1..cam6/{pid:04d}/)")
    _summarise(report, "SYSU-MM01", root)
    return records


# ----------------------------------------------------------------------------------- RegDB


def read_regdb(root: str, split: int = 1) -> list[Record]:
    """RegDB split `split` (1..10): idx/{train,test}_{visible,thermal}_{split}.txt; camera 1 = visible."""
    if not 1 <= split <= 10:
        raise DatasetError(f"RegDB split {split} must be in 1..10")
    base = Path(root)
    records: list[Record] = []
    for part in ("train", "test"):
        for mod_name, modality, camera in (("visible", VISIBLE, 1), ("thermal", INFRARED, 2)):
            idx = base / "idx" / f"{part}_{mod_name}_{split}.txt"
            for image, label, _ in read_path_label_file(idx, base):
                records.append(Record(str(image), label, camera, modality, part))
    _check_both_modalities(records, f"RegDB split {split} at {root}")
    return records


# ----------------------------------------------------------------------------------- LLCM

_LLCM_CAM = re.compile(r"(?:^|[_/])c(\d+)(?:_|$)|(?:^|/)cam(\d+)(?:/|$)")


def _llcm_camera(rel: str, idx: Path, lineno: int) -> int:
    """Camera number from an LLCM path: `..._c05_...` in the file name or a `cam5/` folder."""
    stem = rel.rsplit(".", 1)[0]
    match = _LLCM_CAM.search(stem)
    if not match:
        raise DatasetError(f"{idx}:{lineno}: cannot read a camera number from {rel!r} "
                           f"(expected '<pid>_c<cam>_...' in the file name or a 'cam<N>/' folder)")
    return int(match.group(1) or match.group(2))


def read_llcm(root: str, report: Optional[ReadReport] = None) -> list[Record]:
    """LLCM: idx/train_{vis,nir}.txt for training; test ids from idx/test_id.txt under test_{vis,nir}/cam*/."""
    report = report if report is not None else ReadReport()
    base = Path(root)
    records: list[Record] = []
    for name, modality in (("train_vis.txt", VISIBLE), ("train_nir.txt", INFRARED)):
        idx = base / "idx" / name
        for image, label, lineno in read_path_label_file(idx, base):
            rel = image.relative_to(base).as_posix()
            records.append(Record(str(image), label, _llcm_camera(rel, idx, lineno), modality, "train"))
    test_list = base / "idx" / "test_id.txt"
    for pid in read_id_list(test_list):
        found = 0
        for folder_name, cams, modality in (("test_vis", LLCM_VISIBLE_CAMERAS, VISIBLE),
                                             ("test_nir", LLCM_INFRARED_CAMERAS, INFRARED)):
            for cam in cams:
                folder = base / folder_name / f"cam{cam}" / f"{pid:04d}"
                if not folder.is_dir():
                    report.missing_camera_folders.append((pid, cam))
                    continue
                for image in _list_images(folder):
                    records.append(Record(str(image), pid, cam, modality, "test"))
                    found += 1
        if found == 0:
            raise DatasetError(f"{test_list}: identity {pid} has no images in any camera "
                               f"(looked for {base}/test_vis|test_nir/cam*/{pid:04d}/)")
    if report.warning_count:  # normal for LLCM (people pass few cameras): info, not warning
        log.info("LLCM at %s: %d (identity, camera) folders absent", root, report.warning_count)
    return records


def _check_both_modalities(records: list[Record], what: str) -> None:
    """A split where one modality is empty cannot train or evaluate cross-modality matching."""
    for split in ("train", "test"):
        mods = {r.modality for r in records if r.split == split}
        if mods != {INFRARED, VISIBLE}:
            raise DatasetError(f"{what}: the {split} split lacks a modality (found {sorted(mods)})")


def relative_path(record: Record, root: str) -> str:
    """The record's path relative to the dataset root, with forward slashes (portable, stable); a
    record outside the root is refused, so no file from elsewhere is ever packed."""
    rel = Path(os.path.relpath(record.path, root)).as_posix()
    if rel == ".." or rel.startswith("../") or Path(rel).is_absolute():
        raise DatasetError(f"{record.path} is outside the dataset root {root}")
    return rel
