"""The shard writer's output folder: tell its own shards from anything else, and swap a finished write in
without ever losing the previous shards or files that are not shards."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .shard_index import INDEX_NAME, ShardError, describe_index

log = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^(train|test)-(\d{6})\.tar$")


class ShardsExistError(ShardError):
    """The output folder holds something the writer must not replace (other shards, other files)."""


def _is_shard_file(name: str) -> bool:
    """A name the writer itself creates in an output folder: a shard, the index, or their temporaries."""
    if name in (INDEX_NAME, INDEX_NAME + ".tmp"):
        return True
    return bool(SHARD_PATTERN.match(name[:-4] if name.endswith(".tar.tmp") else name))


def _some(names: Iterable[str], n: int = 3) -> str:
    """A few names for a message, with how many more there are."""
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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


def sibling(folder: Path, tag: str) -> Path:
    """A fresh hidden path beside `folder` (same file system, so renames between them are atomic)."""
    return folder.parent / f".{folder.name}.{tag}-{uuid.uuid4().hex[:8]}"


def install_folder(tmp: Path, target: Path) -> None:
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
    old = sibling(target, "old")
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
