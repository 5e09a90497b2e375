"""The compiled decoding step: ``pjd.generate(compile=...)``.

The fixed-shape step (``pjd.engine._Decoder.step`` with ``fixed_shapes``) reads nothing back from the
device and keeps every shape for the whole decode, so it is compiled whole (schedule, pack, model
forward, verification, commit):
- on a CPU through ``torch.compile`` (inductor, static shapes, C++ wrapper, one graph per input
  bucket: ``buckets``);
- on CUDA captured as a ``torch.cuda.CUDAGraph`` after one step on a side stream, then replayed.
  NOT RUN ON A GPU so far (no GPU was available to the sessions that wrote it).
Paid once per model and settings: the decoder that was compiled (its buffers, which a CUDA graph
records, and its compiled step) is kept for the next call with the same model, weights and
settings (``checkout`` / ``checkin``, at most ``KEEP`` per model, held through a weak reference to
the model), which resets the buffers in place and runs the same step: it compiles and captures
nothing (``GenerationResult.compile_seconds`` 0). ``clear()`` drops them. Dynamo also caches the CPU
step's code per shape for the process, so a new decoder with the same shapes compiles nothing either.
"""
from __future__ import annotations

import contextlib
import shutil
import threading
import time
import warnings
import weakref
from collections import OrderedDict

import torch

from pjd.ops import _backend

COMPILE = (False, True, "auto")


def mode(compile, adapter, backend: str) -> str:
    """"" (eager), "inductor" or "cuda-graph" for ``generate(compile=...)``. True raises where the step
    cannot be compiled; "auto" compiles wherever it can (CUDA; a CPU with a C++ compiler: there the
    compiled step measured 2.1-2.3x the eager one for pjd, 2.2-2.7x for ar: docs/performance.md) and
    otherwise warns once per reason and runs eager."""
    if not isinstance(compile, (bool, str)) or compile not in COMPILE:
        raise ValueError(f"compile must be False, True or 'auto', got {compile!r}")
    if compile is False:
        return ""
    reason = why_not(adapter.device, backend)
    if reason is None:
        return "cuda-graph" if adapter.device.type == "cuda" else "inductor"
    if compile is True:
        raise ValueError(f"compile=True cannot run here: {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"pjd: compile='auto' runs the step eagerly: {reason}", RuntimeWarning, stacklevel=3)
    return ""


_warned: set[str] = set()


def why_not(device: torch.device, backend: str) -> str | None:
    """Why the step cannot be compiled on ``device`` with ``backend`` (resolved), or None."""
    if backend == "triton" and (_backend.triton_interpreting() or _backend.DRY_RUN_ARCH is not None):
        return "the Triton kernels run under the interpreter or a dry run here, which nothing can compile or capture"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"no compiled step for {device.type} tensors (CPU: inductor, CUDA: CUDA graphs)"
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return "inductor needs a C++ compiler on a CPU and none was found (c++, g++, clang++)"
    return None


# The dynamo backend of the CPU step. Tests set "eager": the same whole-step trace (one graph, so no
# host read and no graph break), without inductor's code generation (about 2 minutes on a loaded
# 2-core CPU even for a tiny model).
BACKEND = "inductor"
_compiled: dict = {}


def _step(decoder) -> None:
    decoder.step(timed=False)


def _traced_step():
    if BACKEND not in _compiled:
        # cpp_wrapper: the compiled step calls its kernels (about a hundred a step) from generated C++,
        # not from Python: about a fifth of the compiled pjd step on the default model (docs/decisions.md).
        options = dict(cpp_wrapper=True) if BACKEND == "inductor" else None
        _compiled[BACKEND] = torch.compile(_step, backend=BACKEND, dynamic=False, fullgraph=True, options=options)
    return _compiled[BACKEND]


KEEP = 4  # compiled decoders kept per model, the least recently used dropped first
RECOMPILE_LIMIT = 256  # graphs of the step per process (dynamo's own default: 8 per function)
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> decoder)
_lock = threading.Lock()


def key(adapter, mode: str, settings: tuple) -> tuple:
    """What a kept compiled step is valid for: the mode, the decoder's settings (plan, shapes, sampling,
    cache, backend) and the model's weights as the step reads them (a CUDA graph reads the addresses
    it recorded: weights replaced by new tensors or moved need a new capture)."""
    module = getattr(adapter, "model", adapter)
    tensors = [*module.parameters(), *module.buffers()] if isinstance(module, torch.nn.Module) else []
    backend = BACKEND if mode == "inductor" else None
    return mode, backend, settings, tuple((t.data_ptr(), t.dtype, t.device) for t in tensors)


def checkout(model, key: tuple):
    """The kept decoder for ``key`` (taken out: a concurrent call compiles its own), or None."""
    with _lock:
        kept = _kept.get(model)
        return kept.pop(key, None) if kept else None


def checkin(model, key: tuple, decoder) -> None:
    """Keep ``decoder`` and its compiled step for the next call with ``key``."""
    if decoder.compiled_step is None:
        return
    decoder.adapter = None  # the adapter holds the model: a kept decoder must not keep it alive
    with _lock:
        kept = _kept.setdefault(model, OrderedDict())
        kept[key] = decoder
        while len(kept) > KEEP:
            kept.popitem(last=False)


def clear() -> None:
    """Drop every kept compiled step and its buffers (the next compiled call compiles or captures again)."""
    with _lock:
        _kept.clear()


def buckets(plan, mode: str) -> tuple[int, ...]:
    """The input widths N of the fixed-shape step, smallest first. One, ``plan.max_fed_inputs``, but for
    the compiled CPU step of a row-parallel method, which also gets one lane's worth (window + 1: the
    steps where only the top row is fed, about a third of a pjd decode of the default model): a CPU
    computes every padded input and picks the bucket with a host read, which costs nothing there. A
    CUDA graph would need that read before every replay, a synchronisation: one bucket there."""
    full = plan.max_fed_inputs
    if mode == "inductor" and plan.row_lanes and plan.window + 1 < full:
        return plan.window + 1, full
    return (full,)


def compiled_step(decoder, mode: str):
    """A callable running one timed step of ``decoder``; the time spent compiling or capturing goes to
    ``decoder.compile_seconds``, not to its clock."""
    if mode == "inductor":
        from torch._dynamo.utils import counters

        step = _traced_step()

        def run():
            # Guards in full at a decode's first step in each bucket (where a bucket compiles), then only
            # those that tell the cached graphs apart (the full check measured about 0.9 ms a step).
            checked = decoder.bucket in decoder.guards_checked
            graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
            # A call that may compile lifts dynamo's limit of 8 graphs per function (with fullgraph, the
            # 9th settings of a process would raise): one graph per settings and bucket is the design.
            limit = contextlib.nullcontext() if checked else torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
            with limit, torch.compiler.set_stance(skip_guard_eval_unsafe=checked):
                step(decoder)
            seconds = time.perf_counter() - t0
            if counters["stats"]["unique_graphs"] > graphs:
                decoder.compile_seconds += seconds
            else:
                decoder.clock.total += seconds  # a CPU clock: seconds inside the (whole) steps
            decoder.guards_checked.add(decoder.bucket)
        return run
    if mode == "cuda-graph":
        t0 = time.perf_counter()
        graph = _capture(decoder)
        decoder.compile_seconds += time.perf_counter() - t0

        def replay():
            with decoder.clock():
                graph.replay()
        return replay
    raise ValueError(f"unknown compile mode {mode!r}")


def _capture(decoder) -> torch.cuda.CUDAGraph:
    """Capture one step. Capture needs its first launches done beforehand on a side stream (cuBLAS
    workspaces, Triton compiles, the cache's K/V): one eager step there, a real step of the decode.
    Captured kernels do not run; the state advances only when the graph is replayed."""
    device = decoder.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        decoder.step(timed=False)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoder.step(timed=False)
    return graph
