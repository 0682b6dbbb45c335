"""Using a trained model: features for images (`FeatureExtractor`), feature files (`feature_file`), gallery
search (`search`) and ONNX export (`onnx_export`)."""
from __future__ import annotations

from typing import Any

__all__ = ["FeatureExtractor"]


def __getattr__(name: str) -> Any:
    """`FeatureExtractor` is imported on first use: reading a feature file needs no model code."""
    if name == "FeatureExtractor":
        from .extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
