"""pjd: Parallel Jacobi Decoding for autoregressive image generators.

``pjd.generate``, ``pjd.GenerationResult``, ``pjd.ops``, ``pjd.models`` ... are imported on first
use, so that ``import pjd`` (and ``pjd --help``) does not load torch before it is needed.
"""
import importlib

from ._choices import METHODS

__all__ = ["ops", "generate", "GenerationResult", "METHODS"]
__version__ = "0.1.0"

_LAZY = {"generate": "pjd.engine", "GenerationResult": "pjd.engine"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
