"""Where the Triton kernels can run, and the compiled / interpreted copies of the kernel module."""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

_KERNEL_FILE = Path(__file__).with_name("_triton_attention.py")
_modules: dict[bool, ModuleType] = {}
_lock = threading.Lock()


def triton_available() -> bool:
    """True if `triton` imports (Linux wheels; absent on macOS/Windows CPU installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1 in the environment, read at call time (not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None if the Triton kernels can run on `device` now, else why not (for error messages)."""
    if not triton_available():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_requested():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on CPU)"
    return f"device type {device.type!r} is not supported by the Triton kernels"


def kernel_module(device: torch.device) -> ModuleType:
    """The kernel module for `device`: interpreted when TRITON_INTERPRET=1 or on CPU, else compiled."""
    interpret = interpreter_requested() or device.type != "cuda"
    with _lock:
        if interpret not in _modules:
            _modules[interpret] = _load(interpret)
        return _modules[interpret]


def _load(interpret: bool) -> ModuleType:
    """Execute _triton_attention.py as a fresh module with triton's interpreter knob forced on/off."""
    import triton

    name = f"{__package__}._triton_attention_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with triton.knobs.runtime.scope():  # restores TRITON_INTERPRET afterwards
        triton.knobs.runtime.interpret = interpret
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return module
