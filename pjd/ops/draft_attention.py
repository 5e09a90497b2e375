"""Row-causal draft attention: the attention of one pjd decoding step.

Visibility rule (docs/design.md §3): key j is visible to query i iff
    k_group[j] != -2  and  k_pos[j] <= q_pos[i]  and  (k_group[j] == -1 or k_group[j] == q_group[i])
Group -1 = committed, -2 = never visible (padding, empty slot, masked prompt), g >= 0 = draft of row g.
"""
from __future__ import annotations

import torch

from . import _checks
from ._backend import check_int32, resolve_backend, triton_unsupported

COMMITTED = -1
HIDDEN = -2


def visibility_mask(q_pos, q_group, k_pos, k_group) -> torch.Tensor:
    """Dense boolean mask [B, Nq, Nk] of the visibility rule (reference and tests only)."""
    kg = k_group[:, None, :]
    return (kg != HIDDEN) & (k_pos[:, None, :] <= q_pos[:, :, None]) & (
        (kg == COMMITTED) | (kg == q_group[:, :, None])
    )


def draft_attention_reference(q, k, v, q_pos, q_group, k_pos, k_group, scale: float) -> torch.Tensor:
    """Pure-torch specification: dense scores in fp32, masked softmax, zeros for rows that see nothing."""
    return _reference_masked(q, k, v, sdpa_mask(q_pos, q_group, k_pos, k_group), scale)


def _reference_masked(q, k, v, mask: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """The reference given the step's ``sdpa_mask`` (built once per step by the engine's hook)."""
    visible, sees_any = mask
    group_size = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group_size, dim=1).float()
    v = v.repeat_interleave(group_size, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row that sees nothing is all -inf; softmax would give NaN. Give it zeros instead.
    probs = torch.softmax(scores.masked_fill(~sees_any, 0.0), dim=-1) * sees_any
    return torch.matmul(probs, v).to(q.dtype)


def sdpa_mask(q_pos, q_group, k_pos, k_group) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's mask as SDPA takes it: (visible bool ``[B, 1, Nq, Nk]``, sees_any bool ``[B, 1, Nq, 1]``).

    Built for the step's rows only, and once per step by the engine (every layer of a step reads
    the same keys' metadata): its size is the attention's score count divided by the heads.
    """
    visible = visibility_mask(q_pos, q_group, k_pos, k_group)[:, None]
    return visible, visible.any(-1, keepdim=True)


def draft_attention_sdpa(q, k, v, mask: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """torch SDPA with native grouped-query attention over ``mask = sdpa_mask(...)``: K/V are read in
    place (a strided view of the cache is fine), never repeated, upcast or copied."""
    visible, sees_any = mask
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    # A query that sees nothing (padding) gets zeros as in the reference; some SDPA kernels give NaN.
    return torch.where(sees_any, out, 0.0)


@torch.library.custom_op("pjd::draft_attention", mutates_args=())
def _draft_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_pos: torch.Tensor, q_group: torch.Tensor, k_pos: torch.Tensor, k_group: torch.Tensor,
    scale: float, backend: str,
) -> torch.Tensor:
    if backend == "triton":
        from pjd.kernels.draft_attention import draft_attention_triton

        return draft_attention_triton(q, k, v, q_pos, q_group, k_pos, k_group, scale)
    if backend == "sdpa":
        mask = sdpa_mask(q_pos, q_group, k_pos, k_group)
        return draft_attention_sdpa(q, k, v, mask, scale).contiguous()
    return draft_attention_reference(q, k, v, q_pos, q_group, k_pos, k_group, scale)


@_draft_attention_op.register_fake
def _(q, k, v, q_pos, q_group, k_pos, k_group, scale, backend):
    return q.new_empty(q.shape)  # contiguous, q's dtype: what torch, sdpa and triton return


def draft_attention_step(q, k, v, q_pos, q_group, k_pos, k_group, scale: float, backend: str, mask=None):
    """``draft_attention`` as a decoding step calls it once per layer: no argument checks (the engine
    builds the metadata), ``backend`` already resolved ("torch", "sdpa" or "triton"), ``mask`` the
    step's ``sdpa_mask`` (sdpa and torch backends) built once per step by the caller, and in eager
    mode no custom-op dispatch (under torch.compile the registered op is traced). Same outputs as
    ``draft_attention``."""
    if backend == "triton":
        if torch.compiler.is_compiling():
            return _draft_attention_op(q, k, v, q_pos, q_group, k_pos, k_group, scale, backend)
        from pjd.kernels.draft_attention import draft_attention_triton

        return draft_attention_triton(q, k, v, q_pos, q_group, k_pos, k_group, scale)
    if backend == "sdpa":
        return draft_attention_sdpa(q, k, v, mask, scale)
    return _reference_masked(q, k, v, mask, scale)


def draft_attention(q, k, v, q_pos, q_group, k_pos, k_group, *, scale=None, backend="auto"):
    """Attention of draft queries over a KV cache under the row-causal visibility rule.

    Args:
        q: ``[B, Hq, Nq, D]`` fp16 / bf16 / fp32 queries.
        k, v: ``[B, Hkv, Nk, D]`` keys and values, same dtype and device as q; ``Hq % Hkv == 0``
            (grouped-query attention: query head h reads kv head ``h // (Hq // Hkv)``).
        q_pos, q_group: int32 ``[B, Nq]`` raster position and row group of each query.
        k_pos, k_group: int32 ``[B, Nk]`` raster position and state of each key:
            -1 committed, -2 never visible, g >= 0 draft of row g.
        scale: finite softmax scale, default ``D ** -0.5``.
        backend: "auto" (triton on CUDA, sdpa elsewhere and for shapes the kernel cannot serve, with a
            one-time warning), "torch" (the reference), "sdpa" (torch's scaled_dot_product_attention
            with a boolean mask of the step's rows) or "triton" (any head dim 1..256).

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype. A query that sees no key gets zeros.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {list(t.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, Nq, D = q.shape
    if D == 0:
        raise ValueError(f"q must have head dim D >= 1, got shape {list(q.shape)}")
    Bk, Hkv, Nk, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"k must be [B={B}, Hkv, Nk, D={D}], got {list(k.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of k/v's {Hkv} heads (grouped-query attention "
                         "needs Hq % Hkv == 0)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected {q.device} (same device as q)")
    check_int32("q_pos", q_pos, (B, Nq), q.device)
    check_int32("q_group", q_group, (B, Nq), q.device)
    check_int32("k_pos", k_pos, (B, Nk), q.device)
    check_int32("k_group", k_group, (B, Nk), q.device)
    scale = D ** -0.5 if scale is None else _checks.finite("scale", scale)
    backend = resolve_backend(backend, q.device, lambda: triton_unsupported(("draft_attention", D, q.dtype)))
    return _draft_attention_op(q, k, v, q_pos, q_group, k_pos, k_group, scale, backend)
