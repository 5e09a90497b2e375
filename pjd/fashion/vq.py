"""The VQ image tokenizer of the Fashion-MNIST default model: a small VQ-VAE.

A 28×28 grayscale image is padded to 32×32 (2 background pixels each side) and encoded to a
16×16 grid of codebook indices (downsampling 2: one token per 2×2 pixel patch; 32 = 28 + 4 is the
smallest size divisible by 2 that holds the image, and 16×16 = 256 tokens is the grid of a 256 px
LlamaGen image, so the decoders face the same row width and raster length as the paper's c2i
setting). The codebook is l2-normalised (cosine lookup, as LlamaGen's VQ): every code has the
same norm, which keeps codes from dying while the encoder moves.

Layout (C = ``channels``, D = ``embed_dim``, K = ``codebook_size``)::

    encoder: conv3x3 1→C, SiLU, conv4x4/2 C→C, ResBlock(C) × n, SiLU, conv1x1 C→D
    quantise: l2-normalise, nearest of K l2-normalised codes (straight-through gradient)
    decoder: conv1x1 D→C, ResBlock(C) × n, SiLU, convT4x4/2 C→C, SiLU, conv3x3 C→1

Pixels are ``x / 127.5 - 1`` (background -1); ``images()`` rounds the decoder's output back to uint8.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD = 2  # 28 + 2 * 2 = 32


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 256
    embed_dim: int = 8
    channels: int = 48
    res_blocks: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class VQTokenizer(nn.Module):
    """uint8 ``[N, 28, 28]`` images <-> int64 ``[N, 16, 16]`` token grids (see the module docstring)."""

    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        c, d = config.channels, config.embed_dim
        self.config = config
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 4, stride=2, padding=1),
            *[ResBlock(c) for _ in range(config.res_blocks)], nn.SiLU(), nn.Conv2d(c, d, 1))
        self.codebook = nn.Parameter(torch.randn(config.codebook_size, d))
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c, 1), *[ResBlock(c) for _ in range(config.res_blocks)], nn.SiLU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

    # ---- pixels <-> network range
    @staticmethod
    def to_input(images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 32, 32]`` in [-1, 1], padded with background."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
            raise ValueError(f"images: expected uint8 [N, 28, 28], got {images.dtype} {tuple(images.shape)}")
        x = images.float()[:, None] / 127.5 - 1
        return F.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)

    # ---- the three parts
    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder output ``[N, D, h, w]`` -> (straight-through quantised ``[N, D, h, w]``,
        indices int64 ``[N, h, w]``, codebook + commitment loss scalar)."""
        z = F.normalize(z, dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.codes()
        idx = (flat @ codes.T).argmax(1)  # unit vectors: max cosine = min distance
        q = codes[idx].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        loss = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), idx.reshape(z.shape[0], z.shape[2], z.shape[3]), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass on network-range pixels ``[N, 1, 32, 32]``: (reconstruction, indices, VQ loss)."""
        q, idx, vq_loss = self.quantize(self.encoder(x))
        return self.decoder(q), idx, vq_loss

    # ---- public API
    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """uint8 ``[N, 28, 28]`` -> int64 token grid ``[N, 16, 16]`` with ids in ``[0, codebook_size)``."""
        x = self.to_input(images)
        return torch.cat([self.quantize(self.encoder(x[i:i + batch_size].to(self.codebook.device)))[1].cpu()
                          for i in range(0, x.shape[0], batch_size)]) if x.shape[0] else \
            torch.zeros(0, 16, 16, dtype=torch.long)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """int token grid ``[N, 16, 16]`` (ids in ``[0, codebook_size)``) -> float32 pixels ``[N, 3, 28, 28]``
        in [-1, 1] (gray in three channels), on the tokenizer's device: the image-decoder protocol of
        ``pjd.models.decode_images`` (LlamaGen's VQ decoders return the same)."""
        tokens = torch.as_tensor(tokens)
        k = self.config.codebook_size
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (16, 16) or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens: expected integer [N, 16, 16], got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= k):
            raise ValueError(f"tokens: ids must lie in [0, {k})")
        codes = self.codes()
        out = [self.decoder(codes[tokens[i:i + batch_size].to(codes.device).long()].permute(0, 3, 1, 2))
               for i in range(0, tokens.shape[0], batch_size)]
        x = torch.cat(out) if out else torch.zeros(0, 1, 32, 32, device=codes.device)
        return x[:, :, PAD:-PAD, PAD:-PAD].float().clamp(-1, 1).expand(-1, 3, -1, -1)

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        """int token grid ``[N, 16, 16]`` -> uint8 grayscale images ``[N, 28, 28]`` on CPU (what the
        quality measures take)."""
        return ((self.decode(tokens)[:, 0] + 1) * 127.5).round().to(torch.uint8).cpu()
