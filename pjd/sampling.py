"""The target distribution p of docs/design.md §1 and the sampling rule every backend shares.

p at a slot: CFG combine -> restrict to image tokens -> temperature -> top-k -> top-p -> softmax.
Filters use threshold semantics so that any implementation (sort-free kernels included) agrees:
- top-k keeps every token whose logit is >= the k-th largest logit (ties at the boundary are kept);
- top-p keeps every token whose probability is >= t, where t is the largest value such that the
  tokens with probability >= t hold at least `top_p` of the mass (again ties kept).
Sampling is by inverse CDF with one uniform per draw: the first token whose running sum exceeds
u * total. One uniform per draw is what lets the orchestrator draw all randomness up front.
Coupled draws (SCD) use the exponential race instead, one exponential variate per token:
argmin_v E_v / p_v is a sample of p (Gumbel-max, as -log E_v is Gumbel), and the same E makes
nearby distributions give the same token.
"""
from __future__ import annotations

import torch


def combine_cfg(logits: torch.Tensor, num_images: int, cfg_scale: float) -> torch.Tensor:
    """logits [Bx, ...] with Bx = B (no CFG) or 2B (rows [0,B) cond, [B,2B) uncond) -> [B, ...]."""
    if logits.shape[0] == num_images:
        return logits
    cond, uncond = logits[:num_images], logits[num_images:]
    return uncond + cfg_scale * (cond - uncond)


def scaled_logits(logits: torch.Tensor, *, num_images: int, cfg_scale: float, image_token_range: tuple[int, int],
                  temperature: float) -> torch.Tensor:
    """x = CFG-combined image-token logits / temperature, float32 ``[B, N, hi - lo]``: what softmax sees."""
    lo, hi = image_token_range
    # Slices, casts and divisions that would be identities are skipped: the same values, fewer ops.
    x = logits if (lo, hi) == (0, logits.shape[-1]) else logits[..., lo:hi]
    x = combine_cfg(x if x.dtype == torch.float32 else x.float(), num_images, cfg_scale)
    return x / temperature if temperature != 1.0 else x


def undefined_rows(x: torch.Tensor) -> torch.Tensor:
    """bool ``[...]``: rows of x ``[..., V]`` that define no distribution: a NaN or +inf entry, or no
    entry above -inf (softmax would be NaN). Other -inf entries are just tokens of probability 0."""
    return (torch.isnan(x) | torch.isposinf(x)).any(-1) | ~(x > float("-inf")).any(-1)


def target_probs(
    logits: torch.Tensor,
    *,
    num_images: int,
    cfg_scale: float = 1.0,
    image_token_range: tuple[int, int],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Target distributions over the image tokens.

    Args:
        logits: ``[Bx, N, V]`` model logits (any float dtype); Bx = num_images or 2 * num_images.
    Returns:
        ``[B, N, hi - lo]`` float32 probabilities (rows sum to 1).
    """
    x = scaled_logits(logits, num_images=num_images, cfg_scale=cfg_scale, image_token_range=image_token_range,
                      temperature=temperature)
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        # fp64 running sums on every device (torch's fp32 cumsum accumulates in fp64 on a CPU and
        # in fp32 on CUDA); the kernels sum in fp64 too.
        mass_before = torch.cumsum(sorted_probs, dim=-1, dtype=torch.float64).float() - sorted_probs
        # t = the smallest sorted probability whose preceding mass is still below top_p.
        last_kept = (mass_before < top_p).sum(dim=-1, keepdim=True) - 1
        threshold = sorted_probs.gather(-1, last_kept)
        probs = probs * (probs >= threshold)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one index per distribution: the first i with cumsum(probs)[i] > u * total.

    probs ``[..., V]`` non-negative (need not be normalised), u ``[...]`` in [0, 1) -> int64 ``[...]``.
    A zero-probability index is never returned (its running sum equals its left neighbour's).
    The running sum is accumulated in fp64 and rounded to fp32 on every device, as the kernels do.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64).to(probs.dtype)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can put the target at the very top; take the last index with mass then.
    last_nonzero = (probs > 0).cumsum(-1).argmax(-1)
    return torch.minimum(idx, last_nonzero)


def sample_coupled(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw one index per distribution by the exponential race: the first i minimising noise[i] / probs[i]
    over probs > 0 (a sample of normalize(probs) when noise holds i.i.d. rate-1 exponentials).

    probs ``[..., V]`` non-negative (need not be normalised), noise ``[..., V]`` >= 0 -> int64 ``[...]``.
    Zero-probability indices never win. The division is IEEE fp32, as the kernels' ``div_rn``.
    """
    ratio = torch.where(probs > 0, noise / probs, float("inf"))
    return ratio.argmin(-1)
