"""Argument checks of ``pjd.generate``, run before any decoding work (no forward, no large buffer).

A wrong kind of value is a TypeError, a wrong value a ValueError; each message names the argument
and what was expected. Settings validated here are the ones ``pjd.plan.make_plan`` needs as clean
Python values (it checks their ranges) plus the prompts, the position budget and the arguments
that do not apply to the chosen method. The prompt tensors are read on the host once per call
(ids inside the vocabulary, masks of 0/1); nothing is read per decoding step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pjd.cache import HIDDEN_POS
from pjd.ops import _checks as ops_checks
from pjd.ops._checks import MIN_TEMPERATURE, finite
from pjd.rng import check_seed

REUSE_AUTO = "auto"  # reuse_threshold default: 0.5 for pjd and sjd++, no reuse elsewhere
EXACT_DRAFT_METHODS = ("sjd", "pjd")  # methods taking coupled_draws / continuation (docs/decisions.md, issue 22)


def integer(name: str, value, *, optional: bool = False) -> None:
    if not (optional and value is None):
        ops_checks.integer(name, value)


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_settings(*, method, height, width, window, context, top_k, top_p, temperature, cfg_scale,
                   image_token_range, eol_token_id, draft_init, reuse_threshold, generator, seed, progress,
                   row_causal, coupled_draws=False, continuation=False) -> None:
    """Kinds of every scalar setting, the temperature floor, and settings the method does not use."""
    for name, value in (("height", height), ("width", width), ("top_k", top_k)):
        integer(name, value)
    integer("window", window, optional=True)
    integer("context", context, optional=True)
    integer("eol_token_id", eol_token_id, optional=True)
    for name, value in (("top_p", top_p), ("temperature", temperature), ("cfg_scale", cfg_scale)):
        finite(name, value)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.3g} (the smallest normal float32; "
                         f"smaller ones overflow the logits), got {temperature}; for greedy decoding use top_k=1")
    if image_token_range is not None:
        if isinstance(image_token_range, (str, bytes)) or not isinstance(image_token_range, Sequence) \
                or len(image_token_range) != 2:
            raise TypeError(f"image_token_range must be a pair (lo, hi) of ints or None, got {image_token_range!r}")
        for bound in image_token_range:
            integer("image_token_range", bound)
    flag("progress", progress)
    flag("row_causal", row_causal)
    flag("coupled_draws", coupled_draws)
    flag("continuation", continuation)
    if generator is not None:  # deprecated (generate warns): a seed is drawn from it
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        if seed is not None:
            raise ValueError("pass either generator (deprecated) or seed, not both")
    if seed is not None:
        check_seed(seed)
    if reuse_threshold is not None and not (isinstance(reuse_threshold, str) and reuse_threshold == REUSE_AUTO):
        finite("reuse_threshold", reuse_threshold)
        if method not in ("pjd", "sjd++"):
            raise ValueError(f"reuse_threshold applies to the draft-reusing methods 'pjd' and 'sjd++', not "
                             f"{method!r} (leave it at {REUSE_AUTO!r})")
    if draft_init != "random" and method in ("ar", "zipar"):
        raise ValueError(f"draft_init={draft_init!r} does not apply to method={method!r}, which feeds no drafts")
    for name, on in (("coupled_draws", coupled_draws), ("continuation", continuation)):
        if on and method not in EXACT_DRAFT_METHODS:
            raise ValueError(f"{name}=True applies to the methods {EXACT_DRAFT_METHODS} (exact drafts, no reuse), not "
                             f"{method!r}" + (": sjd++'s draft reuse is not exact; use method='sjd'"
                                              if method == "sjd++" else ""))
        if on and method == "pjd" and reuse_threshold is not None and reuse_threshold != REUSE_AUTO:
            raise ValueError(f"{name}=True replaces pjd's draft reuse (reuse_threshold becomes None), got "
                             f"reuse_threshold={reuse_threshold!r}")
    if not row_causal and method != "pjd":
        raise ValueError(f"row_causal=False (the row-causal mask ablation) applies to method='pjd' only, "
                         f"not {method!r}")


def _ids(name: str, ids, device, vocab: int | None) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor [B, P], got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, P], got shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device}, but the model is on {device}")
    if ids.shape[0] < 1:
        raise ValueError(f"{name} has batch size 0; pass at least one prompt")
    if ids.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one prompt token")
    low, high = (int(x) for x in torch.stack([ids.min(), ids.max()]).tolist())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{name} must hold token ids in [0, {vocab}) (the model's input vocabulary), "
                         f"got values in [{low}, {high}]")


def _mask(name: str, mask, ids) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of 0/1 (or bool) or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be a 0/1 (or bool) tensor, got {mask.dtype}")
    if mask.shape != ids.shape:
        raise ValueError(f"{name} must have the prompt's shape {list(ids.shape)}, got {list(mask.shape)}")
    if mask.device != ids.device:
        raise ValueError(f"{name} is on {mask.device}, but the prompt is on {ids.device}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (1 = real token)")
    if not bool(mask[:, -1].bool().all()):
        raise ValueError(f"{name}: the last prompt token of every row must be real (use left padding)")


def check_prompts(adapter, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, cfg_scale) -> int:
    """Prompt tensors and CFG pairing; returns the packed prompt length (cond and uncond left-padded)."""
    vocab = getattr(adapter, "input_vocab_size", None)
    _ids("input_ids", input_ids, adapter.device, vocab)
    _mask("attention_mask", attention_mask, input_ids)
    if cfg_scale == 1.0:
        if uncond_input_ids is not None:
            raise ValueError("uncond_input_ids given but cfg_scale == 1 (CFG off); set cfg_scale != 1")
        if uncond_attention_mask is not None:
            raise ValueError("uncond_attention_mask given but cfg_scale == 1 (CFG off); set cfg_scale != 1")
        return input_ids.shape[1]
    if uncond_input_ids is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs uncond_input_ids (the unconditional prompt)")
    _ids("uncond_input_ids", uncond_input_ids, adapter.device, vocab)
    if uncond_input_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"uncond_input_ids must have batch {input_ids.shape[0]}, got {uncond_input_ids.shape[0]}")
    _mask("uncond_attention_mask", uncond_attention_mask, uncond_input_ids)
    return max(input_ids.shape[1], uncond_input_ids.shape[1])


def check_positions(adapter, prompt_len: int, height: int, width: int, eol_token_id) -> None:
    """The grid fits the model's positions (and int32 raster positions), before anything is sized by it
    (make_plan builds per-row tuples). Non-positive sizes are left to make_plan's message.

    A model built for one token grid (``adapter.grid``: LlamaGen's 2-D RoPE table is laid out by the
    rows of its ``grid_size`` x ``grid_size`` grid) takes exactly its width: another width would give
    tokens the wrong 2-D positions. Fewer rows are the top rows of an image."""
    grid = getattr(adapter, "grid", None)
    if grid is not None and height >= 1 and width >= 1:
        rows, cols = grid
        if width != cols or height > rows:
            raise ValueError(f"a {height}x{width} grid on a model built for {rows}x{cols} token grids: width must "
                             f"be {cols} (its 2-D positions are laid out by rows) and height at most {rows} "
                             "(fewer rows decode the top of an image)")
    total = prompt_len + height * (width + (eol_token_id is not None))
    limit = adapter.max_positions
    if limit is not None and total > limit:
        raise ValueError(f"a {height}x{width} grid after a {prompt_len}-token prompt needs {total} "
                         f"positions; the model has max_position_embeddings={limit}")
    if total >= HIDDEN_POS:
        raise ValueError(f"a {height}x{width} grid after a {prompt_len}-token prompt needs {total} positions; "
                         f"pjd indexes positions with int32 (< {HIDDEN_POS})")


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device that exists here: a clear error instead of torch's assertion when,
    e.g., "cuda" is asked of a torch without CUDA or a machine without a GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    backend = getattr(torch, dev.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        build = "" if dev.type != "cuda" or torch.version.cuda else " (this torch build has no CUDA)"
        raise ValueError(f"{name}={str(device)!r}: no {dev.type} device is available here{build}; use 'cpu'")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if dev.index is not None and count is not None and dev.index >= count:
        raise ValueError(f"{name}={str(device)!r}: only {count} {dev.type} device(s) here")
    return dev
