"""Host reads per decoding step: how often a decode brings a value back from the device.

Counts, over a whole ``pjd.generate`` call, the dispatched ops that read a tensor's value on the host
(``HOST_READS``: ``.item()``, ``int()``, ``bool()``, data-dependent shapes) and ``Tensor.tolist`` (which
dispatches nothing on a CPU tensor), for ar and pjd on the embedded model (CFG 3, two images), with
dynamic shapes (the CPU eager default) and fixed shapes (``fixed_shapes=True``: the step CUDA runs and
captures). The counts include the call's setup and its end (the result), not only the loop;
tests/test_fixed_step.py checks the loop alone (at most one read per ten steps in steady state). A
compiled step is not counted here: dynamo does not trace under a dispatch mode.

Usage: python benchmarks/host_reads.py [--threads 1]
"""
from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that bring a tensor's value to the host (.item(), int(), bool(), data-dependent shapes).
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
              "_unique2", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Counts the ops of ``HOST_READS`` dispatched inside the ``with`` block (``ops``, by name)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in HOST_READS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_tolist(counter: collections.Counter):
    """``Tensor.tolist`` calls inside the block, counted in ``counter["tolist"]``."""
    tolist = torch.Tensor.tolist

    def counted(self):
        counter["tolist"] += 1
        return tolist(self)

    torch.Tensor.tolist = counted
    try:
        yield counter
    finally:
        torch.Tensor.tolist = tolist


def main(argv=None) -> list[dict]:
    import pjd
    from pjd.models import default

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dm = default()
    labels = torch.tensor([0, 3])
    rows = []
    print("| method | shapes | steps | host reads (whole call) | per step | ops |\n|---|---|---|---|---|---|")
    for method in ("ar", "pjd"):
        for shapes, kw in (("dynamic", {}), ("fixed", dict(fixed_shapes=True))):
            with HostReads() as reads, counting_tolist(collections.Counter()) as tolist, torch.no_grad():
                r = pjd.generate(dm.model, dm.prompt(labels), height=dm.height, width=dm.width, method=method,
                                 image_token_range=dm.image_token_range, cfg_scale=3.0,
                                 uncond_input_ids=dm.null_prompt(len(labels)), seed=0, progress=False, **kw)
            total = sum(reads.ops.values()) + tolist["tolist"]
            rows.append(dict(method=method, shapes=shapes, steps=r.steps, reads=total, ops=dict(reads.ops, **tolist)))
            print(f"| {method} | {shapes} | {r.steps} | {total} | {total / r.steps:.2f} | {rows[-1]['ops']} |")
    return rows


if __name__ == "__main__":
    main()
