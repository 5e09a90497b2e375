"""What every pjd kernel wrapper shares: the interpreter switch, dtype names, the device guard, the
choice of tuned configs by Triton version.

``INTERPRETING`` is read once, at import, exactly as ``@triton.jit`` reads ``TRITON_INTERPRET``:
the kernels are either compiled for a GPU or run by Triton's numpy interpreter for the whole
process, and the few interpreter-only workarounds are chosen here, at import, never through a
kernel argument.
"""
from __future__ import annotations

import contextlib
import os
import re

import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def tuned_for(tables: dict, version: str) -> tuple[int, int]:
    """The key of ``tables`` (tuned configs keyed by Triton ``(major, minor)``) that serves ``version``.

    Tile sizes and warps are tuned per Triton release because its code generation and the ptxas
    options it passes change the registers a config needs: a config that is spill-free under one
    release can spill under another (docs/kernels.md, issue 19). A release with its own table gets
    it; any other gets the table of the newest release not newer than it (3.7 and 3.8 get 3.6's,
    3.10 gets 3.9's), and one older than every table the oldest (docs/decisions.md, issue 19).
    Local and pre-release suffixes ("3.9.0+git1234", "3.10.0.dev0") count as their release.
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a Triton version from {version!r}")
    release = (int(match[1]), int(match[2]))
    older = [key for key in tables if key <= release]
    return max(older) if older else min(tables)


def _numpy_refuses_size1_int() -> bool:
    """numpy >= 2.4 raises on ``int()`` of a 1-element array that is not 0-dimensional."""
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def _interpreter_loop_bounds_fix() -> None:
    """Let the interpreter take runtime loop bounds (``range(lo, hi, BLOCK)``) with numpy >= 2.4.

    The interpreter holds every scalar (kernel arguments, program ids) as a 1-element 1-D array
    and triton 3.6's ``tensor.__index__`` (what ``range`` calls) is ``int(data)``, which numpy
    >= 2.4 refuses: every kernel with a runtime-bounded loop -- all of pjd's -- fails to
    interpret. Triton 3.9 squeezes the array first; so does this, installed after the
    interpreter's own per-launch patches (and undone with them). A ``while`` loop would also
    avoid ``__index__``, but it is no ``scf.for`` for the compiled kernel: Triton's software
    pipeliner (num_stages) would no longer multi-buffer the K/V loads.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    if not _numpy_refuses_size1_int() or getattr(interpreter._patch_lang, "pjd_fix", False):
        return
    original = interpreter._patch_lang

    def patch_lang(fn):
        scope = original(fn)
        scope.set_attr(tl.core.tensor, "__index__", lambda self: int(self.handle.data.reshape(())))
        return scope

    patch_lang.pjd_fix = True
    interpreter._patch_lang = patch_lang


def _interpreter_patch_once_per_launch() -> None:
    """Patch ``triton.language`` once per interpreted launch, not at every device-function call.

    Triton's interpreter patches the language modules a launch's kernel sees (``inspect.getmembers``
    over ``tl``, ``tl.tensor``, ``tl.math``, ...) and restores them when the launch ends; it also
    patches them again at every call of a ``@triton.jit`` helper inside the kernel, a scope it never
    restores. Those repeats change nothing -- a patched member is no longer a builtin, so it is not
    wrapped twice, and the rest are set to equivalent closures -- but they were 40% of an interpreted
    verification kernel's time (cProfile, tests/test_speculative_verify.py's "small" cases). Here a
    helper call inside a launch whose language modules are already patched skips the repeat; a
    helper that sees another one (``triton.language.standard``'s ``core``) is patched as Triton
    does. Launch scopes are made and restored by Triton as before.
    """
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang, "pjd_once", False):
        return
    original = interpreter._patch_lang
    launch = []  # while a launch runs: the ids of the language modules patched so far

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if launch:  # a helper called by the kernel
            if langs <= launch[0]:
                return interpreter._LangPatchScope()
            launch[0] |= langs
            return original(fn)
        scope = original(fn)
        launch.append(set(langs))
        restore = scope.restore

        def end_launch():
            launch.clear()
            restore()

        scope.restore = end_launch
        return scope

    patch_lang.pjd_once = True
    interpreter._patch_lang = patch_lang


if INTERPRETING:
    _interpreter_loop_bounds_fix()
    _interpreter_patch_once_per_launch()


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the launch.

    Triton launches on the current device's current stream: without the guard, tensors on
    ``cuda:1`` would be read by a kernel launched on device 0.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
