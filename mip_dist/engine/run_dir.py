"""Where a run writes: a new timestamped or named directory, or the one a resumed checkpoint belongs to;
a finished run is never overwritten silently, and one run folder has one writer: rank 0 holds its
`run.lock` (an flock naming host, pid and start time) from the moment the folder is chosen."""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mip_dist.config import Config

from . import checkpoint as ckpt
from .distributed import broadcast_object

log = logging.getLogger(__name__)

FINISHED = "FINISHED"  # marker (with the summary) written by rank 0 when a run completes
LOCK = "run.lock"  # held (flock) by rank 0 of the run writing the folder; names it while held
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock


class RunDirError(RuntimeError):
    """The run directory exists and resuming was not asked for, or another run is writing it."""


@dataclass
class RunLock:
    """This process's hold on a run folder: the open, flocked lock file."""

    path: Path
    fd: int
    pid: int  # the process that took it (a forked child never releases it)


_HELD: dict[Path, RunLock] = {}  # run folder (absolute) -> this process's lock on it


def _holder_of(text: str) -> Optional[dict[str, Any]]:
    """The holder a lock file names ({host, pid, started}), None for an empty (released) one."""
    if not text.strip():
        return None
    try:
        info = json.loads(text)
        return {"host": str(info["host"]), "pid": int(info["pid"]), "started": str(info.get("started", "?"))}
    except (ValueError, KeyError, TypeError):
        return {"host": "?", "pid": -1, "started": "?"}  # unreadable: treated as held by an unknown run


def describe_holder(holder: dict[str, Any]) -> str:
    """'host h, pid 123, started 2026-01-02 03:04:05' for an error line."""
    return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"


def _pid_alive(pid: int) -> bool:
    """True if a process with this id runs on this host (signal 0 probes without touching it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_holder(run_dir: Path) -> Optional[dict[str, Any]]:
    """Who the run folder's lock file names, None when there is none or it was released; read-only."""
    try:
        return _holder_of((run_dir / LOCK).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _in_use(run_dir: Path, key: str, holder: Optional[dict[str, Any]]) -> RunDirError:
    """The one-line refusal of a folder another live run writes, naming that run."""
    who = describe_holder(holder) if holder else "it has not written its name yet"
    return RunDirError(f"{key}: {run_dir} is in use by another run ({who}); wait for it to end or stop it, "
                       "or choose another train.run_name")


def _elsewhere(run_dir: Path, key: str, holder: dict[str, Any]) -> RunDirError:
    """The refusal of a lock that names a run on another host: whether it still runs cannot be checked here."""
    return RunDirError(f"{key}: {run_dir / LOCK} names a run that this host cannot check ({describe_holder(holder)}); "
                       f"if that run has ended, delete {run_dir / LOCK} and start again")


def _lock_is_free(path: Path) -> Optional[bool]:
    """Whether nobody holds the lock file's flock (probed and let go at once); None where flock is unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise
    finally:
        os.close(fd)


def _live_here(holder: dict[str, Any]) -> bool:
    """True if the holder is another process of this host that is still running."""
    return holder["pid"] != os.getpid() and _pid_alive(holder["pid"])


def check_not_in_use(run_dir: Path, key: str) -> None:
    """Refuse a folder whose lock names a live run of this host, before any process group and without taking
    the lock. A lock left by a process that is gone, or naming another host, is left to rank 0's claim, which
    every rank follows (a rank on another node of the job must not decide alone)."""
    if run_dir.absolute() in _HELD:
        return
    holder = read_holder(run_dir)
    if holder is None or holder["host"] != socket.gethostname():
        return
    if _live_here(holder) and _lock_is_free(run_dir / LOCK) is not True:  # a recycled pid holds no lock
        raise _in_use(run_dir, key, holder)


def lock_run_dir(run_dir: Path, key: str) -> RunLock:
    """Take the run folder's lock for this process (creating the folder), or raise a RunDirError naming the
    holder. Atomic: flock on run.lock, so of two starts exactly one gets it; a lock left by a process that is
    gone (same host) is taken over with a warning. Held until `release_run_dirs` or the process ends."""
    where = run_dir.absolute()
    if where in _HELD:
        return _HELD[where]
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        taken = _flock(fd)
        if taken is False:
            raise _in_use(run_dir, key, _holder_when_written(fd))
        previous = _holder_of(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None:
            if previous["host"] != socket.gethostname():
                raise _elsewhere(run_dir, key, previous)
            if taken is None and _live_here(previous):  # no flock here: the file's word is all there is
                raise _in_use(run_dir, key, previous)
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", run_dir / LOCK,
                        describe_holder(previous))
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD[where] = RunLock(run_dir / LOCK, fd, os.getpid())
    return _HELD[where]


def _holder_when_written(fd: int, wait_s: float = 2.0) -> Optional[dict[str, Any]]:
    """The holder a just-taken lock names: its taker writes its name right after the flock, so wait briefly."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = _holder_of(os.pread(fd, 4096, 0).decode(errors="replace"))
        if (holder is not None and holder["pid"] >= 0) or time.monotonic() > deadline:
            return holder
        time.sleep(0.01)


def _flock(fd: int) -> Optional[bool]:
    """Exclusive non-blocking flock: True if taken, False if another process holds it, None on a file system
    without flock (then only the lock file's contents tell, with a warning)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        log.warning("this file system cannot flock (%s): two runs started at the same moment on one run folder "
                    "are not told apart, only a run that is already writing it", os.strerror(exc.errno))
        return None
    return True


def release_run_dirs() -> None:
    """Empty and unlock every run-folder lock this process holds (a clean end: no stale-lock warning later)."""
    for where, lock in list(_HELD.items()):
        if lock.pid != os.getpid():
            continue
        try:
            os.ftruncate(lock.fd, 0)
            fcntl.flock(lock.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(lock.fd)
        del _HELD[where]


atexit.register(release_run_dirs)


def _release(run_dir: Path) -> None:
    """Give back one folder's lock (a start that was refused after taking it)."""
    lock = _HELD.pop(run_dir.absolute(), None)
    if lock is not None:
        os.ftruncate(lock.fd, 0)
        fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)


def _holds_a_run(run_dir: Path) -> bool:
    """True if the folder holds anything but its lock file."""
    return run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())


def resolve_run_dir(cfg: Config, resume: Optional[str]) -> tuple[Path, Optional[Path]]:
    """(run directory, checkpoint tag to resume from), without side effects. Refuses to reuse a non-empty
    run directory unless resuming, so a finished run is never overwritten silently, and a folder that
    another live run holds."""
    output_dir = Path(cfg.train.output_dir)
    named = output_dir / cfg.train.run_name if cfg.train.run_name else None
    tag = ckpt.resolve_resume(resume, named, output_dir) if resume else None
    if tag is not None:
        check_not_in_use(tag.parent.parent, "--resume" if named is None else "train.run_name")
        return tag.parent.parent, tag
    if named is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        named = output_dir / stamp
        n = 1
        while named.exists():
            named, n = output_dir / f"{stamp}-{n}", n + 1
        return named, None
    check_not_in_use(named, "train.run_name")
    if _holds_a_run(named) and resume != "auto":
        state = "a finished run" if (named / FINISHED).exists() else "an earlier run"
        raise RunDirError(f"train.run_name: {named} already holds {state}; pass --resume auto to continue it "
                          "or choose another train.run_name")
    return named, None


def _new_run_dir(output_dir: Path) -> Path:
    """A fresh timestamped folder, claimed by creating it (two runs started in one second get two)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_dir.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = output_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RunDirError(f"train.output_dir: no free run folder name {stamp}-N in {output_dir}")


def claim_run_dir(cfg: Config, resume: Optional[str]) -> tuple[Path, Optional[Path]]:
    """`resolve_run_dir`'s choice, decided while holding the folder's lock (rank 0, before any write), so two
    starts on one folder cannot both write it: the second gets a RunDirError naming the first."""
    output_dir = Path(cfg.train.output_dir)
    named = output_dir / cfg.train.run_name if cfg.train.run_name else None
    if resume and resume != "auto":  # a checkpoint path: its run's folder
        tag = ckpt.resolve_resume(resume, named, output_dir)
        lock_run_dir(tag.parent.parent, "--resume")
        return tag.parent.parent, tag
    if named is not None:
        lock_run_dir(named, "train.run_name")
        try:
            return resolve_run_dir(cfg, resume)  # under the lock: what it finds stays true
        except BaseException:
            _release(named)
            raise
    tag = ckpt.resolve_resume("auto", None, output_dir) if resume else None
    if tag is None:
        run_dir = _new_run_dir(output_dir)
        lock_run_dir(run_dir, "train.output_dir")
        return run_dir, None
    lock_run_dir(tag.parent.parent, "--resume")
    return tag.parent.parent, ckpt.resolve_resume("auto", tag.parent.parent, output_dir) or tag  # newest, locked


def agree_run_dir(cfg: Config, resume: Optional[str], is_main: bool) -> tuple[Path, Optional[Path]]:
    """Rank 0 picks the run directory and locks it (timestamps, existence checks, run.lock); every rank
    follows or fails alike."""
    decision: Any = None
    if is_main:
        try:
            decision = claim_run_dir(cfg, resume)
        except (RunDirError, FileNotFoundError, ValueError) as exc:
            decision = exc
    decision = broadcast_object(decision)
    if isinstance(decision, Exception):
        raise decision
    return decision
