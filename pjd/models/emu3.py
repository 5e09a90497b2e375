"""Emu3 (``Emu3ForConditionalGeneration``): visual tokens are vocabulary ids, EOL after each row.

The visual token for codebook id c is ``<|visual token {c:06d}|>`` in ``config.vocabulary_map``
(``model.vocabulary_mapping``); the row end is ``<|extra_200|>``. The image prompt, as Emu3's
processor builds it: ``BOS text <|image start|>{H}*{W}<|image token|>``, then H rows of W visual
tokens + EOL. CFG as Emu3's generation example: the unconditional row is a negative prompt with the
same image prefix.

Emu3-Gen's official recipe (its README example): the prompt text + ``POSITIVE_SUFFIX``, the
unconditional row ``NEGATIVE_PROMPT``, CFG 3.0, top-k 2048 over the visual tokens:
``pjd.generate(model, **emu3_prompt(..., cfg_scale=3.0, negative_ids=...), top_k=2048)``.
"""
from __future__ import annotations

import torch

from .base import (as_sequences, check_grid_size, contiguous_range, engine_kwargs, left_pad, to_pil,
                   vocab_id)

POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                   "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                   "username, blurry.")
IMAGE_START = "<|image start|>"
IMAGE_WRAPPER = "<|image token|>"


def image_token_range(model) -> tuple[int, int]:
    return contiguous_range(model.vocabulary_mapping.image_tokens, "Emu3 visual tokens")


def emu3_prompt(model, text_ids, *, height: int, width: int, cfg_scale: float = 1.0, negative_ids=None,
                size_ids=None) -> dict:
    """Engine kwargs (``pjd.generate(model, **prompt, method=...)``) for Emu3 text-to-image.

    Args:
        model: an Emu3ForConditionalGeneration (e.g. BAAI/Emu3-Gen-hf).
        text_ids: tokenized prompts without BOS (added here), one list per image (ragged).
        height, width: the token grid (Emu3-Gen: 90 x 90 for 720 px, spatial factor 8).
        cfg_scale: != 1 adds the negative prompt (``negative_ids``, one list for all images or one
            per image; default empty) as the unconditional row.
        size_ids: the token ids of the text ``f"{height}*{width}"``; default: one vocabulary entry
            per character (Emu3's Qwen tokenizer splits digits one by one).
    """
    check_grid_size(height, width)
    vm, text_config = model.config.vocabulary_map, model.config.text_config
    if size_ids is None:
        size_ids = [vocab_id(vm, ch, "a digit or '*' of the size text") for ch in f"{height}*{width}"]
    prefix = [vocab_id(vm, IMAGE_START, "image start"), *size_ids, vocab_id(vm, IMAGE_WRAPPER, "image wrapper")]
    bos, pad = text_config.bos_token_id, text_config.pad_token_id or 0
    seqs = as_sequences("text_ids", text_ids)
    ids, mask = left_pad([[bos] + s + prefix for s in seqs], pad, model.device)
    if negative_ids is None:
        negatives = [[] for _ in seqs]
    else:
        negatives = as_sequences("negative_ids", negative_ids)
        if len(negatives) == 1:
            negatives = negatives * len(seqs)
        if len(negatives) != len(seqs):
            raise ValueError(f"negative_ids must hold 1 or {len(seqs)} prompts, got {len(negatives)}")
    uncond_ids, uncond_mask = left_pad([[bos] + s + prefix for s in negatives], pad, model.device)
    return engine_kwargs(ids=ids, mask=mask, uncond_ids=uncond_ids, uncond_mask=uncond_mask, cfg_scale=cfg_scale,
                         height=height, width=width, image_token_range=image_token_range(model),
                         eol_token_id=model.vocabulary_mapping.eol_token_id)


def codebook_ids(model, tokens: torch.Tensor) -> torch.Tensor:
    """Visual-token vocabulary ids (any shape) -> VQ codebook ids."""
    lo, hi = image_token_range(model)
    if tokens.numel() and (int(tokens.min()) < lo or int(tokens.max()) >= hi):
        raise ValueError(f"tokens holds ids outside the visual-token range [{lo}, {hi})")
    lut = model.vocabulary_mapping.bpe2img_mapping_tensor.long()
    return lut[tokens.cpu()].to(tokens.device)


def decode_images(model, tokens: torch.Tensor) -> list:
    with torch.no_grad():
        return to_pil(model.model.vqmodel.decode(codebook_ids(model, tokens)))


__all__ = ["emu3_prompt", "codebook_ids", "decode_images", "image_token_range", "POSITIVE_SUFFIX", "NEGATIVE_PROMPT"]
