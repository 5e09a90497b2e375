"""Model adapters, prompt builders per family, tiny random-weight models, and the embedded default
model (``pjd.models.default()``: class-conditional Fashion-MNIST in LlamaGen's format, pjd/fashion/)."""
from .base import CausalLMAdapter, adapter_for, decode_images
from .chameleon import ChameleonAdapter, load_lumina_mgpt, lumina_prompt, lumina_text_ids
from .emu3 import emu3_prompt
from .janus import JanusAdapter, janus_prompt
from .llamagen import GPT_MODELS, LlamaGenArch, LlamaGenForCausalLM, llamagen_prompt, load_llamagen
from .tiny import tiny_chameleon, tiny_emu3, tiny_janus, tiny_llama
from pjd.fashion.default import DefaultModel, default  # noqa: E402 (after .llamagen, which it loads)

__all__ = ["CausalLMAdapter", "ChameleonAdapter", "JanusAdapter", "adapter_for", "decode_images",
           "llamagen_prompt", "load_llamagen", "LlamaGenForCausalLM", "LlamaGenArch", "GPT_MODELS",
           "lumina_prompt", "lumina_text_ids", "load_lumina_mgpt", "janus_prompt", "emu3_prompt",
           "DefaultModel", "default",
           "tiny_llama", "tiny_chameleon", "tiny_janus", "tiny_emu3"]
