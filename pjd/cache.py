"""KV caches for pjd decoding: two layouts with the same results (docs/design.md §2).

Both keep, per key, its raster position and its state (``k_group``: -1 committed, -2 hidden,
g >= 0 draft of lane g), which is exactly what ``pjd.ops.draft_attention`` reads. A step is
``begin(step)`` -> one ``update`` per layer (called from the attention hook) -> ``end(keep)``.

- SlotCache (default): preallocated, indexed by raster position. Each input writes its own slot;
  committing is a metadata flip and a rejected draft's slot is just marked hidden. Scratch slots
  come first: one per lane for scaffold keys, then one shared "discard" slot for inputs whose key
  must not be kept (padding, a re-fed token whose key is already cached).
- AppendCache: K/V of each step's inputs are appended at the tail (Hugging Face DynamicCache
  style); after verification rejected entries are removed and kept ones moved together with
  ``pjd.ops.compact_kv`` (all layers in one call).

Fixed shapes (the host-read-free step, ``pjd.engine``): ``StepInputs.kv_len`` is the whole cache
(``SlotCache.size``; the metadata hides the slots nothing wrote), and the append layout takes a
``staging`` width: every step writes its entries to the last ``staging`` columns and compacts the
kept ones down to each row's length, so no step reads the new tail back.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

from pjd.ops.draft_attention import draft_attention_step, sdpa_mask

HIDDEN_POS = torch.iinfo(torch.int32).max


@dataclass
class StepInputs:
    """Row-causal metadata of one forward pass over N packed inputs (all int tensors [Bx, N])."""

    q_pos: torch.Tensor        # int32: raster position of each query (-1: padding, sees nothing)
    q_group: torch.Tensor      # int32: lane of each query
    key_pos: torch.Tensor      # int32: raster position the input's key gets
    key_group: torch.Tensor    # int32: state the input's key has during this step
    slot: torch.Tensor         # int64: SlotCache index the input writes (scratch or L+1+raster)
    kv_len: int                # SlotCache: keys [0, kv_len) cover every slot a query can see


class SlotCache:
    def __init__(self, batch: int, num_positions: int, num_lanes: int, device: torch.device):
        self.num_scratch = num_lanes + 1
        self.size = self.num_scratch + num_positions
        self.pos = torch.empty((batch, self.size), dtype=torch.int32, device=device)
        self.group = torch.empty((batch, self.size), dtype=torch.int32, device=device)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Empty, in place (the tensors a compiled step reads stay the same)."""
        self.pos.fill_(HIDDEN_POS)
        self.pos[:, self.num_scratch:] = torch.arange(self.size - self.num_scratch, dtype=torch.int32,
                                                      device=self.pos.device)
        self.group.fill_(-2)
        for t in (*self.k.values(), *self.v.values()):
            t.zero_()
        self._step: StepInputs | None = None

    def begin(self, step: StepInputs) -> None:
        self._step = step
        self.pos.scatter_(1, step.slot, step.key_pos)
        self.group.scatter_(1, step.slot, step.key_group)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        step = self._step
        if layer not in self.k:
            shape = (k.shape[0], k.shape[1], self.pos.shape[1], k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        index = step.slot[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        n = step.kv_len
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n], self.pos[:, :n], self.group[:, :n]

    def end(self, keep: torch.Tensor) -> None:
        """keep [Bx, N]: the inputs whose key stays as committed; the others become hidden."""
        state = torch.where(keep, -1, -2).to(torch.int32)
        self.group.scatter_(1, self._step.slot, state)
        self._step = None


class AppendCache:
    """``staging``: None appends each step after the longest row (its end read back on the host after
    the compaction); an int N writes every step's (at most N) entries to the last N columns instead,
    a fixed place, and reads nothing back."""

    def __init__(self, batch: int, capacity: int, device: torch.device, staging: int | None = None):
        self.size = capacity
        self.pos = torch.empty((batch, capacity), dtype=torch.int32, device=device)
        self.group = torch.empty((batch, capacity), dtype=torch.int32, device=device)
        self.lengths = torch.empty(batch, dtype=torch.int32, device=device)
        self.staging = staging
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._past_end = torch.arange(capacity, device=device)
        self.reset()

    def reset(self) -> None:
        """Empty, in place (the tensors a compiled step reads stay the same)."""
        self.pos.fill_(HIDDEN_POS)
        self.group.fill_(-2)
        self.lengths.zero_()
        for t in (*self.k.values(), *self.v.values()):
            t.zero_()
        self.tail = 0  # where this step's entries go: the prefill's at 0, then see ``staging``
        self._n = 0

    def begin(self, step: StepInputs) -> None:
        self._n = n = step.q_pos.shape[1]
        self.pos[:, self.tail:self.tail + n] = step.key_pos
        self.group[:, self.tail:self.tail + n] = step.key_group

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in self.k:
            shape = (k.shape[0], k.shape[1], self.pos.shape[1], k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        end = self.tail + self._n if self.staging is None else self.size
        self.k[layer][:, :, self.tail:self.tail + self._n] = k
        self.v[layer][:, :, self.tail:self.tail + self._n] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.pos[:, :end], self.group[:, :end]

    def end(self, keep: torch.Tensor) -> None:
        from pjd.ops import compact_kv

        end = self.tail + self._n
        self.group[:, self.tail:end] = torch.where(keep, -1, -2).to(torch.int32)
        caches = [t for layer in sorted(self.k) for t in (self.k[layer], self.v[layer])]
        lengths = compact_kv(caches, keep, self.tail, self.lengths, meta=[self.pos, self.group], validate=False)
        self.lengths.copy_(lengths)
        # Whatever lies past a sample's new length is stale: hide it.
        self.group.masked_fill_(self._past_end >= self.lengths[:, None], -2)
        self.tail = int(self.lengths.max()) if self.staging is None else self.size - self.staging


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("pjd_active_step", default=None)


class ActiveStep:
    """What the "pjd" attention hook needs during a decoding forward: the cache, the queries' metadata
    and the resolved backend. Everything per step is done once, at the first layer: the metadata is
    the engine's own (no argument checks), and the mask of the sdpa and torch backends is built then
    and reused by the other layers (they all see the same keys' metadata)."""

    def __init__(self, cache, step: StepInputs, backend: str):
        self.cache, self.step, self.backend = cache, step, backend
        self._mask = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, k_group: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Row-causal attention of this step's queries over the cache's keys (``[B, Hq, Nq, D]``)."""
        step = self.step
        if self._mask is None and self.backend != "triton":
            self._mask = sdpa_mask(step.q_pos, step.q_group, k_pos, k_group)
        return draft_attention_step(q, k, v, step.q_pos, step.q_group, k_pos, k_group, scale, self.backend, self._mask)

    def __enter__(self):
        global _TRACED
        if torch.compiler.is_compiling():  # dynamo traces no ContextVar: a plain global, within one trace
            self._token, _TRACED = _TRACED, self
        else:
            self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc):
        global _TRACED
        if torch.compiler.is_compiling():
            _TRACED = self._token
        else:
            _ACTIVE.reset(self._token)


_TRACED: ActiveStep | None = None  # the step being traced by torch.compile (pjd.compiler)


def active_step() -> ActiveStep | None:
    return _TRACED if torch.compiler.is_compiling() else _ACTIVE.get()
