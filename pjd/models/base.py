"""Model adapters: what the engine needs from a model, whatever its family.

The engine calls ``adapter.forward(input_ids [Bx, N], position_ids [Bx, N]) -> logits [Bx, N, V]``
inside ``adapter.decoding()`` (``logits=False``: the prefill, which only writes keys, skips the output
head and gets None); attention goes through the "pjd" implementation (pjd.fast), which
reads the step's metadata and the cache from context, so the adapter never sees the cache.
An adapter also exposes ``device``, ``vocab_size`` (logits width) and ``max_positions``.

``adapter_for(model)`` picks the adapter by class (subclasses included, so a checkpoint's own
subclass of a supported class is served too); ``decode_images(model, tokens)`` turns a
``GenerationResult.tokens`` grid into PIL images with the model's own VQ decoder.
"""
from __future__ import annotations

import argparse
import importlib
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pjd import fast
from pjd.ops._checks import finite

# transformers class name -> pjd.models module holding that family's adapter and decoder.
_FAMILIES = {
    "ChameleonForConditionalGeneration": "chameleon",
    "JanusForConditionalGeneration": "janus",
    "Emu3ForConditionalGeneration": "emu3",
    "LlamaGenForCausalLM": "llamagen",
}


class CausalLMAdapter:
    """Hugging Face causal LMs whose image tokens are ordinary vocabulary ids (Llama/LlamaGen-style,
    Emu3; Chameleon through its subclass)."""

    def __init__(self, model):
        self.model = model
        config = model.config
        self.text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def input_vocab_size(self) -> int:
        """Prompt ids lie in [0, input_vocab_size) (the input embedding's rows)."""
        return self.model.get_input_embeddings().num_embeddings

    @property
    def head_dim(self) -> int:
        """The attention head dim the decoder's layers run at (what pjd's attention kernel sees)."""
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def dtype(self) -> torch.dtype:
        """The decoder's compute dtype (its queries' and logits' dtype)."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    def decoding(self):
        """Context in which forward() runs with pjd attention."""
        return fast.patched(self.model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits: bool = True):
        kw = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=no_packing_mask(input_ids),
                  use_cache=False)
        if not logits:
            self.model.get_decoder()(**kw)
            return None
        return self.model(**kw).logits


def no_packing_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """An all-true 2-D attention mask for a pjd step's forward. The "pjd" hook builds no mask from it
    (pjd.fast.pjd_mask returns None during a step); without any mask, transformers inspects
    position_ids for packed sequences, which reads a value back from the device on every forward."""
    return torch.ones_like(input_ids, dtype=torch.bool)


def _family(model):
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return importlib.import_module(f"pjd.models.{_FAMILIES[cls.__name__]}")
    return None


def adapter_for(model):
    """The adapter for a model: an adapter passes through; supported multimodal classes get their
    family's adapter; other HF causal LMs get CausalLMAdapter."""
    if hasattr(model, "forward") and hasattr(model, "decoding") and hasattr(model, "vocab_size"):
        return model
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM or a pjd adapter, got {type(model).__name__}")
    if model.get_output_embeddings() is None or not model.can_generate():
        raise TypeError(f"model must be a causal LM with a language-model head (e.g. LlamaForCausalLM), got "
                        f"{type(model).__name__}, which does not generate")
    if not fast.is_patched(model):
        reason = fast.why_not_patchable(model)
        if reason is not None:
            raise TypeError(f"model {type(model).__name__} cannot use pjd attention: {reason}")
    family = _family(model)
    return getattr(family, "ADAPTER", CausalLMAdapter)(model)


def decode_images(model, tokens: torch.Tensor) -> list:
    """PIL images from a ``[B, height, width]`` grid of generated image tokens (``GenerationResult.tokens``),
    with the model's VQ decoder: transformers' (Janus, Emu3) or the one the pjd loaders attach
    (``load_llamagen``, ``load_lumina_mgpt`` with a VQ checkpoint). Raises TypeError without one."""
    family = _family(model)
    decode = getattr(family, "decode_images", None)
    if decode is None:
        raise TypeError(f"{type(model).__name__} has no VQ decoder in transformers; decode the tokens with the "
                        "family's own image tokenizer (see docs/models.md)")
    check_grid(tokens)
    return decode(model, tokens)


def check_codebook_ids(tokens: torch.Tensor, size: int) -> None:
    """Tokens handed to a VQ decoder are codebook ids in [0, size) (else an IndexError deep inside)."""
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= size):
        raise ValueError(f"tokens must be codebook ids in [0, {size}), got values in "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")


# ---------------------------------------------------------------- helpers for the prompt builders
def check_grid(tokens) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.dtype.is_floating_point:
        raise TypeError("tokens must be an integer tensor [B, height, width] (GenerationResult.tokens), got "
                        f"{type(tokens).__name__} {getattr(tokens, 'shape', '')}")


def as_sequences(name: str, ids) -> list[list[int]]:
    """A batch of token-id sequences: list of lists / 1-D tensors, or a 2-D tensor (one row each);
    a flat list of ints or a 1-D tensor is one sequence."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dim() not in (1, 2):
            raise TypeError(f"{name} must be an integer tensor [B, L] or [L], got {ids.dtype} {list(ids.shape)}")
        return [ids.tolist()] if ids.dim() == 1 else ids.tolist()
    if not isinstance(ids, Sequence) or not ids:
        raise TypeError(f"{name} must be a non-empty list of token ids or of token-id lists, got {ids!r}")
    if all(isinstance(i, int) for i in ids):
        seqs = [list(ids)]
    else:
        seqs = []
        for s in ids:
            if isinstance(s, torch.Tensor) and s.dim() == 1 and not s.dtype.is_floating_point:
                seqs.append(s.tolist())
            elif isinstance(s, Sequence) and not isinstance(s, (str, bytes)):
                seqs.append(list(s))
            else:
                raise TypeError(f"{name} must be a list of token ids or of token-id lists, got an entry {s!r}")
    for s in seqs:
        bad = [t for t in s if isinstance(t, bool) or not isinstance(t, int)]
        if bad:
            raise TypeError(f"{name} must hold int token ids, got {bad[0]!r}")
        if any(t < 0 for t in s):
            raise ValueError(f"{name} must hold token ids >= 0, got {min(s)}")
    return seqs


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad sequences to one length: (ids int64 [B, L], attention_mask int64 [B, L], 1 = real)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, length - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, length - len(s):] = 1
    return ids.to(device), mask.to(device)


def vocab_id(vocabulary_map: dict | None, name: str, what: str) -> int:
    if not vocabulary_map or name not in vocabulary_map:
        raise ValueError(f"the model's config.vocabulary_map has no {name!r} ({what}); pass the id explicitly")
    return int(vocabulary_map[name])


def contiguous_range(ids, what: str) -> tuple[int, int]:
    """(lo, hi) of a set of ids that must be contiguous (the engine restricts sampling to a range)."""
    ids = sorted(int(i) for i in ids)
    if not ids or ids[-1] - ids[0] + 1 != len(ids):
        raise ValueError(f"{what} are not contiguous vocabulary ids; pjd samples image tokens from one id range")
    return ids[0], ids[-1] + 1


def engine_kwargs(*, ids, mask, uncond_ids, uncond_mask, cfg_scale, height, width, image_token_range,
                  eol_token_id=None) -> dict:
    """The keyword arguments of pjd.generate for a built prompt (no unconditional rows without CFG)."""
    kw = dict(input_ids=ids, attention_mask=mask, height=height, width=width,
              image_token_range=image_token_range, cfg_scale=finite("cfg_scale", cfg_scale))
    if eol_token_id is not None:
        kw["eol_token_id"] = int(eol_token_id)
    if float(cfg_scale) != 1.0:
        kw.update(uncond_input_ids=uncond_ids, uncond_attention_mask=uncond_mask)
    return kw


def check_grid_size(height, width) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int (image tokens), got {v!r}")


# Globals a release checkpoint may hold besides tensors, containers and numbers, which torch's weights-only
# unpickler reads by default. LlamaGen's trainers (autoregressive/train/train_c2i.py, tokenizer/tokenizer_image/
# vq_train.py) save {"model", "optimizer", "steps", "args"[, "ema", "discriminator", "optimizer_disc"]} where
# "args" is their argparse.Namespace (plain values only); nothing else in the official files needs a global.
# argparse.Namespace only sets attributes from the (already restricted) values it is given: no code runs.
RELEASE_GLOBALS = (argparse.Namespace,)


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint pickles objects that pjd does not rebuild without ``trust_checkpoint=True``."""


def load_checkpoint(path, what: str, *, trust_checkpoint: bool = False):
    """A release checkpoint's contents, without running code from the file unless asked.

    ``*.safetensors`` is read with safetensors (a flat state dict). A torch pickle is read with torch's
    weights-only unpickler, which rebuilds tensors, containers and numbers plus ``RELEASE_GLOBALS``;
    a file that needs any other object fails with an error naming it and ``trust_checkpoint``. Only
    ``trust_checkpoint=True`` (as transformers' ``trust_remote_code``: for files you trust, since a
    pickle can run any code while it is read) uses the full unpickler.
    """
    if not isinstance(trust_checkpoint, bool):
        raise TypeError(f"trust_checkpoint must be True or False, got {trust_checkpoint!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(list(RELEASE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)  # torch's wording varies across versions
        found = re.search(r"GLOBAL ([\w.]+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        why = (f"it pickles {found.group(1)}" if found else detail.group(1)[:200] if detail
               else text.splitlines()[0][:200])
        raise UntrustedCheckpointError(
            f"{what} {str(path)!r} holds more than weights ({why}). pjd reads checkpoints with torch's "
            "weights-only unpickler, because a pickle can run any code while it is read. If you trust this "
            f"file, pass trust_checkpoint=True; or save its weights as .safetensors (or a torch file of "
            "tensors only) and load that.") from None


def to_pil(pixels: torch.Tensor) -> list:
    """[B, 3, H, W] pixels in [-1, 1] (the VQ decoders' range) -> list of RGB PIL images."""
    from PIL import Image

    rgb = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(x.permute(1, 2, 0).cpu().numpy(), "RGB") for x in rgb]


__all__ = ["CausalLMAdapter", "adapter_for", "decode_images"]
