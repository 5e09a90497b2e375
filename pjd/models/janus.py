"""Janus-Pro (``JanusForConditionalGeneration``): separate image-generation embedding and head.

Janus generates image tokens that are VQ codebook ids, not vocabulary ids: an image token is
embedded by ``generation_embeddings`` + ``generation_aligner`` (``prepare_embeddings_for_image_generation``)
and scored by ``generation_head`` over the codebook, while the prompt is text embedded by the language
model's ``embed_tokens``. The engine works in one id space, so JanusAdapter uses:

    [0, codebook_size)            image tokens (codebook ids; the logits cover exactly these)
    codebook_size + t             text token t of the prompt

``janus_prompt`` builds prompts in that space. CFG as the official pipeline: the unconditional
row is the same prompt with every token but BOS and ``<begin_of_image>`` replaced by the pad token
(attended, so both rows have the same positions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (CausalLMAdapter, as_sequences, check_codebook_ids, check_grid_size, engine_kwargs, left_pad,
                   no_packing_mask, to_pil)


class JanusAdapter(CausalLMAdapter):
    """forward: image ids -> generation embedding, text ids -> text embedding, language model on
    ``inputs_embeds``, generation head -> logits ``[Bx, N, codebook_size]``."""

    def __init__(self, model):
        super().__init__(model)
        self.codebook_size = model.config.vq_config.num_embeddings

    @property
    def text_offset(self) -> int:
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size

    @property
    def input_vocab_size(self) -> int:
        return self.codebook_size + super().input_vocab_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits: bool = True):
        model, K = self.model, self.codebook_size
        is_image = (input_ids < K)[..., None]
        text = model.get_input_embeddings()((input_ids - K).clamp(min=0))
        image = model.prepare_embeddings_for_image_generation(input_ids.clamp(max=K - 1))
        embeds = torch.where(is_image, image.to(text.dtype), text)
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False,
                                            attention_mask=no_packing_mask(input_ids)).last_hidden_state
        return model.model.generation_head(hidden) if logits else None


ADAPTER = JanusAdapter


def _special(model, name: str, given: int | None) -> int:
    """A special token id: given, else from the generation config (HF Janus conversions store
    ``generation_kwargs["boi_token_id"]``, some ``boi_token_id`` itself) or, for the pad, the text config."""
    if given is not None:
        return int(given)
    gen = getattr(model, "generation_config", None)
    value = (getattr(gen, "generation_kwargs", None) or {}).get(name) if name == "boi_token_id" else None
    if value is None:
        value = getattr(gen, name, None)
    if value is None and name == "pad_token_id":
        value = model.config.text_config.pad_token_id
    if value is None:
        raise ValueError(f"the model's generation config has no {name}; pass {name}= explicitly")
    return int(value)


def janus_prompt(model, text_ids, *, height: int | None = None, width: int | None = None, cfg_scale: float = 1.0,
                 boi_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """Engine kwargs (``pjd.generate(model, **prompt, method=...)``) for Janus-Pro text-to-image.

    Args:
        model: a JanusForConditionalGeneration.
        text_ids: tokenized prompts (text vocabulary ids, BOS first, Janus' SFT template applied),
            without ``<begin_of_image>``, one list per image (ragged: left-padded here).
        height, width: token grid; default the VQ model's native grid (24 x 24 for Janus-Pro 384 px).
        cfg_scale: != 1 adds the pad-token unconditional rows.
        boi_token_id, pad_token_id: default from ``model.generation_config``
            (``generation_kwargs["boi_token_id"]`` or ``boi_token_id``; ``pad_token_id``).

    Janus-Pro's official recipe (``generation_inference.py``): CFG 5, temperature 1, sampling from the
    full codebook (no top-k): ``pjd.generate(model, **prompt, top_k=0)``.
    """
    native = model.config.vq_config.num_patches
    height = native if height is None else height
    width = native if width is None else width
    check_grid_size(height, width)
    boi, pad = _special(model, "boi_token_id", boi_token_id), _special(model, "pad_token_id", pad_token_id)
    seqs = as_sequences("text_ids", text_ids)
    if any(len(s) < 1 for s in seqs):
        raise ValueError("every prompt in text_ids needs at least its BOS token")
    uncond = [s[:1] + [pad] * (len(s) - 1) + [boi] for s in seqs]
    offset = model.config.vq_config.num_embeddings  # JanusAdapter's id space
    ids, mask = left_pad([[t + offset for t in s + [boi]] for s in seqs], offset + pad, model.device)
    uncond_ids, _ = left_pad([[t + offset for t in s] for s in uncond], offset + pad, model.device)
    return engine_kwargs(ids=ids, mask=mask, uncond_ids=uncond_ids, uncond_mask=mask, cfg_scale=cfg_scale,
                         height=height, width=width, image_token_range=(0, offset))


def decode_pixels(model, tokens: torch.Tensor) -> torch.Tensor:
    """Codebook ids ``[B, h, w]`` -> pixels ``[B, 3, f*h, f*w]`` in [-1, 1] (f: the VQ's upsampling, 16 for
    Janus-Pro). Same computation as
    ``JanusVQVAE.decode`` (l2-normalised codebook entries, post-quant conv, decoder), for any grid."""
    vq = model.model.vqmodel
    latents = F.normalize(vq.quantize.embedding(tokens), p=2, dim=-1).permute(0, 3, 1, 2)
    return vq.decoder(vq.post_quant_conv(latents))


def decode_images(model, tokens: torch.Tensor) -> list:
    check_codebook_ids(tokens, model.config.vq_config.num_embeddings)
    with torch.no_grad():
        return to_pil(decode_pixels(model, tokens))


__all__ = ["JanusAdapter", "janus_prompt", "decode_images", "decode_pixels"]
