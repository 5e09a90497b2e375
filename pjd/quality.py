"""Quality measures for generated images: model NLL per token and a Fréchet distance on simple features.

What each number can and cannot tell is written up in docs/default_model.md.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def nll_per_token(model, tokens: torch.Tensor, prompt_ids: torch.Tensor, *,
                  image_token_range: tuple[int, int]) -> torch.Tensor:
    """Mean negative log-likelihood (nats) of each image's tokens under ``model``, teacher-forced.

    One forward pass over ``prompt_ids + tokens`` (raster order, full causal context). The logits
    that predict image token t are those at the input just before it; log-softmax is taken over the
    image tokens only (``image_token_range = (lo, hi)``, ids ``[lo, hi)``), the same restriction the
    decoders apply before sampling, so the number is the NLL of the distribution images are drawn from.

    Args:
        model: a Hugging Face causal LM (``model(input_ids).logits`` of shape ``[B, L, V]``).
        tokens: int ``[B, H, W]`` image token ids (vocabulary ids, inside ``[lo, hi)``).
        prompt_ids: int ``[B, P]``, ``P >= 1`` (e.g. the class token).
        image_token_range: ``(lo, hi)``, the vocabulary ids of image tokens.

    Returns:
        float32 ``[B]``: mean over the ``H * W`` image tokens of ``-log p(token | everything before)``.
    """
    if tokens.ndim != 3 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens: expected integer [B, H, W], got {tokens.dtype} {tuple(tokens.shape)}")
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != tokens.shape[0] or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids: expected [B={tokens.shape[0]}, P>=1], got {tuple(prompt_ids.shape)}")
    lo, hi = image_token_range
    if tokens.numel() and (tokens.min() < lo or tokens.max() >= hi):
        raise ValueError(f"tokens: ids must lie in image_token_range [{lo}, {hi})")
    device = next(model.parameters()).device
    flat = tokens.reshape(tokens.shape[0], -1).long().to(device)
    input_ids = torch.cat([prompt_ids.long().to(device), flat], dim=1)
    logits = model(input_ids=input_ids).logits
    # Output at position i predicts input i + 1: the predictors of the image tokens are
    # positions P-1 .. P+HW-2. The last input's output predicts nothing and is dropped.
    p = prompt_ids.shape[1]
    pred = logits[:, p - 1:-1, lo:hi].float().log_softmax(-1)
    return -pred.gather(-1, (flat - lo)[..., None]).squeeze(-1).mean(1).cpu()


def unigram_nll_per_token(tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Trivial baseline: mean NLL (nats) of each image's tokens under fixed token frequencies.

    Args:
        tokens: int ``[B, H, W]`` ids in ``[0, K)``.
        counts: ``[K]`` token counts from training data (add-one smoothed here).
    Returns: float32 ``[B]``.
    """
    logp = torch.log((counts.double() + 1) / (counts.double() + 1).sum())
    return -logp[tokens.reshape(tokens.shape[0], -1).long()].mean(1).float()


# --- Fréchet distance on hand-made image features -------------------------------------------
_HIST_BINS = 4      # per channel: joint RGB histogram of 4*4*4 = 64 cells
_BLOCKS = 4         # 4×4 grid of block means per channel
_GRAD_BINS = 8      # histogram of luminance gradient magnitude
_GRAD_EDGES = torch.tensor([2.0, 4, 8, 16, 32, 64, 128])  # on 0..255 luminance


def image_features(images: torch.Tensor) -> torch.Tensor:
    """123 float64 features per uint8 image ``[N, H, W, 3]`` (H, W divisible by 4).

    - 64: joint RGB colour histogram, 4 bins per channel, as fractions of pixels;
    - 48: mean of each channel over a 4×4 grid of blocks, scaled to [0, 1] (coarse layout);
    - 11: luminance (0.299 R + 0.587 G + 0.114 B) statistics: std / 255, mean |horizontal
      difference| / 255, mean |vertical difference| / 255, and the fraction of pixels whose
      gradient magnitude sqrt(dx^2 + dy^2) falls in each of 8 bins with edges 2, 4, ..., 128.
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    n, h, w, _ = images.shape
    if h % _BLOCKS or w % _BLOCKS:
        raise ValueError(f"images: height and width must be divisible by {_BLOCKS}, got {h}x{w}")
    x = images.double()
    q = (images.long() * _HIST_BINS) // 256
    cell = (q[..., 0] * _HIST_BINS + q[..., 1]) * _HIST_BINS + q[..., 2]
    hist = torch.zeros(n, _HIST_BINS ** 3, dtype=torch.float64)
    hist.scatter_add_(1, cell.reshape(n, -1), torch.ones(n, h * w, dtype=torch.float64))
    hist /= h * w
    blocks = x.reshape(n, _BLOCKS, h // _BLOCKS, _BLOCKS, w // _BLOCKS, 3).mean((2, 4)).reshape(n, -1) / 255
    lum = x @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    dx = lum[:, :, 1:] - lum[:, :, :-1]
    dy = lum[:, 1:, :] - lum[:, :-1, :]
    mag = torch.sqrt(dx[:, :-1, :] ** 2 + dy[:, :, :-1] ** 2).reshape(n, -1)
    bins = torch.bucketize(mag, _GRAD_EDGES.double())
    grad_hist = torch.zeros(n, _GRAD_BINS, dtype=torch.float64).scatter_add_(
        1, bins, torch.ones_like(mag)) / mag.shape[1]
    stats = torch.stack([lum.reshape(n, -1).std(1), dx.abs().mean((1, 2)), dy.abs().mean((1, 2))], 1) / 255
    return torch.cat([hist, blocks, stats, grad_hist], 1)


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``image_features`` of two uint8 image sets.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, float64, each set ``[N, H, W, 3]``
    with N >= 2. Same formula as FID, on 123 simple features instead of Inception activations.
    """
    fa, fb = image_features(images_a), image_features(images_b)
    if fa.shape[0] < 2 or fb.shape[0] < 2:
        raise ValueError("images_a, images_b: need at least 2 images each")
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = torch.cov(fa.T), torch.cov(fb.T)
    root_a = _psd_sqrt(cov_a)
    # tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2): the inner matrix is symmetric PSD.
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
