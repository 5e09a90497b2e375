"""Model adapters, tiny random-weight models, and the embedded default model (``pjd.models.default()``)."""
from .base import CausalLMAdapter, adapter_for
from .default import DefaultModel, default
from .tiny import tiny_llama

__all__ = ["CausalLMAdapter", "adapter_for", "DefaultModel", "default", "tiny_llama"]
