"""The embedded default model: a small class-conditional LlamaGen-style image model shipped in the package.

``pjd.models.default()`` loads it from ``pjd/models/assets/`` (no network). How it was trained and
what its numbers mean: docs/default_model.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from .palette import Palette

ASSETS = Path(__file__).parent / "assets"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PALETTE_FILE = "palette.npz"
META_FILE = "meta.json"


@dataclass
class DefaultModel:
    """The model plus everything a decoder needs to prompt it and to turn tokens into pixels.

    Vocabulary: ids ``[0, K)`` are image tokens (palette indices), ``K + c`` is the class token of
    class ``c`` (``class_names[c]``), ``null_class_id = K + C`` the unconditional token for CFG.
    A sequence is ``[class token] + H*W image tokens`` in raster order; image token (r, c) sits at
    position ``1 + W*r + c``.
    """

    model: LlamaForCausalLM
    palette: Palette
    class_names: tuple[str, ...]
    image_token_range: tuple[int, int]
    null_class_id: int
    height: int = 32
    width: int = 32
    meta: dict | None = None

    def prompt(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]`` in ``[0, C)`` -> input ids ``[B, 1]`` (the class tokens)."""
        class_ids = torch.as_tensor(class_ids)
        if class_ids.ndim != 1 or class_ids.dtype.is_floating_point:
            raise ValueError(f"class_ids: expected integer [B], got {class_ids.dtype} {tuple(class_ids.shape)}")
        if class_ids.numel() and (class_ids.min() < 0 or class_ids.max() >= len(self.class_names)):
            raise ValueError(f"class_ids: expected values in [0, {len(self.class_names)})")
        return (class_ids.long() + self.image_token_range[1])[:, None].to(self.device)

    def null_prompt(self, batch: int) -> torch.Tensor:
        """Unconditional prompt ``[batch, 1]`` (the null class token), for classifier-free guidance."""
        return torch.full((batch, 1), self.null_class_id, dtype=torch.long, device=self.device)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, H, W]`` -> uint8 RGB ``[B, H, W, 3]`` (on CPU)."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (self.height, self.width):
            raise ValueError(f"tokens: expected [B, {self.height}, {self.width}], got {tuple(tokens.shape)}")
        return self.palette.decode(tokens.cpu())

    def to_pil(self, tokens: torch.Tensor, scale: int = 8) -> list[Image.Image]:
        """Image tokens ``[B, H, W]`` -> PIL images upscaled ``scale``× (nearest neighbour, to be seen)."""
        if scale < 1:
            raise ValueError(f"scale: expected an integer >= 1, got {scale}")
        return [Image.fromarray(img.numpy()).resize((self.width * scale, self.height * scale), Image.Resampling.NEAREST)
                for img in self.decode(tokens)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            assets: str | Path = ASSETS) -> DefaultModel:
    """Load the embedded default model (eval mode) from the package's assets; never touches the network.

    Weights are stored in fp16 and cast to ``dtype`` (fp32 by default) on ``device``.
    """
    assets = Path(assets)
    meta = json.loads((assets / META_FILE).read_text())
    config = LlamaConfig.from_json_file(assets / CONFIG_FILE)
    model = LlamaForCausalLM(config)
    model.load_state_dict({n: t.float() for n, t in load_file(assets / WEIGHTS_FILE).items()}, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    return DefaultModel(
        model=model,
        palette=Palette.load(assets / PALETTE_FILE),
        class_names=tuple(meta["class_names"]),
        image_token_range=tuple(meta["image_token_range"]),
        null_class_id=meta["null_class_id"],
        height=meta["height"],
        width=meta["width"],
        meta=meta,
    )
