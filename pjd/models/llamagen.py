"""LlamaGen-style class-conditional generation with a Hugging Face Llama.

Vocabulary layout this helper assumes (the layout a LlamaGen port to ``LlamaForCausalLM`` needs,
since LlamaGen's class embedding table becomes part of ``embed_tokens``):

    [0, codebook_size)                               image tokens (VQ codebook ids, unchanged)
    codebook_size + c, c in [0, num_classes)         class c
    codebook_size + num_classes                      the null class (CFG's unconditional prompt)

LlamaGen puts ``cls_token_num`` copies of the class embedding in front of the image (1 for the c2i
models), and for CFG runs the same with the null class. The image grid has no EOL token.
"""
from __future__ import annotations

import torch

from pjd.ops._checks import integer

from .base import check_grid_size, engine_kwargs


def llamagen_prompt(labels, *, codebook_size: int, num_classes: int, height: int, width: int,
                    cfg_scale: float = 1.0, cls_token_num: int = 1, device=None) -> dict:
    """Engine kwargs (``pjd.generate(model, **prompt, method=...)``) for class-conditional images.

    Args:
        labels: class ids, an int, a list of ints or an int tensor ``[B]`` in ``[0, num_classes)``.
        codebook_size, num_classes: the vocabulary layout above.
        height, width: the token grid (16 x 16 for 256 px, 24 x 24 for 384 px with VQ-16).
        cfg_scale: != 1 adds the null-class prompt as the unconditional row.
        cls_token_num: class-token copies before the image.
    """
    check_grid_size(height, width)
    for name, value in (("codebook_size", codebook_size), ("num_classes", num_classes),
                        ("cls_token_num", cls_token_num)):
        integer(name, value, low=1)
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() == 0:
        raise TypeError(f"labels must be integer class ids, got {labels.dtype} with {labels.numel()} entries")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got {labels.tolist()}")
    ids = (codebook_size + labels.long())[:, None].repeat(1, cls_token_num).to(device)
    uncond = torch.full_like(ids, codebook_size + num_classes)
    mask = torch.ones_like(ids)
    return engine_kwargs(ids=ids, mask=mask, uncond_ids=uncond, uncond_mask=mask, cfg_scale=cfg_scale,
                         height=height, width=width, image_token_range=(0, codebook_size))


__all__ = ["llamagen_prompt"]
