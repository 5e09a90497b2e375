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


# Tiny multimodal models: real transformers classes, tiny random weights, vocabularies laid out like
# the real checkpoints' (special tokens by name). VQ channel counts are multiples of 32 (GroupNorm(32)).
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)
_VQ = dict(base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1)


def _seeded(cls, config, seed: int, logit_head):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    with torch.no_grad():
        logit_head(model).weight.mul_(4.0)  # peaked distributions, so drafts get accepted
    return model.eval()


def tiny_chameleon(codebook_size: int = 32, seed: int = 0):
    """ChameleonForConditionalGeneration with a Lumina-mGPT-style vocabulary: image tokens IMGIMG*
    at ids 4.. in a shuffled codebook order, <racm3:break>, <eoss>, EOL <reserved08799>, size tokens
    <reserved08801..08808>, and 16 text tokens t0..t15."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    order = torch.randperm(codebook_size, generator=torch.Generator().manual_seed(seed)).tolist()
    for code in order:
        vocab["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = len(vocab)
    for name in ["<eoss>", "<racm3:break>", "<reserved08799>", *(f"<reserved{8800 + n:05d}>" for n in range(1, 9)),
                 *(f"t{i}" for i in range(16))]:
        vocab[name] = len(vocab)
    config = ChameleonConfig(vocab_size=len(vocab), vocabulary_map=vocab, pad_token_id=0, **_TEXT,
                             vq_config=dict(embed_dim=8, num_embeddings=codebook_size, latent_channels=32,
                                            resolution=32, **_VQ))
    return _seeded(ChameleonForConditionalGeneration, config, seed, lambda m: m.lm_head)


def tiny_janus(codebook_size: int = 32, text_vocab: int = 48, image_size: int = 48, seed: int = 0):
    """JanusForConditionalGeneration: Llama text model (vocab ``text_vocab``: 0 pad, 1 BOS, 2 BOI),
    SigLIP-style vision tower, VQ with ``codebook_size`` codes and a native grid of image_size / 16."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    hidden = _TEXT["hidden_size"]
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=text_vocab, pad_token_id=0, bos_token_id=1, **_TEXT),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                           patch_size=16, projection_dim=hidden, mlp_ratio=2.0,
                           num_image_tokens=(image_size // 16) ** 2),
        vq_config=dict(embed_dim=8, num_embeddings=codebook_size, latent_channels=32, projection_dim=hidden,
                       image_token_embed_dim=hidden, **_VQ))
    model = _seeded(JanusForConditionalGeneration, config, seed, lambda m: m.model.generation_head.vision_head)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        # The default init (std 0.02, two layers) makes the image head's logits nearly constant.
        torch.manual_seed(seed)
        for layer in (model.model.generation_head.proj_out, model.model.generation_head.vision_head):
            layer.weight.normal_(0.0, 2.0 * layer.weight.shape[1] ** -0.5)
    model.generation_config.pad_token_id = 0
    model.generation_config.generation_kwargs = {"boi_token_id": 2}
    return model


def tiny_emu3(codebook_size: int = 32, seed: int = 0):
    """Emu3ForConditionalGeneration with an Emu3-style vocabulary: specials by name, digits and '*'
    (size text), 12 text tokens t0..t11, then <|visual token 000000|>.. contiguous."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vocab = {}
    for name in ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<image>", "<|image start|>", "<|image end|>",
                 "<|image token|>", "<|extra_200|>", "<|extra_201|>", *"0123456789*", *(f"t{i}" for i in range(12)),
                 *(f"<|visual token {c:06d}|>" for c in range(codebook_size))]:
        vocab[name] = len(vocab)
    config = Emu3Config(
        text_config=dict(vocab_size=len(vocab), pad_token_id=0, bos_token_id=1, eos_token_id=2, **_TEXT),
        vq_config=dict(codebook_size=codebook_size, embed_dim=4, latent_channels=4, attn_resolutions=[1],
                       hidden_size=32, num_attention_heads=1, **_VQ),
        vocabulary_map=vocab)
    return _seeded(Emu3ForConditionalGeneration, config, seed, lambda m: m.lm_head)


class TinyClassModel:
    """A tiny class-conditional image model with random weights, for smoke runs and tests of
    ``pjd sample`` / ``pjd eval`` (its images say nothing about any real model).

    The same interface as the default model: ids ``[0, K)`` are image tokens, ``K + c`` the class
    token of class c, ``K + C`` the null class for CFG; token t decodes to a fixed RGB colour.
    """

    def __init__(self, *, classes: int = 4, codebook: int = 16, height: int = 8, width: int = 8, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.class_names = tuple(f"class{c}" for c in range(classes))
        self.image_token_range = (0, codebook)
        self.null_class_id = codebook + classes
        self.height, self.width = height, width
        self.model = tiny_llama(codebook + classes + 1, hidden_size=32, layers=2, heads=2, kv_heads=1,
                                max_positions=height * width + 8, logit_scale=4.0, seed=seed).to(device)
        self.colors = torch.randint(0, 256, (codebook, 3), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(seed))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]`` -> input ids ``[B, 1]``."""
        return (torch.as_tensor(class_ids).long() + self.image_token_range[1])[:, None].to(self.device)

    def null_prompt(self, batch: int) -> torch.Tensor:
        return torch.full((batch, 1), self.null_class_id, dtype=torch.long, device=self.device)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, H, W]`` -> uint8 RGB ``[B, H, W, 3]`` on CPU."""
        return self.colors[torch.as_tensor(tokens).long().cpu()]
