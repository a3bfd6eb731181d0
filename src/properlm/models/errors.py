"""The error of a model source that is missing, ambiguous or cannot be loaded."""

from __future__ import annotations

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """The model source is missing, ambiguous or cannot be loaded."""
