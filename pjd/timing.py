"""Warm-up before anything is timed: the rule `pjd demo` and every benchmark script follow.

On a GPU the first call of each Triton kernel variant compiles it (seconds), and any first call
pays for lazy imports, allocator growth and library handles. None of that is decode time, so a
figure in seconds always comes from a call whose configuration already ran once, untimed:

- ``WarmUp``: for whole decodes (``pjd.generate``, the hf baseline). Before the first call of a
  configuration it decodes one row of the grid with the same settings (the identical call with
  ``compile=``: the step is compiled for the call's shapes; its ``compile_seconds`` go to ``log``), untimed: that pays the
  first-call costs (imports, allocations, library handles) and compiles the Triton variants a
  decode uses, without doubling the run. The timed call is then watched: if it compiled a Triton
  kernel variant the one-row warm-up did not reach (``compiled_variants()`` grew), it is run once
  more and that second run is returned, so no figure ever includes a compilation. A
  configuration is everything but ``seed``, ``image_index`` and ``progress``: tensors by shape,
  dtype and device, other arguments by value; later calls that differ only in those (the next
  chunk of a sample run) are not warmed again. Randomness must come from ``seed`` (per-image
  streams: the warm-up leaves the timed call's tokens unchanged); a ``generator`` is refused, the
  warm-up would advance it. ``log`` lists what was warmed, in order, and ``reruns`` the timed
  calls that were run again; the scripts put both in their JSON.
- ``time_ms``: for microbenchmarks of one op call. One untimed call, then the timed ones.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

import pjd

NOT_CONFIG = ("seed", "image_index", "progress")  # what may change between calls of one configuration


def _describe(value):
    """JSON-able description of an argument: tensors by shape, dtype and device, modules by class."""
    if isinstance(value, torch.Tensor):
        return dict(shape=list(value.shape), dtype=str(value.dtype).removeprefix("torch."), device=str(value.device))
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return repr(value)


def compiled_variants() -> int:
    """Triton kernel variants of pjd's kernels compiled in this process so far (every device).

    Counted in the JIT's own per-device kernel caches; 0 where no kernel module was imported.
    """
    import sys

    count = 0
    for name in ("pjd.kernels.draft_attention", "pjd.kernels.speculative_verify"):
        module = sys.modules.get(name)
        for obj in vars(module).values() if module is not None else ():
            caches = getattr(obj, "device_caches", None)
            if isinstance(caches, dict):
                count += sum(len(entry[0]) for entry in caches.values())
    return count


class WarmUp:
    """Runs each configuration of a call once, untimed and one row high, before the calls that are timed."""

    def __init__(self):
        self.log: list[dict] = []  # the configurations warmed, in order
        self.reruns: list[str] = []  # timed calls run again because they compiled a kernel variant
        self._done: set = set()

    def __call__(self, name: str, fn: Callable, *args, **kwargs) -> None:
        """``fn(*args, **kwargs)`` (result discarded) unless its configuration ran here before."""
        if kwargs.get("generator") is not None:
            raise ValueError(f"{name}: pass seed=, not generator= (the warm-up call would advance the generator)")
        entry = dict(call=name, args=_describe(args),
                     **{k: _describe(v) for k, v in sorted(kwargs.items()) if k not in NOT_CONFIG})
        key = (tuple(id(a) for a in args if isinstance(a, torch.nn.Module)), json.dumps(entry, sort_keys=True))
        if key not in self._done:
            result = fn(*args, **kwargs)
            self._done.add(key)
            if getattr(result, "compile_seconds", 0):  # pjd.generate(compile=...): compiled here, reported apart
                entry["compile_seconds"] = result.compile_seconds
            self.log.append(entry)

    def _timed(self, name: str, call: Callable):
        """``call()``, run again if it compiled a kernel variant (the second run is returned)."""
        before = compiled_variants()
        result = call()
        if compiled_variants() != before:
            self.reruns.append(name)
            result = call()
        return result

    def generate(self, model, input_ids, **kwargs):
        """``pjd.generate(model, input_ids, **kwargs)``, its configuration warmed up first."""
        # A compiled step is compiled for the call's shapes: one row would compile another one.
        rows = {} if kwargs.get("compile") else {"height": 1}
        self("pjd.generate", lambda m, ids, **kw: pjd.generate(m, ids, **{**kw, **rows, "progress": False}),
             model, input_ids, **kwargs)
        return self._timed(f"pjd.generate {kwargs.get('method', 'pjd')}", lambda: pjd.generate(model, input_ids, **kwargs))

    def hf_generate(self, model, input_ids, **kwargs):
        """``pjd.baseline.hf_generate(model, input_ids, **kwargs)``, its configuration warmed up first."""
        from pjd import baseline

        self("hf_generate", lambda m, ids, **kw: baseline.hf_generate(m, ids, **{**kw, "height": 1}),
             model, input_ids, **kwargs)
        return self._timed("hf_generate", lambda: baseline.hf_generate(model, input_ids, **kwargs))


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median, min) milliseconds per call of ``fn()``, after one untimed warm-up call.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 cleared before every call, as many calls as
    fill 100 ms; ``repeats`` unused). Elsewhere: ``repeats`` calls timed with ``time.perf_counter``.
    """
    fn()  # warm-up: compilation and first-call costs, never timed
    if device.type == "cuda":
        from triton.testing import do_bench

        median, low = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0])
        return median, low
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def graph_ms(fn: Callable[[], object], device: torch.device, replays: int = 20) -> tuple[float | None, str]:
    """Kernel-only milliseconds per call of ``fn()`` and a note: ``fn`` captured once in a CUDA
    graph (warmed up on a side stream, torch's recipe) and replayed ``replays`` times between two
    CUDA events, median of 5 such runs. No host work and no L2 flush between calls: beside
    ``time_ms`` (which flushes L2 and includes launch overhead) it shows what the kernels
    themselves take. (None, why) off CUDA or where ``fn`` cannot be captured (it reads a device
    value back to the host, or allocates outside the graph's pool).
    """
    if device.type != "cuda":
        return None, "no CUDA"
    try:
        graph, _ = capture_graph(fn, device)
        times = replay_ms(graph, device, replays)
        return statistics.median(times), "graph replay"
    except Exception as err:  # noqa: BLE001 -- a call that cannot be captured has no kernel-only time
        torch.cuda.synchronize(device)
        return None, f"not capturable: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def capture_graph(fn: Callable[[], object], device: torch.device):
    """(graph, the static outputs of ``fn()``): three warm-up calls on a side stream, then one
    capture (torch's recipe). Replaying the graph rewrites those outputs in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_ms(graph, device: torch.device, replays: int) -> list[float]:
    """Milliseconds per replay of a captured ``graph``: one untimed replay, then 5 runs of
    ``replays`` back-to-back replays between two CUDA events."""
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return times


__all__ = ["WarmUp", "time_ms", "graph_ms", "capture_graph", "replay_ms", "compiled_variants", "NOT_CONFIG"]
