"""The compiled decoding step: ``pjd.generate(compile=...)``.

The fixed-shape step (``pjd.engine._Decoder.step`` with ``fixed_shapes``) reads nothing back from the
device and keeps every shape for the whole decode, so it is compiled whole (schedule, pack, model
forward, verification, commit):
- on a CPU through ``torch.compile`` (inductor, static shapes, one graph). Dynamo caches the compiled
  code per shape and model configuration for the process: a second call with the same shapes
  compiles nothing (``GenerationResult.compile_seconds`` is then 0);
- on CUDA captured as a ``torch.cuda.CUDAGraph`` after one step on a side stream, then replayed.
  The graph records the addresses of this decode's buffers, so each call captures its own (about
  one eager step of host time); what is costly to build -- the Triton kernels -- is compiled once
  per process. NOT RUN ON A GPU so far (no GPU was available to the session that wrote it).
"""
from __future__ import annotations

import shutil
import time
import warnings

import torch

from pjd.ops import _backend

COMPILE = (False, True, "auto")


def mode(compile, adapter, backend: str, plan) -> str:
    """"" (eager), "inductor" or "cuda-graph" for ``generate(compile=...)``. True raises where the step
    cannot be compiled; "auto" compiles where it is expected to pay -- CUDA; on a CPU the single-lane
    methods (ar, sjd, sjd++: a fixed-shape step pads no input there) -- and otherwise warns once per
    reason and runs eager (row-parallel methods on a CPU: measured slower, docs/performance.md)."""
    if not isinstance(compile, (bool, str)) or compile not in COMPILE:
        raise ValueError(f"compile must be False, True or 'auto', got {compile!r}")
    if compile is False:
        return ""
    reason = why_not(adapter.device, backend)
    if compile == "auto" and reason is None and adapter.device.type == "cpu" and plan.row_lanes:
        reason = (f"on a CPU the compiled {plan.method} step, padded to its fixed shape, measured slower than the "
                  "eager dynamic-shape one (docs/performance.md, issue 20); compile=True compiles anyway")
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
        _compiled[BACKEND] = torch.compile(_step, backend=BACKEND, dynamic=False, fullgraph=True)
    return _compiled[BACKEND]


def compiled_step(decoder, mode: str):
    """(a callable running one timed step of ``decoder``, seconds spent compiling or capturing)."""
    if mode == "inductor":
        from torch._dynamo.utils import counters

        step = _traced_step()
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        with decoder.clock():
            step(decoder)  # the first call compiles (unless cached), and runs a real step
        seconds = time.perf_counter() - t0 if counters["stats"]["unique_graphs"] > before else 0.0

        def run():
            # Same decoder, same shapes every step: after the first call's full guard check, only the
            # guards that tell cached configurations apart are evaluated (the full check measured about
            # 0.9 ms a step on the default model, against about 8 ms for the step).
            with decoder.clock(), torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                step(decoder)
        return run, seconds
    if mode == "cuda-graph":
        t0 = time.perf_counter()
        graph = _capture(decoder)
        seconds = time.perf_counter() - t0

        def replay():
            with decoder.clock():
                graph.replay()
        return replay, seconds
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
