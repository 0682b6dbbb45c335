"""Where the Triton kernels can run; the kernel module, imported once, on first use.

Triton chooses compiled or interpreted execution when `@triton.jit` runs, from TRITON_INTERPRET. The
kernels are therefore imported lazily (importing mip_dist.kernels does not import triton), and a
process that wants the interpreter, such as the CPU test session, sets TRITON_INTERPRET=1 before
the first Triton call.
"""
from __future__ import annotations

import os
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
    return None
