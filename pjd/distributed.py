"""One process or many: the torch.distributed plumbing of `pjd sample` and `pjd eval`.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is initialised with
NCCL when decoding on CUDA and Gloo otherwise; rank r decodes on ``cuda:LOCAL_RANK``. Without
torchrun every collective is the identity, so the same code runs as one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Group:
    """This process's place in the run: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather(self, obj) -> list | None:
        """Every rank's picklable ``obj`` as a list on rank 0 (None on the others)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's picklable ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init(device: str) -> tuple[Group, torch.device]:
    """Join the torchrun group if there is one; returns the group and this rank's device.

    ``device`` is "cpu" or "cuda" (or "cuda:N" for a single process); under torchrun "cuda" becomes
    ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = Group(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device(device)
    if dev.type == "cuda" and group.enabled:
        dev = torch.device("cuda", group.local_rank)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but torch has no CUDA device here")
        torch.cuda.set_device(dev)
    if group.enabled and not torch.distributed.is_initialized():
        kwargs = dict(device_id=dev) if dev.type == "cuda" else {}
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kwargs)
    return group, dev
