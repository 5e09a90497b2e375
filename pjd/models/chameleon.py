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

Lumina-mGPT's official sampling (its ``FlexARInferenceSolver``): CFG 3.0 (3-4 in its demos), top-k
2000 over image tokens, temperature 1.0: ``pjd.generate(model, **prompt, top_k=2000)`` with
``cfg_scale=3.0`` in ``lumina_prompt``.

``load_lumina_mgpt(dir)`` reads Lumina-mGPT's release directory (``config.json``, ``model*.safetensors``
+ ``model.safetensors.index.json``, written by its trainer's ``save_pretrained`` of
``ChameleonXLLMXForConditionalGeneration``) into transformers' class. Two things differ from what
transformers 5 expects: q/k-norm weights and biases are stored per model-parallel shard
``[model_parallel_size, head_dim]`` (Lumina's vendored Chameleon repeat-interleaves them over the
heads of each shard at run time); the loader expands them to ``[num_heads, head_dim]``. And the
trainer drops the VQ (``model.vqmodel.*``): with ``vqgan_checkpoint`` (Meta's Chameleon
``tokenizer/vqgan.ckpt``) the encoder is filled from it and its decoder (``pjd.models.vq``) is attached
for ``decode_images``; without it ``model.model.vqmodel`` is None (generation does not use it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import (CausalLMAdapter, as_sequences, check_grid_size, contiguous_range, engine_kwargs, left_pad,
                   no_packing_mask, to_pil, vocab_id)

IMAGE_START = "<racm3:break>"
EOL = "<reserved08799>"
LATENT_PER_SIZE_TOKEN = 2  # one size unit = 32 px = 2 tokens of the 16x VQ


TURN_END = "<reserved08706>"  # Lumina-mGPT's conversation separator


def lumina_text_ids(tokenizer, prompt: str, *, height: int, width: int) -> list[int]:
    """Token ids of Lumina-mGPT's text-to-image request for a ``height x width`` token grid (16 px per
    token): BOS + "Generate an image of {W}x{H} according to the following prompt:\n{prompt}" + turn end,
    as its ``FlexARInferenceSolver`` tokenizes a one-question conversation (``tokenizer``: the
    release directory's ``AutoTokenizer``)."""
    check_grid_size(height, width)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    text = f"Generate an image of {16 * width}x{16 * height} according to the following prompt:\n{prompt}{TURN_END}"
    return [tokenizer.bos_token_id] + list(tokenizer.encode(text, add_special_tokens=False))


def size_token(n: int) -> str:
    return f"<reserved{8800 + n:05d}>"


class ChameleonAdapter(CausalLMAdapter):
    """ChameleonForConditionalGeneration.forward sets every image-token logit to the dtype's minimum
    (it is a text chat model in transformers); image generation needs them, so the adapter applies
    ``lm_head`` to the decoder output itself."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits: bool = True):
        hidden = self.model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                  attention_mask=no_packing_mask(input_ids)).last_hidden_state
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


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"path {str(path)!r} has neither model.safetensors.index.json nor model.safetensors")
    state_dict = {}
    for name in files:
        state_dict.update(load_file(path / name))
    return state_dict


def _expand_qk_norms(state_dict: dict, config) -> dict:
    """q/k-norm affine ``[model_parallel_size, head_dim]`` -> ``[heads, head_dim]``: shard s's row serves
    heads ``s * heads/mp .. (s + 1) * heads/mp - 1`` (Lumina's ``ChameleonLayerNorm.repeat_param``)."""
    heads = {"q_norm": config.num_attention_heads, "k_norm": config.num_key_value_heads}
    out = {}
    for key, value in state_dict.items():
        kind = key.split(".")[-2] if key.endswith((".weight", ".bias")) else None
        if kind in heads and value.dim() == 2 and value.shape[0] != heads[kind]:
            if heads[kind] % value.shape[0]:
                raise ValueError(f"{key}: {value.shape[0]} shards do not divide {heads[kind]} heads")
            value = value.repeat_interleave(heads[kind] // value.shape[0], dim=0)
        out[key] = value
    return out


def load_lumina_mgpt(path, *, vqgan_checkpoint=None, device="cpu", dtype: torch.dtype = torch.bfloat16,
                     trust_checkpoint: bool = False):
    """Lumina-mGPT's published weights as a ``ChameleonForConditionalGeneration`` (eval mode).

    Args:
        path: local directory of a release (e.g. ``Alpha-VLLM/Lumina-mGPT-7B-768`` downloaded):
            ``config.json`` and ``model*.safetensors`` (sharded with an index, or one file).
        vqgan_checkpoint: optional Meta Chameleon ``vqgan.ckpt`` (``{"state_dict": ...}``, taming names):
            fills the VQ encoder and attaches the VQGAN decoder used by ``pjd.models.decode_images``.
        device, dtype: where the transformer's weights go (Lumina-mGPT runs in bf16); the VQ stays fp32.
        trust_checkpoint: ``vqgan.ckpt`` is a torch pickle, read with the weights-only unpickler (tensors,
            containers, numbers); ``True`` allows the full unpickler for a file that holds other objects,
            which can run code from the file: only for files you trust. The transformer's safetensors
            never need it.
    """
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path {str(path)!r} has no config.json: expected Lumina-mGPT's release directory")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    config = ChameleonConfig.from_pretrained(path)
    decoder = None
    if vqgan_checkpoint is not None:  # the small file first: a refused one fails before the 7B weights load
        from .vq import chameleon_vqgan_decoder, read_chameleon_vqgan

        vqgan = read_chameleon_vqgan(vqgan_checkpoint, trust_checkpoint=trust_checkpoint)
        decoder = chameleon_vqgan_decoder(vqgan, config.vq_config)
    state_dict = _expand_qk_norms(_read_safetensors(path), config)
    if vqgan_checkpoint is not None and not any(k.startswith("model.vqmodel.") for k in state_dict):
        # transformers' VQ uses taming's names
        state_dict.update({"model.vqmodel." + k: v for k, v in vqgan.items()
                           if k.startswith(("encoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding."))})
    model, info = ChameleonForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith("model.vqmodel.")]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{path} does not load into ChameleonForConditionalGeneration: missing {missing[:4]}, "
                         f"unexpected {sorted(info['unexpected_keys'])[:4]}, mismatched {info['mismatched_keys'][:4]}")
    if any(k.startswith("model.vqmodel.") for k in info["missing_keys"]):
        model.model.vqmodel = None  # randomly initialised by transformers: unusable, so absent
    model.to(device)
    model.image_decoder = None if decoder is None else decoder.to(device)
    return model.eval()


def decode_images(model, tokens: torch.Tensor) -> list:
    """PIL images of a ``[B, h, w]`` grid of image-token (BPE) ids through the attached Chameleon VQGAN."""
    decoder = getattr(model, "image_decoder", None)
    if decoder is None:
        raise TypeError(f"{type(model).__name__} has no VQ decoder in transformers; load Lumina-mGPT with "
                        "pjd.models.load_lumina_mgpt(..., vqgan_checkpoint=...) (Chameleon's vqgan.ckpt)")
    with torch.no_grad():
        return to_pil(decoder.decode(codebook_ids(model, tokens).to(next(decoder.parameters()).device)))


__all__ = ["ChameleonAdapter", "lumina_prompt", "lumina_text_ids", "codebook_ids", "image_token_range",
           "load_lumina_mgpt", "decode_images"]
