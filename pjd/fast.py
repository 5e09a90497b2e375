"""`import pjd.fast`: a "pjd" attention implementation for Hugging Face transformers.

Importing registers "pjd" with transformers' ``AttentionInterface`` and the matching
``AttentionMaskInterface`` entry (without the latter, transformers treats "pjd" as a backend that
needs no mask and silently drops 2-D padding masks). Outside pjd decoding the implementation is
exactly SDPA's (same mask, same kernel), so a model loaded or switched to it gives the same logits,
KV-cache decoding with ``DynamicCache`` included. During a pjd decoding step (``pjd.cache.active_step()``
is set) the mask function returns None (no dense mask is built) and the attention function writes
the layer's new keys/values into pjd's cache and runs ``pjd.ops.draft_attention`` over it with the
row-causal metadata.

``patch(model)`` / ``unpatch(model)`` switch an already loaded model: the top-level config, the
text (decoder) config of multimodal classes, and the config every decoder attention layer reads.
Vision towers and VQ models keep their implementation (pjd never decodes through them).
"""
from __future__ import annotations

import contextlib
import threading
import warnings

from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pjd.cache import active_step

NAME = "pjd"
_SAVED = "_pjd_saved_attn"
_USERS = "_pjd_decoders"  # number of running `patched` blocks that switched the model
_LOCK = threading.Lock()  # guards patch/unpatch + the count of `patched` (threads decoding one model)


def pjd_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query [B, H, Q, D], key/value [B, Hkv, K, D] -> ([B, Q, H, D], None)."""
    active = active_step()
    if active is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; pjd cannot map it to a cache layer")
    for feature in ("sliding_window", "softcap"):
        if kwargs.get(feature) is not None:
            raise NotImplementedError(f"{type(module).__name__} uses {feature}={kwargs[feature]}; "
                                      "pjd decoding supports plain causal attention only")
    k, v, k_pos, k_group = active.cache.update(layer, key, value)
    out = active.attend(query, k, v, k_pos, k_group, float(query.shape[-1] ** -0.5 if scaling is None else scaling))
    # No copy here: the model's own reshape to [B, Q, H * D] copies only where the output is not
    # already laid out [B, Q, H, D] (the sdpa path returns it so for transformers' transposed queries).
    return out.transpose(1, 2), None


def pjd_mask(*args, **kwargs):
    """transformers mask function: SDPA's mask, or None during a pjd step (the hook needs none)."""
    if active_step() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, pjd_attention)
AttentionMaskInterface.register(NAME, pjd_mask)
# transformers checks this very mapping to decide whether a backend gets masks at all.
assert NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def _decoder_configs(model) -> list:
    """The configs the text decoder reads: top-level, text config, and each attention layer's."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config(decoder=True))
    configs += [m.config for m in model.modules()
                if getattr(m, "layer_idx", None) is not None and hasattr(m, "config")]
    unique = {id(c): c for c in configs}
    return list(unique.values())


def why_not_patchable(model) -> str | None:
    """Why ``patch`` would fail for this model, or None if it can be patched."""
    if not isinstance(model, PreTrainedModel):
        return f"it is a {type(model).__name__}, not a transformers PreTrainedModel"
    layers = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None]
    if not layers:
        return "it has no attention layer with a layer_idx (pjd maps layers to cache slots by layer_idx)"
    owners = [model] + [m for m in model.modules() if isinstance(m, PreTrainedModel)
                        and any(m.config is layer.config for layer in layers if hasattr(layer, "config"))]
    for owner in owners:
        if not owner._can_set_attn_implementation():
            return (f"{type(owner).__name__} does not dispatch attention through transformers' "
                    "AttentionInterface (ALL_ATTENTION_FUNCTIONS), so an attention implementation cannot be swapped in")
    return None


def patch(model) -> bool:
    """Switch a loaded model's text decoder to the "pjd" attention implementation.

    Returns True on success (also when already patched). Returns False, with a warning saying why,
    when the model cannot use it (not a transformers model, no attention layer with ``layer_idx``,
    or attention not dispatched through ``AttentionInterface``); the model is then left unchanged.
    """
    reason = why_not_patchable(model)
    if reason is not None:
        warnings.warn(f"pjd.fast.patch: cannot patch {type(model).__name__}: {reason}", stacklevel=2)
        return False
    if not hasattr(model, _SAVED):
        configs = _decoder_configs(model)
        # The internal attribute: the public setter would also rewrite vision/VQ sub-configs.
        setattr(model, _SAVED, [(c, c._attn_implementation_internal) for c in configs])
        for config in configs:
            config._attn_implementation_internal = NAME
    return True


def unpatch(model) -> None:
    """Restore exactly the attention implementations a model had before ``patch`` (no-op if not patched)."""
    for config, previous in getattr(model, _SAVED, []):
        config._attn_implementation_internal = previous
    if hasattr(model, _SAVED):
        delattr(model, _SAVED)


def is_patched(model) -> bool:
    """Whether every config the text decoder reads selects "pjd" (by ``patch`` or at load time)."""
    return isinstance(model, PreTrainedModel) and all(
        c._attn_implementation_internal == NAME for c in _decoder_configs(model))


@contextlib.contextmanager
def patched(model):
    """Run a block with the model's decoder on "pjd" attention, restoring its previous setting after.

    Thread-safe and reentrant: concurrent blocks on one model share the switch (a per-model count
    under a lock), and the last one to leave restores the model. A model already on "pjd" (by
    ``patch`` or at load time) is left as it is.
    """
    with _LOCK:
        users = getattr(model, _USERS, 0)
        if users == 0 and is_patched(model):
            owned = False
        else:
            if users == 0 and not patch(model):
                raise ValueError(f"model {type(model).__name__} cannot use pjd attention (see the warning above)")
            setattr(model, _USERS, users + 1)
            owned = True
    try:
        yield model
    finally:
        if owned:
            with _LOCK:
                users = getattr(model, _USERS) - 1
                if users == 0:
                    unpatch(model)
                    delattr(model, _USERS)
                else:
                    setattr(model, _USERS, users)


__all__ = ["patch", "unpatch", "patched", "is_patched", "pjd_attention", "pjd_mask", "NAME"]
