"""Where the Triton kernels can run; the kernel module, imported once, on first use.

Triton chooses compiled or interpreted execution when `@triton.jit` runs, from TRITON_INTERPRET. The
kernels are therefore imported lazily (importing mip_dist.kernels does not import triton), and a
process that wants the interpreter, such as the CPU test session, sets TRITON_INTERPRET=1 before
the first Triton call.
"""
from __future__ import annotations

import functools
import os
import re
from types import ModuleType
from typing import Optional

import torch

_module: Optional[ModuleType] = None


def triton_available() -> bool:
    """True if `triton` imports (Linux wheels; absent on macOS/Windows CPU installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1 in the environment, read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1+git12ab'."""
    major, minor = version.split(".")[:2]
    return int(major), int(re.match(r"\d*", minor).group() or 0)


@functools.lru_cache(maxsize=None)
def interpreter_defect() -> Optional[str]:
    """Why this triton's interpreter cannot run the kernels with this NumPy, else None (checked once): before
    triton 3.7 it reads loop bounds with int() on one-element arrays, which NumPy 2.4 refuses."""
    import numpy
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot read loop bounds under NumPy {numpy.__version__} "
                "(int() of a one-element array; fixed in triton 3.7): use NumPy < 2.4 or triton >= 3.7")
    return None


def kernel_module() -> ModuleType:
    """The launchers (mip_dist.kernels._triton_attention), imported on first use."""
    global _module
    if _module is None:
        from . import _triton_attention

        _module = _triton_attention
    return _module


def interpreted() -> bool:
    """True when the kernels run under Triton's interpreter in this process (fixed at their import)."""
    return not kernel_module()._COMPILED


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None if the Triton kernels can run on `device` now, else why not (for error messages)."""
    if not triton_available():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"device type {device.type!r} is not supported by the Triton kernels"
    if not interpreter_requested():
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on CPU)"
    if not interpreted():
        return ("tensors are on the CPU but the Triton kernels were imported compiled: set TRITON_INTERPRET=1 "
                "before triton is first imported")
    return interpreter_defect()
