"""Argument checks shared by the public ops: errors name the argument and what was expected.

Checks of kinds, shapes, dtypes and devices are free (no device work) and always run. Checks of
tensor *values* need a host read; ``speculative_verify(validate=True)`` (the default) does them in
one read, and the engine, which builds its inputs itself, passes ``validate=False`` to keep its
one-read-per-step budget.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny  # smaller ones overflow logits / temperature in fp32


def integer(name: str, value, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def tensor(name: str, t, shape: tuple[int, ...] | int, dtype, device: torch.device | None) -> None:
    """t is a tensor of ``dtype`` (a dtype or a tuple of them) on ``device`` with ``shape`` (or that many dims)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if isinstance(shape, int):
        if t.dim() != shape:
            raise ValueError(f"{name} must be {shape}-D, got shape {list(t.shape)}")
    elif tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of draft_tokens)")


def image_range(value, vocab: int) -> tuple[int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"image_token_range must be a pair (lo, hi) of ints, got {value!r}")
    lo, hi = (integer("image_token_range", v) for v in value)
    if not 0 <= lo < hi <= vocab:
        raise ValueError(f"image_token_range must satisfy 0 <= lo < hi <= {vocab} (the logits' vocabulary), "
                         f"got {(lo, hi)}")
    return lo, hi


def first_failure(checks: list[tuple[str, torch.Tensor]]) -> None:
    """checks: (message, bool tensor that must be all True). One host read for all of them."""
    if not checks:
        return
    ok = torch.stack([c.all() for _, c in checks]).tolist()
    for (message, _), good in zip(checks, ok):
        if not good:
            raise ValueError(message)
