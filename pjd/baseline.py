"""The external baseline: transformers' own ``model.generate`` decoding the same images as pjd.

What pjd's wall-clock figures are compared against (benchmarks/e2e.py, ``pjd demo``). The target
distribution is pjd's (DESIGN.md §1): CFG combine -> image tokens only -> temperature -> top-k ->
top-p, sampled; forced EOL slots hold the EOL token. Two ways to get CFG out of ``generate``:

- ``"guidance"``: its own ``guidance_scale`` + ``negative_prompt_ids`` (an unbatched second
  forward per step over the unconditional prompt, with its own KV cache); the restriction to image
  tokens and the forced EOL are a logits processor, top-k / top-p / temperature are generate's own.
  (generate combines log-softmaxed logits; that differs from pjd's raw-logit combine by a constant
  per row, so the distribution is the same.)
- ``"batched"``: conditional and unconditional prompts as one doubled batch (one forward per step,
  as pjd runs CFG); a logits processor combines the two halves, applies pjd.sampling.target_probs,
  samples one token per image and hands both halves a one-hot score, so greedy selection in
  ``generate`` keeps the pair identical.

Both run the model with ``attn_implementation="sdpa"`` (restored afterwards).
"""
from __future__ import annotations

import time

import torch

from pjd.sampling import sample_inverse_cdf, target_probs

CFG_MODES = ("guidance", "batched")


class _ImageTokens:
    """generate logits processor: only image tokens, or the EOL token at forced slots."""

    def __init__(self, prompt_len, lo, hi, eol_token_id, row_slots, width):
        self.prompt_len, self.lo, self.hi = prompt_len, lo, hi
        self.eol, self.row_slots, self.width = eol_token_id, row_slots, width

    def forced(self, input_ids) -> bool:
        slot = input_ids.shape[1] - self.prompt_len  # the image slot this step samples (host-known)
        return self.eol is not None and slot % self.row_slots == self.width

    def __call__(self, input_ids, scores):
        keep = (self.eol, self.eol + 1) if self.forced(input_ids) else (self.lo, self.hi)
        out = torch.full_like(scores, float("-inf"))
        out[:, keep[0]:keep[1]] = scores[:, keep[0]:keep[1]]
        return out


class _BatchedCFGSampler(_ImageTokens):
    """generate logits processor for the doubled batch: pjd's target p, one sample per image."""

    def __init__(self, prompt_len, lo, hi, eol_token_id, row_slots, width, cfg_scale, sampling, generator):
        super().__init__(prompt_len, lo, hi, eol_token_id, row_slots, width)
        self.cfg_scale, self.sampling, self.generator = cfg_scale, sampling, generator

    def __call__(self, input_ids, scores):
        batch = scores.shape[0] // 2
        if self.forced(input_ids):
            token = torch.full((batch,), self.eol, dtype=torch.long, device=scores.device)
        else:
            p = target_probs(scores[:, None], num_images=batch, cfg_scale=self.cfg_scale,
                             image_token_range=(self.lo, self.hi), **self.sampling)[:, 0]
            u = torch.rand(batch, generator=self.generator).to(scores.device)
            token = sample_inverse_cdf(p, u) + self.lo
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, torch.cat([token, token])[:, None], 0.0)


def hf_generate(model, input_ids, *, height, width, image_token_range, cfg_scale=1.0, uncond_input_ids=None,
                top_k=0, top_p=1.0, temperature=1.0, eol_token_id=None, seed=0, cfg_mode="batched"):
    """Decode ``[B, height, width]`` image tokens with transformers' ``model.generate``.

    Args:
        model: a transformers causal LM whose image tokens are vocabulary ids (no padding in the
            prompts: ``input_ids`` and ``uncond_input_ids`` are ``[B, P]`` int64 of one length).
        image_token_range, top_k, top_p, temperature, cfg_scale, eol_token_id: as pjd.generate.
        cfg_mode: "batched" or "guidance" (see the module docstring); ignored when cfg_scale == 1.

    Returns:
        ``(tokens [B, height, width] int64, wall seconds of the generate call, forward passes)``.
    """
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
    from transformers import GenerationConfig, LogitsProcessorList

    lo, hi = image_token_range
    row_slots = width + (eol_token_id is not None)
    new_tokens = height * row_slots
    batch, prompt_len = input_ids.shape
    generator = torch.Generator().manual_seed(int(seed))
    sampling = dict(top_k=top_k, top_p=float(top_p), temperature=float(temperature))
    cfg = float(cfg_scale) != 1.0
    batched = cfg and cfg_mode == "batched"
    config = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=0, use_cache=True)
    kwargs = {}
    if batched:
        ids = torch.cat([input_ids, uncond_input_ids])
        processor = _BatchedCFGSampler(prompt_len, lo, hi, eol_token_id, row_slots, width, float(cfg_scale),
                                       sampling, generator)
        config.do_sample = False
    else:
        ids = input_ids
        processor = _ImageTokens(prompt_len, lo, hi, eol_token_id, row_slots, width)
        config.do_sample = True
        config.top_k, config.top_p, config.temperature = top_k or None, float(top_p), float(temperature)
        if cfg:
            config.guidance_scale = float(cfg_scale)
            kwargs["negative_prompt_ids"] = uncond_input_ids
        torch.manual_seed(int(seed))  # generate's multinomial draws from the global generator
    previous, model_config = model.config._attn_implementation, model.generation_config
    model.set_attn_implementation("sdpa")
    # generate fills unset fields from the model's generation config; an eos id there would stop the
    # image early (or, through the min-length processor, put -inf into the CFG combine).
    model.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 logits_processor=LogitsProcessorList([processor]), **kwargs)
            seconds = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(previous)
        model.generation_config = model_config
    image = out[:batch, prompt_len:].view(batch, height, row_slots)[:, :, :width]
    return image, seconds, new_tokens * (2 if cfg and not batched else 1)


__all__ = ["hf_generate", "CFG_MODES"]
