"""Model adapters and the embedded default model (``pjd.models.default()``)."""
from .default import DefaultModel, default

__all__ = ["DefaultModel", "default"]
