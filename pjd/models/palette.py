"""ImageGPT-style colour palette: the tokenizer of the embedded default model.

Every pixel is one token: the index of its nearest palette colour (squared RGB distance). The
palette is fitted by seeded k-means (k-means++ initialisation, Lloyd iterations) over pixels of
training crops. A 32×32 crop becomes a 32×32 grid of 1,024 tokens. See docs/default_model.md for
what this does and does not capture compared with a learned VQ tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Pixels per chunk when encoding, so the [chunk, K] distance matrix stays a few MB.
_ENCODE_CHUNK = 16384


@dataclass(frozen=True)
class Palette:
    """K colours and how often each was used in the training pixels.

    Attributes:
        colors: uint8 ``[K, 3]`` RGB colours; token id t decodes to ``colors[t]``.
        counts: int64 ``[K]`` number of training pixels assigned to each colour (the unigram
            frequencies used as the trivial NLL baseline).
    """

    colors: torch.Tensor
    counts: torch.Tensor

    @property
    def size(self) -> int:
        return self.colors.shape[0]

    def encode(self, images) -> torch.Tensor:
        """uint8 images ``[..., 3]`` (tensor or array) -> int64 token ids ``[...]`` (nearest colour)."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.shape[-1] != 3:
            raise ValueError(f"images: expected uint8 [..., 3], got {images.dtype} {tuple(images.shape)}")
        return _nearest(images.reshape(-1, 3).float(), self.colors.float()).reshape(images.shape[:-1])

    def decode(self, tokens) -> torch.Tensor:
        """int token ids ``[...]`` in ``[0, K)`` -> uint8 images ``[..., 3]``."""
        tokens = torch.as_tensor(tokens)
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"tokens: expected an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.size):
            raise ValueError(f"tokens: ids must lie in [0, {self.size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return self.colors[tokens.long()]

    def save(self, path: str | Path) -> None:
        np.savez(path, colors=self.colors.numpy(), counts=self.counts.numpy())

    @classmethod
    def load(cls, path: str | Path) -> "Palette":
        with np.load(path, allow_pickle=False) as f:
            return cls(torch.from_numpy(f["colors"].astype(np.uint8)), torch.from_numpy(f["counts"].astype(np.int64)))

    @classmethod
    def fit(cls, pixels, k: int, *, seed: int = 0, iters: int = 25) -> "Palette":
        """Seeded k-means over uint8 pixels ``[N, 3]`` (N >= k). Returns colours sorted by luminance."""
        pixels = torch.as_tensor(pixels)
        if pixels.dtype != torch.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected uint8 [N, 3], got {pixels.dtype} {tuple(pixels.shape)}")
        if pixels.shape[0] < k:
            raise ValueError(f"pixels: need at least k={k} pixels, got {pixels.shape[0]}")
        gen = torch.Generator().manual_seed(seed)
        x = pixels.float()
        centers = _kmeans_pp_init(x, k, gen)
        for _ in range(iters):
            assign = _nearest(x, centers)
            sums = torch.zeros(k, 3).index_add_(0, assign, x)
            n = torch.bincount(assign, minlength=k)
            empty = n == 0
            centers = torch.where(empty[:, None], centers, sums / n.clamp(min=1)[:, None])
            if empty.any():
                # An empty cluster restarts at random pixels, so every colour stays in use.
                centers[empty] = x[torch.randint(x.shape[0], (int(empty.sum()),), generator=gen)]
        colors = centers.round().clamp(0, 255).to(torch.uint8)
        # Luminance order makes nearby ids similar colours: handy when eyeballing token grids.
        colors = colors[torch.argsort(colors.float() @ torch.tensor([0.299, 0.587, 0.114]), stable=True)]
        counts = torch.bincount(_nearest(x, colors.float()), minlength=k)
        return cls(colors, counts)


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for float pixels ``[N, 3]``, chunked to bound memory."""
    # argmin |x - c|^2 = argmin (|c|^2 - 2 x.c): |x|^2 is the same for every centre.
    c_sq = (centers * centers).sum(1)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([(c_sq - 2 * chunk @ centers.T).argmin(1) for chunk in x.split(_ENCODE_CHUNK)])


def _kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++: each new centre drawn with probability proportional to squared distance."""
    centers = [x[torch.randint(x.shape[0], (1,), generator=gen)]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(k - 1):
        idx = torch.multinomial(d2 + 1e-12, 1, generator=gen)
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.cat(centers)
