"""`import pjd.fast`: a "pjd" attention implementation for Hugging Face transformers.

Importing registers "pjd" with transformers' ``AttentionInterface`` and the matching
``AttentionMaskInterface`` entry (without the latter, transformers silently drops 2-D padding
masks). Outside pjd decoding the implementation is exactly SDPA's (same mask, same kernel), so a
model switched to it gives the same logits. During a pjd decoding step the hook writes the
layer's new keys/values into pjd's cache and runs ``pjd.ops.draft_attention`` over the cache with
the row-causal metadata: no dense mask is built.

``patch(model)`` / ``unpatch(model)`` switch an already loaded model (every sub-config, so the
language model inside a multimodal class is switched too).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pjd.cache import active_step
from pjd.ops import draft_attention

NAME = "pjd"


def pjd_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query [B, H, Q, D], key/value [B, Hkv, K, D] -> [B, Q, H, D]."""
    active = active_step()
    if active is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; pjd cannot map it to a cache layer")
    k, v, k_pos, k_group = active.cache.update(layer, key, value)
    step = active.step
    out = draft_attention(query, k, v, step.q_pos, step.q_group, k_pos, k_group,
                          scale=scaling, backend=active.backend)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, pjd_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
assert NAME in ALL_MASK_ATTENTION_FUNCTIONS


def _configs(model):
    config = model.config
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            yield sub


def patch(model) -> bool:
    """Switch a loaded model to the "pjd" attention implementation. Returns False (with a warning
    saying why) when the model does not use transformers' attention interface."""
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        warnings.warn(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface; "
            "pjd cannot patch it",
            stacklevel=2,
        )
        return False
    if not hasattr(model, "_pjd_saved_attn"):
        model._pjd_saved_attn = [(c, c._attn_implementation) for c in _configs(model)]
    for config, _ in model._pjd_saved_attn:
        config._attn_implementation = NAME
    return True


def unpatch(model) -> None:
    """Restore the attention implementation a model had before ``patch``."""
    for config, previous in getattr(model, "_pjd_saved_attn", []):
        config._attn_implementation = previous
    if hasattr(model, "_pjd_saved_attn"):
        del model._pjd_saved_attn


@contextlib.contextmanager
def patched(model):
    """Run a block with the model on "pjd" attention, restoring its previous setting afterwards."""
    already = hasattr(model, "_pjd_saved_attn")
    if not already and not patch(model):
        raise ValueError(f"model {type(model).__name__} cannot use pjd attention (see the warning above)")
    try:
        yield model
    finally:
        if not already:
            unpatch(model)


__all__ = ["patch", "unpatch", "patched", "pjd_attention", "NAME"]
