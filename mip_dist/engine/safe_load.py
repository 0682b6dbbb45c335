"""Unpickling checkpoint files without running code: `torch.load(weights_only=True)` allowing only the few
non-tensor types the files hold, for our own reads and for DeepSpeed's (through `weights_only_loading`).

Failures become one-line CheckpointErrors naming the file: unsafe (the pickle names a callable that is not
allowed) or damaged (missing, truncated, not a torch.save file).
"""
from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unsafe, damaged, incomplete); the message names the file or tag."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle calls something weights_only=True does not allow: loading it could run code."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file or tag that is missing, truncated, overwritten or not a torch.save file at all."""


def error_gist(exc: BaseException) -> str:
    """The informative first sentence of a (often multi-paragraph) torch error, on one line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.split(r"(?<=\.)\s", line, maxsplit=1)[0]
    return f"{type(exc).__name__}: {line[:200]}" if line else type(exc).__name__


def _refused_name(exc: BaseException) -> Optional[str]:
    """The global or type weights_only=True refused, if that is why unpickling failed."""
    m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
    if m:
        return m.group(1)
    m = re.search(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>", str(exc))
    return m.group(1) if m else None


def numpy_globals() -> list[Any]:
    """The NumPy pieces of `np.random.get_state()` (in the client state's RNG) that weights_only=True must allow."""
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def deepspeed_globals() -> list[Any]:
    """DeepSpeed's own non-tensor objects in its state files: ZeRO stage enum, loss scalers, fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def training_globals() -> list[Any]:
    """Everything beyond tensors and plain containers that a tag written by `Checkpointer.save` holds."""
    return numpy_globals() + deepspeed_globals()


def safe_torch_load(path: str | Path, map_location: Any = "cpu", allow: Iterable[Any] = (),
                    mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` allowing only `allow` beyond tensors and plain containers, so a file
    from elsewhere cannot run code; failures become one-line CheckpointErrors naming the file."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError as exc:
        raise DamagedCheckpointError(f"{path}: file not found") from exc
    except pickle.UnpicklingError as exc:
        name = _refused_name(exc)
        if name is not None:
            raise UnsafeCheckpointError(
                f"{path}: refused to load with weights_only=True: unpickling it would call {name}, which is not "
                "allowed (only tensors and plain containers load; a file from elsewhere could run code this way)"
            ) from exc
        raise DamagedCheckpointError(f"{path}: not a readable torch.save file ({error_gist(exc)})") from exc
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError) as exc:
        raise DamagedCheckpointError(f"{path}: not a readable torch.save file ({error_gist(exc)})") from exc


class WeightsOnlyLoading:
    """Stands in for a DeepSpeed engine's `checkpoint_engine` while loading: everything is the wrapped
    engine's except `load`, which uses weights_only=True with `training_globals()` (DeepSpeed 0.19 passes
    weights_only=False, which runs whatever code a pickle names)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        """DeepSpeed's load hook, made safe."""
        return safe_torch_load(path, map_location, training_globals())

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


@contextlib.contextmanager
def weights_only_loading(engine: Any) -> Iterator[None]:
    """Route the engine's checkpoint reads through `WeightsOnlyLoading` for the duration of a load."""
    if not hasattr(engine, "checkpoint_engine"):
        raise RuntimeError("this DeepSpeed engine has no checkpoint_engine to load through; cannot guarantee "
                           "weights_only=True loading")
    original = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoading(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original
