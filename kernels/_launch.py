"""What every pjd kernel wrapper shares: the interpreter switch, dtype names, the device guard.

``INTERPRETING`` is read once, at import, exactly as ``@triton.jit`` reads ``TRITON_INTERPRET``:
the kernels are either compiled for a GPU or run by Triton's numpy interpreter for the whole
process, and the few interpreter-only workarounds are chosen here, at import, never through a
kernel argument.
"""
from __future__ import annotations

import contextlib
import os

import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the launch.

    Triton launches on the current device's current stream: without the guard, tensors on
    ``cuda:1`` would be read by a kernel launched on device 0.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
