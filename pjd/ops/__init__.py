"""pjd.ops: the backend other decoding libraries call.

Every op has a pure-torch reference (the specification), a Triton (or C++/CUDA) implementation,
and a ``backend="auto" | "torch" | "triton"`` switch. Ops are registered with ``torch.library``.
"""
from .compact_kv import compact_kv, compact_kv_backend, compact_kv_reference
from .draft_attention import draft_attention, draft_attention_reference, visibility_mask
from .speculative_verify import PREFIX, TOP, VerifyResult, speculative_verify, speculative_verify_reference

__all__ = [
    "compact_kv", "compact_kv_backend", "compact_kv_reference",
    "draft_attention", "draft_attention_reference", "visibility_mask",
    "speculative_verify", "speculative_verify_reference", "VerifyResult", "TOP", "PREFIX",
]
