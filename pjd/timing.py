"""Warm-up before anything is timed: the rule `pjd demo` and every benchmark script follow.

On a GPU the first call of each Triton kernel variant compiles it (seconds), and any first call
pays for lazy imports, allocator growth and library handles. None of that is decode time, so a
figure in seconds always comes from a call whose configuration already ran once, untimed:

- ``WarmUp``: for whole decodes (``pjd.generate``, the hf baseline). Before the first call of a
  configuration it runs the identical call once, untimed, wherever Triton kernels run (same
  model, method, settings, seed and batch, so the same shapes reach the same kernel variants;
  progress bar off). Where nothing is compiled (the sdpa / torch paths, the hf baseline on a CPU)
  the warm-up decodes one row of the grid with the same settings: that pays every first-call cost
  (imports, allocations, library handles) without doubling the run. A configuration is
  everything but ``seed``, ``image_index`` and ``progress``: tensors by shape, dtype and device,
  other arguments by value; later calls that differ only in those (the next chunk of a sample run)
  are not warmed again. Randomness must come from ``seed`` (per-image streams: the warm-up leaves
  the timed call's tokens unchanged); a ``generator`` is refused, the warm-up would advance it.
  ``log`` lists what was warmed, in order; the scripts put it in their JSON.
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


class WarmUp:
    """Runs each configuration of a call once, untimed, before the calls that are timed."""

    def __init__(self):
        self.log: list[dict] = []  # the configurations warmed, in order
        self._done: set = set()

    def __call__(self, name: str, fn: Callable, *args, **kwargs) -> None:
        """``fn(*args, **kwargs)`` (result discarded) unless its configuration ran here before."""
        if kwargs.get("generator") is not None:
            raise ValueError(f"{name}: pass seed=, not generator= (the warm-up call would advance the generator)")
        entry = dict(call=name, args=_describe(args),
                     **{k: _describe(v) for k, v in sorted(kwargs.items()) if k not in NOT_CONFIG})
        key = (tuple(id(a) for a in args if isinstance(a, torch.nn.Module)), json.dumps(entry, sort_keys=True))
        if key not in self._done:
            fn(*args, **kwargs)
            self._done.add(key)
            self.log.append(entry)

    def generate(self, model, input_ids, **kwargs):
        """``pjd.generate(model, input_ids, **kwargs)``, its configuration warmed up first."""
        def warm(model, input_ids, **kw):
            pjd.generate(model, input_ids, **{**_warm_settings(model, kw, kw.get("backend", "auto")), "progress": False})

        self("pjd.generate", warm, model, input_ids, **kwargs)
        return pjd.generate(model, input_ids, **kwargs)

    def hf_generate(self, model, input_ids, **kwargs):
        """``pjd.baseline.hf_generate(model, input_ids, **kwargs)``, its configuration warmed up first."""
        from pjd import baseline

        self("hf_generate", lambda m, ids, **kw: baseline.hf_generate(m, ids, **_warm_settings(m, kw, "torch")),
             model, input_ids, **kwargs)
        return baseline.hf_generate(model, input_ids, **kwargs)


def _compiles(model, backend: str) -> bool:
    """Whether a decode of ``model`` with ``backend`` runs Triton kernels (compiled on first use)."""
    from pjd.models.base import adapter_for
    from pjd.ops._backend import resolve_backend, triton_interpreting

    return (backend != "torch" and not triton_interpreting()
            and resolve_backend(backend, adapter_for(model).device) == "triton")


def _warm_settings(model, kwargs: dict, backend: str) -> dict:
    """The warm-up call's settings: the timed call's own where Triton kernels compile on first use;
    one row of the grid (same everything else) where nothing compiles."""
    return kwargs if _compiles(model, backend) else {**kwargs, "height": 1}


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


__all__ = ["WarmUp", "time_ms", "NOT_CONFIG"]
