"""Model adapters, tiny random-weight models, and the embedded default model."""
from .base import CausalLMAdapter, adapter_for
from .tiny import tiny_llama

__all__ = ["CausalLMAdapter", "adapter_for", "tiny_llama"]
