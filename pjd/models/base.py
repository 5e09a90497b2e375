"""Model adapters: what the engine needs from a model, whatever its family.

The engine calls ``adapter.forward(input_ids [Bx, N], position_ids [Bx, N]) -> logits [Bx, N, V]``
inside a pjd decoding step; attention goes through the "pjd" implementation (pjd.fast), which
reads the step's metadata and the cache from context, so the adapter never sees the cache.
"""
from __future__ import annotations


import torch

from pjd import fast


class CausalLMAdapter:
    """Hugging Face causal LMs whose image tokens are ordinary vocabulary ids (Llama/LlamaGen-style,
    Chameleon/Lumina-mGPT, Emu3)."""

    def __init__(self, model):
        self.model = model
        self.text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    def decoding(self):
        """Context in which forward() runs with pjd attention."""
        return fast.patched(self.model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def adapter_for(model):
    """The adapter for a model: an adapter passes through; HF causal LMs get CausalLMAdapter."""
    if hasattr(model, "forward") and hasattr(model, "decoding") and hasattr(model, "vocab_size"):
        return model
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM or a pjd adapter, got {type(model).__name__}")
    return CausalLMAdapter(model)


__all__ = ["CausalLMAdapter", "adapter_for"]
