"""The embedded default model: class-conditional Fashion-MNIST in LlamaGen's format, shipped in the package.

Parts (``pjd/fashion/assets/``; how each was trained and its numbers: docs/default_model.md):

- ``gpt.pt``: a LlamaGen c2i GPT in the release layout (``{"model": state_dict}``, fp16), loaded
  through ``pjd.models.load_llamagen`` like any release checkpoint;
- ``vq.safetensors``: the VQ tokenizer (pjd/fashion/vq.py), 28×28 image <-> 16×16 tokens; attached
  as the model's ``image_decoder``, so ``pjd.models.decode_images(dm.model, tokens)`` works too;
- ``meta.json``: the architecture and the training reports.

``default()`` never touches the network and needs no dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .assets import ASSETS, GPT_FILE, VQ_FILE, read_meta
from .idx import CLASS_NAMES
from .vq import VQConfig, VQTokenizer


def load_tokenizer(assets: str | Path = ASSETS, device="cpu") -> VQTokenizer:
    """The shipped VQ tokenizer (eval mode, fp32)."""
    from safetensors.torch import load_file

    assets = Path(assets)
    vq = VQTokenizer(VQConfig(**read_meta(assets)["vq"]["config"]))
    vq.load_state_dict({n: t.float() for n, t in load_file(assets / VQ_FILE).items()})
    return vq.to(device).eval()


@dataclass
class DefaultModel:
    """The model plus what a decoder needs to prompt it and to turn tokens into images.

    Vocabulary (LlamaGen's layout in ``pjd.models.llamagen``): ids ``[0, K)`` are image tokens (VQ
    codes), ``K + c`` is the class token of class ``c`` (``class_names[c]``), ``null_class_id = K + 10``
    the null class (CFG's unconditional prompt). A sequence is ``[class token] + 16*16`` image tokens
    in raster order.
    """

    model: torch.nn.Module
    tokenizer: VQTokenizer
    class_names: tuple[str, ...]
    image_token_range: tuple[int, int]
    null_class_id: int
    height: int = 16
    width: int = 16
    meta: dict | None = None

    def prompt(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]`` in ``[0, 10)`` -> input ids ``[B, 1]`` (the class tokens)."""
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
        """Image tokens ``[B, 16, 16]`` -> uint8 grayscale images ``[B, 28, 28]`` (CPU)."""
        return self.tokenizer.images(tokens)

    def to_pil(self, tokens: torch.Tensor, scale: int = 4) -> list[Image.Image]:
        """Image tokens ``[B, 16, 16]`` -> RGB PIL images upscaled ``scale``× (nearest neighbour)."""
        if scale < 1:
            raise ValueError(f"scale: expected an integer >= 1, got {scale}")
        return [Image.fromarray(img.numpy(), "L").resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
                .convert("RGB") for img in self.decode(tokens)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            assets: str | Path = ASSETS) -> DefaultModel:
    """Load the embedded default model (eval mode) from the package's assets; never touches the network.

    The GPT's fp16 weights are cast to ``dtype`` (fp32 by default) on ``device``; the tokenizer runs fp32.
    """
    from pjd.models.llamagen import load_llamagen

    assets = Path(assets)
    meta = read_meta(assets)
    gpt = meta["gpt"]
    model = load_llamagen(assets / GPT_FILE, gpt_model=gpt["arch"], image_size=gpt["image_size"],
                          downsample=gpt["downsample"], device=device, dtype=dtype)
    tokenizer = load_tokenizer(assets, device)
    model.image_decoder = tokenizer
    k = model.config.codebook_size
    return DefaultModel(model=model, tokenizer=tokenizer, class_names=CLASS_NAMES, image_token_range=(0, k),
                        null_class_id=k + len(CLASS_NAMES), height=model.config.grid_size,
                        width=model.config.grid_size, meta=meta)
