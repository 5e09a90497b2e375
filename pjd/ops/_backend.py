"""Backend selection shared by every op: "auto" | "torch" | "sdpa" | "triton".

- torch: the pure-torch references, the specification (dense fp32 attention scores).
- sdpa: the fast path where Triton does not run (CPU): attention by torch's
  scaled_dot_product_attention with native grouped-query attention and a boolean mask of the
  step's rows only; ops without an attention part run their torch implementation.
- triton: the fused kernels (CUDA, or CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
import warnings

import torch

from pjd._choices import BACKENDS

# Set by pjd.kernels.dryrun while a dry run is active (the compute capability it compiles for):
# Triton kernels then take CPU tensors, are compiled for that GPU and never launched.
DRY_RUN_ARCH: int | None = None
_warned: set[str] = set()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported(*checks: tuple) -> str | None:
    """The first reason a kernel module gives for not serving a call, or None.

    checks: ``(kernel module name, *arguments of its unsupported(...))``, e.g.
    ``("draft_attention", head_dim, dtype)``. Imports the kernel modules (and triton) only when called.
    """
    import importlib

    for module, *args in checks:
        reason = importlib.import_module(f"pjd.kernels.{module}").unsupported(*args)
        if reason is not None:
            return reason
    return None


def resolve_backend(backend: str, device: torch.device, unsupported=None) -> str:
    """Map a user-facing backend name to the implementation that will run.

    auto: triton on CUDA tensors (when triton is installed), sdpa elsewhere; where the kernels
    cannot serve the call auto falls back to sdpa with a one-time warning that says why.
    ``unsupported``: None, or a zero-argument callable giving that reason (None if the kernels can
    serve the call), evaluated only where Triton would run. triton raises that reason, and on CPU
    tensors it runs only under TRITON_INTERPRET=1 (or a pjd.kernels.dryrun block); otherwise it is
    a clear error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda" or not triton_available():
            return "sdpa"
        reason = unsupported() if unsupported is not None else None
        if reason is not None:
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"pjd: backend='auto' runs the sdpa path instead of the Triton kernels: {reason}",
                              RuntimeWarning, stacklevel=3)
            return "sdpa"
        return "triton"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not triton_interpreting() and DRY_RUN_ARCH is None:
            raise ValueError(
                f"backend='triton' got tensors on {device}; Triton kernels run on CUDA tensors, "
                "or on CPU tensors only under TRITON_INTERPRET=1 (set before importing pjd)"
            )
        reason = unsupported() if unsupported is not None else None
        if reason is not None:
            raise ValueError(reason)
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_int32(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as q)")
