"""The one way every entry point reports an error: one `error:` line and exit 2, the traceback on request."""
from __future__ import annotations

import os
import sys
import traceback

EXIT_USAGE = 2


def debug_requested(flag: bool) -> bool:
    """--debug or MIP_DEBUG=1 (any value but empty/0) asks for tracebacks."""
    return flag or os.environ.get("MIP_DEBUG", "").strip() not in ("", "0")


def report_error(exc: BaseException, debug: bool, known: tuple[type, ...] = (), prefix: str = "") -> int:
    """Print one `error:` line (the traceback first when debugging) and return exit code 2. Errors of the
    `known` types are the user's to fix and print as they are; others name their type and the --debug hint."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    text = " ".join(str(exc).split())
    if not isinstance(exc, known):
        text = f"{type(exc).__name__}: {text}" + ("" if debug else " (run with --debug or MIP_DEBUG=1 for the traceback)")
    print(f"error: {prefix}{text}", file=sys.stderr)
    return EXIT_USAGE
