"""Host time of one call of the "pjd" attention hook (pjd.fast.pjd_attention) during a decoding step.

What a model pays per attention layer on top of the attention itself: the cache write, the metadata
(mask, checks, backend), the dispatch, the output layout. Measured on a shape where the attention
costs almost nothing (one image, 2 heads, 8 queries, 64 cached keys, head dim 8), so the figure is
Python and dispatch: the per-layer overhead of the issue 20 before/after table. One step of
``LAYERS`` layers is timed (the hook is called once per layer, as a model does), median over
``--repeats`` steps, reported per layer call, in CPU time of the process (``time.process_time``:
what the host spends, and less distorted than wall time on a shared machine).

Usage: python benchmarks/layer_overhead.py [--repeats 200] [--backends sdpa,torch]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pjd import fast
from pjd.cache import ActiveStep, SlotCache, StepInputs

LAYERS = 24


class Layer(torch.nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.layer_idx = index


def step_inputs(n: int, kv: int) -> StepInputs:
    pos = torch.arange(kv - n, kv, dtype=torch.int32)[None]
    return StepInputs(q_pos=pos, q_group=torch.zeros_like(pos), key_pos=pos, key_group=torch.zeros_like(pos),
                      slot=(pos + 3).long(), kv_len=kv + 3)


def per_layer_us(backend: str, repeats: int) -> float:
    torch.manual_seed(0)
    H, N, KV, D = 2, 8, 64, 8
    cache = SlotCache(1, KV, 2, torch.device("cpu"))
    cache.group[:, 3:3 + KV - N] = -1  # committed prefix
    layers = [Layer(i) for i in range(LAYERS)]
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    times = []
    for _ in range(repeats + 1):  # the first step is a warm-up (allocates the cache's K/V)
        step = step_inputs(N, KV)
        cache.begin(step)
        t0 = time.process_time()
        with ActiveStep(cache, step, backend):
            for layer in layers:
                fast.pjd_attention(layer, q, k, v, None)
        times.append(time.process_time() - t0)
    return statistics.median(times[1:]) / LAYERS * 1e6


def op_overhead_us(repeats: int) -> float:
    """What the public ``pjd.ops.draft_attention`` adds per call to the attention it runs (argument
    checks, backend resolution, custom-op dispatch, mask): the per-layer cost the hook paid on every
    backend but sdpa before issue 20, now paid once per step or not at all."""
    from pjd.ops import draft_attention
    from pjd.ops.draft_attention import draft_attention_sdpa, sdpa_mask

    H, N, KV, D = 2, 8, 64, 8
    q, k, v = torch.randn(1, H, N, D), torch.randn(1, H, KV, D), torch.randn(1, H, KV, D)
    step = step_inputs(N, KV)
    k_pos, k_group = torch.arange(KV, dtype=torch.int32)[None], torch.full((1, KV), -1, dtype=torch.int32)
    mask = sdpa_mask(step.q_pos, step.q_group, k_pos, k_group)

    def cpu_us(fn):
        times = []
        for _ in range(repeats + 1):
            t0 = time.process_time()
            for _ in range(LAYERS):
                fn()
            times.append(time.process_time() - t0)
        return statistics.median(times[1:]) / LAYERS * 1e6

    public = cpu_us(lambda: draft_attention(q, k, v, step.q_pos, step.q_group, k_pos, k_group, backend="sdpa"))
    return public - cpu_us(lambda: draft_attention_sdpa(q, k, v, mask, D ** -0.5))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--backends", default="sdpa,torch")
    args = parser.parse_args(argv)
    print(f"host CPU us per attention-layer call ({torch.get_num_threads()} thread(s), median of {args.repeats} "
          f"steps of {LAYERS} layers)")
    for backend in args.backends.split(","):
        print(f"  {backend:6s} {per_layer_us(backend, args.repeats):7.1f} us")
    print(f"  public draft_attention's own overhead per call (checks, resolution, dispatch, mask): "
          f"{op_overhead_us(args.repeats):.1f} us")


if __name__ == "__main__":
    main()
