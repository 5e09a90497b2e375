"""Chameleon / Lumina-mGPT (``ChameleonForConditionalGeneration`` and subclasses).

Image tokens are vocabulary (BPE) ids: the VQ codebook id c is the token named ``IMGIMG<c>Z`` (digits
written as letters A-J) in ``config.vocabulary_map``; transformers exposes the mapping as
``model.model.vocabulary_mapping`` (``img2bpe`` / ``bpe2img``). pjd samples BPE ids (the logits
are over the vocabulary) and maps back to codebook ids only to decode.

Lumina-mGPT's image layout (its FlexARItemProcessor): ``<racm3:break>`` (image start), two size
tokens ``<reserved{8800 + n:05d}>`` with n = pixels / 32 for height then width (so n = tokens / 2
with the 16x VQ), then rows of image tokens each followed by ``<reserved08799>`` (EOL).
CFG as Lumina-mGPT's guidance processor: the unconditional sequence starts at the image-start
token; here it is the same prompt with every token before ``<racm3:break>`` masked out, so its
RoPE positions also start at 0 there (positions count real tokens only).
"""
from __future__ import annotations

import torch

from .base import (CausalLMAdapter, as_sequences, check_grid_size, contiguous_range, engine_kwargs, left_pad,
                   vocab_id)

IMAGE_START = "<racm3:break>"
EOL = "<reserved08799>"
LATENT_PER_SIZE_TOKEN = 2  # one size unit = 32 px = 2 tokens of the 16x VQ


def size_token(n: int) -> str:
    return f"<reserved{8800 + n:05d}>"


class ChameleonAdapter(CausalLMAdapter):
    """ChameleonForConditionalGeneration.forward sets every image-token logit to the dtype's minimum
    (it is a text chat model in transformers); image generation needs them, so the adapter applies
    ``lm_head`` to the decoder output itself."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits: bool = True):
        hidden = self.model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden) if logits else None


ADAPTER = ChameleonAdapter


def _mapping(model):
    return model.model.vocabulary_mapping


def image_token_range(model) -> tuple[int, int]:
    """(lo, hi): the BPE ids of the image tokens (contiguous in Chameleon's vocabulary)."""
    return contiguous_range(_mapping(model).image_tokens, "Chameleon image tokens (IMGIMG*)")


def codebook_ids(model, tokens: torch.Tensor) -> torch.Tensor:
    """BPE image-token ids (any shape) -> VQ codebook ids (for Chameleon's VQGAN decoder)."""
    bpe2img = _mapping(model).bpe2img
    lut = torch.full((max(bpe2img) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(list(bpe2img))] = torch.tensor(list(bpe2img.values()))
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= lut.numel()):
        raise ValueError("tokens holds ids outside the image-token range")
    out = lut[tokens.cpu()]
    if bool((out < 0).any()):
        raise ValueError("tokens holds ids that are not image tokens")
    return out.to(tokens.device)


def lumina_prompt(model, text_ids, *, height: int, width: int, cfg_scale: float = 1.0,
                  pad_token_id: int | None = None) -> dict:
    """Engine kwargs (``pjd.generate(model, **prompt, method=...)``) for Lumina-mGPT text-to-image.

    Args:
        model: a ChameleonForConditionalGeneration (or subclass) with ``config.vocabulary_map``.
        text_ids: the tokenized conversation up to where the image starts (Lumina-mGPT's prompt
            template, BOS included), one list of ids per image (ragged: left-padded here).
        height, width: the token grid; even (Lumina's size tokens count pairs of tokens). 768 px
            is 48 x 48.
        cfg_scale: != 1 adds the unconditional row: the same ids with the text masked out.
        pad_token_id: id for left padding (default: config.pad_token_id or 0; never attended).
    """
    check_grid_size(height, width)
    if height % LATENT_PER_SIZE_TOKEN or width % LATENT_PER_SIZE_TOKEN:
        raise ValueError(f"Lumina-mGPT grids have even height and width (size tokens count 32-px units), "
                         f"got {height} x {width}")
    vm = model.config.vocabulary_map
    image_block = [vocab_id(vm, IMAGE_START, "image start"),
                   vocab_id(vm, size_token(height // LATENT_PER_SIZE_TOKEN), "height size token"),
                   vocab_id(vm, size_token(width // LATENT_PER_SIZE_TOKEN), "width size token")]
    seqs = [s + image_block for s in as_sequences("text_ids", text_ids)]
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    ids, mask = left_pad(seqs, pad, model.device)
    uncond_mask = torch.zeros_like(mask)
    uncond_mask[:, -len(image_block):] = 1
    return engine_kwargs(ids=ids, mask=mask, uncond_ids=ids, uncond_mask=uncond_mask, cfg_scale=cfg_scale,
                         height=height, width=width, image_token_range=image_token_range(model),
                         eol_token_id=vocab_id(vm, EOL, "end-of-line"))


__all__ = ["ChameleonAdapter", "lumina_prompt", "codebook_ids", "image_token_range"]
