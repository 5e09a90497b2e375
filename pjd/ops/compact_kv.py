"""KV-cache compaction after rejections (append layout, docs/design.md §2), all layers in one call.

Each step appends the K/V of its inputs at the tail of the cache; after verification the rejected
entries are dropped and the kept ones moved together, per sample (ragged). Implementations:
- ``cuda``: one CUDA launch for every tensor of every layer (csrc/compact_kv.cu, extension
  ``pjd._C_cuda``; built where torch has CUDA),
- ``cpp``: the C++ CPU op (csrc/compact_kv_cpu.cpp, extension ``pjd._C``; built on install),
- ``torch``: the pure-torch fallback below, one gather + scatter per tensor.
The extensions are imported lazily on first use and never required: without them, "auto" runs
the torch fallback. On a GPU the CUDA op also needs a kernel image for the device (setup.py's
gencode list: compute capability 8.x and >= 9.0); elsewhere, e.g. on a T4 or V100, "auto" runs the
fallback with a one-time warning. ``compact_kv_backend(device)`` says which one "auto" picks.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Sequence

import torch

BACKENDS = ("auto", "torch", "native")
_NATIVE_NAME = {"cpu": "cpp", "cuda": "cuda"}


def compact_kv_reference(caches, keep, tail_start, dst_start, meta=()) -> torch.Tensor:
    """Pure-torch compaction (the fallback): per tensor, gather the kept tail rows, scatter them.

    The gather copies the sources before the scatter writes, so overlapping ranges are safe.
    """
    rank = keep.cumsum(1) - 1  # rank of each entry among its sample's kept entries
    b_idx, t_idx = keep.nonzero(as_tuple=True)  # kept entries, sample-major, t increasing
    dst = dst_start.long()[b_idx] + rank[b_idx, t_idx]
    src = t_idx + tail_start
    for x in caches:
        x[b_idx, :, dst] = x[b_idx, :, src]
    for m in meta:
        m[b_idx, dst] = m[b_idx, src]
    return dst_start.to(torch.int32) + keep.sum(1, dtype=torch.int32)


@torch.library.custom_op("pjd::compact_kv_torch", mutates_args=("caches", "meta"))
def _compact_kv_torch(
    caches: list[torch.Tensor], keep: torch.Tensor, tail_start: int, dst_start: torch.Tensor,
    meta: list[torch.Tensor],
) -> torch.Tensor:
    return compact_kv_reference(caches, keep, tail_start, dst_start, meta)


def _fake_new_lengths(caches, keep, tail_start, dst_start, meta):
    return dst_start.new_empty(dst_start.shape, dtype=torch.int32)  # contiguous int32, as every implementation


_compact_kv_torch.register_fake(_fake_new_lengths)


@functools.cache
def _extension_unavailable(device_type: str) -> str | None:
    """Import the extension serving ``device_type`` once. None if it loaded, else the reason."""
    if device_type not in _NATIVE_NAME:
        return f"there is no native compact_kv for {device_type} tensors"
    try:
        # pjd._C defines the op schema (and the CPU kernel); pjd._C_cuda adds the CUDA kernel.
        importlib.import_module("pjd._C")
        if device_type == "cuda":
            importlib.import_module("pjd._C_cuda")
    except (ImportError, OSError) as err:
        return (f"the extension is not available ({type(err).__name__}: {err}); rebuild with "
                "`pip install --no-build-isolation -e .`, or use backend='torch'")
    _register_native_fake()
    return None


@functools.cache
def _register_native_fake() -> None:
    # The C++ schema names this module (m.set_python_module) as the home of its fake kernel.
    torch.library.register_fake("pjd::compact_kv")(_fake_new_lengths)


@functools.cache
def _no_kernel_image(index: int) -> str | None:
    """Why the CUDA kernel of pjd._C_cuda cannot run on CUDA device ``index``; None if it can.

    The binary itself is asked (cudaFuncGetAttributes): its gencode list in setup.py (sm_80 and
    sm_90 SASS, compute_90 PTX) stays the one source of truth, and what the driver can JIT from the
    PTX is the driver's answer, not a rule copied here. A T4 (7.5) or V100 (7.0) has no image.
    """
    error = importlib.import_module("pjd._C_cuda").kernel_image_error(index)
    if error is None:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"pjd._C_cuda has no kernel image for cuda:{index} ({torch.cuda.get_device_name(index)}, compute "
            f"capability {major}.{minor}): {error}; add the device's architecture to the gencode list in "
            "setup.py and rebuild, or use backend='torch'")


@torch.compiler.assume_constant_result  # a compiled step (pjd.compiler) asks it once, at trace time
def _native_unavailable(device: torch.device) -> str | None:
    """None if the native op runs on ``device``, else why not."""
    if device.type == "cuda" and not torch.cuda.is_available():
        # A CUDA build of torch without a driver or GPU: nothing native (or not) can run there, and
        # asking the device (current_device, the binary's kernel image) would raise.
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    reason = _extension_unavailable(device.type)
    if reason is None and device.type == "cuda":
        reason = _no_kernel_image(torch.cuda.current_device() if device.index is None else device.index)
    return reason


@functools.cache
def _warn_fallback(reason: str) -> None:  # once per reason, i.e. per device
    warnings.warn(f"compact_kv: backend='auto' runs the pure-torch fallback because {reason}", RuntimeWarning,
                  stacklevel=4)


def _use_native(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` ("auto", "native" or "torch") runs the native op on ``device``.

    "auto" falls back to torch where the native op is unavailable: silently when its extension is
    not built (the install warned), with a one-time RuntimeWarning when the CUDA extension is built
    but cannot run on this GPU. "native" raises RuntimeError with the reason instead.
    """
    if backend == "torch":
        return False
    unavailable = _native_unavailable(device)
    if unavailable is None:
        return True
    if backend == "native":
        raise RuntimeError(f"backend='native': {unavailable}")
    if _extension_unavailable(device.type) is None:
        _warn_fallback(unavailable)
    return False


def compact_kv_backend(device) -> str:
    """The implementation ``backend="auto"`` runs for tensors on ``device``: "cuda", "cpp" or "torch"."""
    device = torch.device(device)
    return "torch" if _native_unavailable(device) else _NATIVE_NAME[device.type]


def _check_tensor(name: str, t, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of caches[0])")


def _check_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _check_args(caches, keep, tail_start, dst_start, meta):
    caches = _check_list("caches", caches)
    meta = _check_list("meta", meta)
    if not caches:
        raise ValueError("caches must hold at least one [B, H, S, D] tensor")
    _check_tensor("caches[0]", caches[0])
    x0 = caches[0]
    if x0.dim() != 4 or x0.shape[1] == 0 or x0.shape[3] == 0:
        raise ValueError(f"caches[0] must be [B, H, S, D] with H, D >= 1, got shape {list(x0.shape)}")
    B, _, S, _ = x0.shape
    for i, x in enumerate(caches):
        _check_tensor(f"caches[{i}]", x, x0.device)
        if x.shape != x0.shape:
            raise ValueError(f"caches[{i}] has shape {list(x.shape)}, caches[0] has {list(x0.shape)}")
        if x.dtype != x0.dtype:
            raise TypeError(f"caches[{i}] is {x.dtype}, caches[0] is {x0.dtype}: all caches share a dtype")
        if not x.is_contiguous():
            raise ValueError(f"caches[{i}] must be contiguous (it is compacted in place)")
    _check_tensor("keep", keep, x0.device)
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be bool, got {keep.dtype}")
    if keep.dim() != 2 or keep.shape[0] != B:
        raise ValueError(f"keep must be [B={B}, T], got shape {list(keep.shape)}")
    if not isinstance(tail_start, int) or isinstance(tail_start, bool):
        raise TypeError(f"tail_start must be a python int, got {type(tail_start).__name__}")
    if tail_start < 0 or tail_start + keep.shape[1] > S:
        raise ValueError(f"need 0 <= tail_start and tail_start + T <= S, got tail_start={tail_start}, "
                         f"T={keep.shape[1]}, S={S}")
    _check_tensor("dst_start", dst_start, x0.device)
    if dst_start.dtype != torch.int32:
        raise TypeError(f"dst_start must be int32, got {dst_start.dtype}")
    if tuple(dst_start.shape) != (B,):
        raise ValueError(f"dst_start must be [B={B}], got shape {list(dst_start.shape)}")
    for i, m in enumerate(meta):
        _check_tensor(f"meta[{i}]", m, x0.device)
        if tuple(m.shape) != (B, S):
            raise ValueError(f"meta[{i}] must be [B={B}, S={S}], got shape {list(m.shape)}")
        if not m.is_contiguous():
            raise ValueError(f"meta[{i}] must be contiguous (it is compacted in place)")
    _check_no_overlap(caches, meta, keep, dst_start)
    return caches, meta


def _check_no_overlap(caches, meta, keep, dst_start) -> None:
    """The tensors written in place (caches, meta) overlap neither one another nor keep / dst_start.

    Views of one buffer are fine (e.g. K and V as halves of one allocation) as long as their bytes
    are disjoint; every written tensor is contiguous (checked), so its bytes are one interval.
    """
    named = [(f"caches[{i}]", x) for i, x in enumerate(caches)] + [(f"meta[{i}]", m) for i, m in enumerate(meta)]
    spans = sorted((x.data_ptr(), x.data_ptr() + x.numel() * x.element_size(), name)
                   for name, x in named if x.numel())
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{name} and {other} share memory; compact_kv writes them in place, so they must not "
                             "alias one another")
    for name, t in (("keep", keep), ("dst_start", dst_start)):
        if t.numel() == 0:
            continue
        last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))  # its farthest element
        lo, hi = t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()
        for start, end, written in spans:
            if start < hi and lo < end:
                raise ValueError(f"{name} shares memory with {written}, which compact_kv writes in place")


def compact_kv(caches, keep, tail_start, dst_start, *, meta=(), backend="auto", validate=True) -> torch.Tensor:
    """Compact the appended tail of a KV cache in place: drop rejected entries, close the gaps.

    Per sample b, with ``idx`` the indices t where ``keep[b, t]`` in increasing order, for
    ``i, t in enumerate(idx)``::

        X[b, :, dst_start[b] + i] = old X[b, :, tail_start + t]    # every X in caches
        m[b, dst_start[b] + i] = old m[b, tail_start + t]          # every m in meta

    Source and destination ranges may overlap. Nothing else is written: entries past the new end
    keep their old contents (the caller marks them empty).

    Args:
        caches: list/tuple of contiguous ``[B, H, S, D]`` tensors of one shape, dtype and device,
            typically K and V of every layer ``[k0, v0, k1, v1, ...]``. Mutated in place; they must
            not share memory with one another, with meta, keep or dst_start (ValueError).
        keep: bool ``[B, T]``: which entries of the tail ``[tail_start, tail_start + T)`` survive
            (ragged: any number per sample).
        tail_start: python int, ``0 <= tail_start`` and ``tail_start + T <= S``.
        dst_start: int32 ``[B]``: where sample b's kept entries go, ``0 <= dst_start[b] <= tail_start``.
            Checked on CPU tensors and on the torch backend; the CUDA op never reads it on the host
            (no synchronisation): a sample with an out-of-range value is left untouched and gets
            ``new_lengths[b] = -1``.
        meta: list/tuple of contiguous ``[B, S]`` tensors (any dtype, e.g. int32 positions and
            groups), compacted with the same keep lists. Mutated in place.
        backend: "auto" (the native op where it can run, else torch: where its extension is not
            built, or, with a one-time RuntimeWarning, on a GPU the CUDA kernel was not compiled
            for), "torch" (pure-torch fallback) or "native" (C++ CPU op / CUDA op; RuntimeError
            saying why where it cannot run, naming the GPU's compute capability).
            ``compact_kv_backend(device)`` returns what "auto" runs: "cuda", "cpp" or "torch".
        validate: False skips every argument check, including the host read of ``dst_start`` on
            CPU tensors (the engine's step, whose arguments are correct by construction).

    Returns:
        int32 ``[B]`` on the device of caches: ``new_lengths = dst_start + keep.sum(1)``.
    """
    if validate:
        caches, meta = _check_args(caches, keep, tail_start, dst_start, meta)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = caches[0].device
    use_native = _use_native(backend, device)
    if validate and (device.type == "cpu" or not use_native) and not torch.compiler.is_compiling():
        # The CUDA op skips this host read (it would synchronise); see dst_start above.
        if bool(((dst_start < 0) | (dst_start > tail_start)).any()):
            raise ValueError(f"dst_start must lie in [0, tail_start={tail_start}], got {dst_start.tolist()}")
    op = torch.ops.pjd.compact_kv if use_native else _compact_kv_torch
    return op(caches, keep, tail_start, dst_start, meta)
