"""How entry points talk: one `error:` line and exit 2 (the traceback on request), the library's log lines on stderr."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from typing import Callable, Iterator, Optional

EXIT_USAGE = 2

# torch's DataLoader re-raises a worker's exception as "Caught <Type> in DataLoader worker process N.\nOriginal
# Traceback (most recent call last): ..." with the worker's whole traceback in the message
_WRAPPED = re.compile(r"\ACaught (?P<name>\w+) (?P<where>[^\n]*)\.\nOriginal Traceback \(most recent call last\):\n")


def worker_origin(exc: BaseException) -> Optional[tuple[str, str]]:
    """(type name, message) of the exception a DataLoader worker or thread raised, when `exc` is torch's
    re-raise of it (its message is the worker's traceback), else None."""
    text = str(exc)
    head = _WRAPPED.match(text)
    if head is None:
        return None
    name, body = head["name"], text[head.end():]
    starts = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}(?::|$)", body, re.M))
    if not starts:
        return None
    return name, body[starts[-1].end():].strip()  # the last: a chained cause comes first, the raised one at the end


def unwrap_worker_error(exc: BaseException) -> Optional[BaseException]:
    """The exception a DataLoader worker raised, as it was raised there (same type, original one-line
    message), when `exc` is torch's re-raise of it; None for any other exception."""
    origin = worker_origin(exc)
    if origin is None:
        return None
    name, message = origin
    if type(exc).__name__ == name:
        try:
            return type(exc)(message)
        except Exception:  # noqa: BLE001 - a constructor that wants more than a message
            pass
    return RuntimeError(f"{name}: {message}")


def debug_requested(flag: bool) -> bool:
    """--debug or MIP_DEBUG=1 (any value but empty/0) asks for tracebacks."""
    return flag or os.environ.get("MIP_DEBUG", "").strip() not in ("", "0")


def report_error(exc: BaseException, debug: bool, known: tuple[type, ...] = (), prefix: str = "") -> int:
    """Print one `error:` line (the traceback first when debugging) and return exit code 2. Errors of the
    `known` types are the user's to fix and print as they are; others name their type and the --debug hint.
    An error a DataLoader worker raised is reported as the worker raised it, without torch's wrapper text."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    shown = unwrap_worker_error(exc) or exc
    text = " ".join(str(shown).split())
    if not isinstance(shown, known):
        hint = "" if debug else " (run with --debug or MIP_DEBUG=1 for the traceback)"
        text = f"{type(shown).__name__}: {text}{hint}"
    print(f"error: {prefix}{text}", file=sys.stderr)
    return EXIT_USAGE


class LineFormatter(logging.Formatter):
    """Warnings as `warning: ...`, progress as `HH:MM:SS ...`: one line each, no logger names."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return f"{self.formatTime(record, '%H:%M:%S')} {text}"


@contextlib.contextmanager
def library_lines(enabled: bool = True) -> Iterator[None]:
    """The library's progress lines and warnings on stderr while a command runs (`enabled`: e.g. rank 0 only);
    removed afterwards, so a calling program's logging is left as it was."""
    logger = logging.getLogger("mip_dist")
    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_command(work: Callable[[], object], debug: bool, known: tuple[type, ...] = (), lines: bool = True) -> int:
    """An entry point's work with the library's lines on stderr (`lines`: e.g. rank 0 only): exit code 0, or 2
    after one `error:` line (`report_error`) for any failure."""
    try:
        with library_lines(lines):
            work()
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        return report_error(exc, debug, known=known)
    return 0
