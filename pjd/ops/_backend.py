"""Backend selection shared by every op: "auto" | "torch" | "sdpa" | "triton".

- torch: the pure-torch references, the specification (dense fp32 attention scores).
- sdpa: the fast path where Triton does not run (CPU): attention by torch's
  scaled_dot_product_attention with native grouped-query attention and a boolean mask of the
  step's rows only; ops without an attention part run their torch implementation.
- triton: the fused kernels (CUDA, or CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "sdpa", "triton")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user-facing backend name to the implementation that will run.

    auto: triton on CUDA tensors (when triton is installed), sdpa elsewhere. triton on CPU tensors is allowed only under
    TRITON_INTERPRET=1 (the interpreter); otherwise it is a clear error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "sdpa"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' got tensors on {device}; Triton kernels run on CUDA tensors, "
                "or on CPU tensors only under TRITON_INTERPRET=1 (set before importing pjd)"
            )
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
