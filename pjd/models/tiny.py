"""Tiny random-weight Llama models: for tests, the CLI smoke run, and benchmarks of the engine."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size: int = 64, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, max_positions: int = 4096, logit_scale: float = 1.0, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A small LlamaForCausalLM with seeded random weights (eval mode).

    logit_scale multiplies the output head: > 1 makes next-token distributions peaked, which is
    what draft acceptance and the losslessness tests need.
    """
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.to(dtype).eval()
