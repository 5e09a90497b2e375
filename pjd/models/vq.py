"""VQ image decoders of the families transformers has none for: LlamaGen's VQ and Chameleon's VQGAN.

Both are the taming-transformers decoder: codebook lookup -> 1x1 ``post_quant_conv`` -> conv_in ->
middle (res, attention, res) -> per resolution level (lowest first) ``num_res_blocks + 1`` residual
blocks (each followed by a spatial self-attention block on ``attn_levels``) and a nearest x2
upsample + conv -> GroupNorm, swish, conv_out. They differ in where attention sits (LlamaGen: the
lowest-resolution level; Chameleon's released config: nowhere), whether codebook entries are
l2-normalised (LlamaGen yes), and key names. ``VQDecoder``'s parameter names are LlamaGen's
(``tokenizer/tokenizer_image/vq_model.py``), so ``{"model": decoder.state_dict()}`` plus an encoder is
a LlamaGen VQ checkpoint; Chameleon's taming names are converted by ``taming_to_llamagen_keys``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import load_checkpoint


@dataclass(frozen=True)
class VQConfig:
    """Decoder architecture. ``attn_levels``: indices of the up levels with attention, 0 = lowest resolution
    (the first after the middle block). The upsampling factor is ``2 ** (len(ch_mult) - 1)``."""
    codebook_size: int = 16384
    codebook_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_levels: tuple = (0,)
    out_channels: int = 3
    l2_norm: bool = True
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# LlamaGen's VQ_models, by downsampling factor (codebook size and dim are read from the checkpoint).
LLAMAGEN_VQ = {16: VQConfig(ch_mult=(1, 1, 2, 2, 4)), 8: VQConfig(ch_mult=(1, 2, 2, 4))}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1 conv projections)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [b, hw, c]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQDecoder(nn.Module):
    """Codebook ids ``[B, h, w]`` (int64) -> pixels ``[B, out_channels, f*h, f*w]`` (about [-1, 1]),
    f = ``config.downsample``."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = c = config
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(c.codebook_size, c.codebook_dim)
        self.post_quant_conv = nn.Conv2d(c.codebook_dim, c.z_channels, 1)
        d = self.decoder = nn.Module()
        block_in = c.ch * c.ch_mult[-1]
        d.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        d.mid = nn.ModuleList([ResBlock(block_in, block_in, c.norm_groups), AttnBlock(block_in, c.norm_groups),
                               ResBlock(block_in, block_in, c.norm_groups)])
        d.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(reversed(c.ch_mult)):
            level = nn.Module()
            block_out = c.ch * mult
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                level.res.append(ResBlock(block_in, block_out, c.norm_groups))
                block_in = block_out
                if i in c.attn_levels:
                    level.attn.append(AttnBlock(block_in, c.norm_groups))
            if i != len(c.ch_mult) - 1:
                level.upsample = Upsample(block_in)
            d.conv_blocks.append(level)
        d.norm_out = _norm(block_in, c.norm_groups)
        d.conv_out = nn.Conv2d(block_in, c.out_channels, 3, padding=1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook entries ``[B, codebook_dim, h, w]`` of ids ``[B, h, w]``."""
        table = self.quantize.embedding.weight
        if self.config.l2_norm:
            table = F.normalize(table, p=2, dim=-1)
        return table[ids].permute(0, 3, 1, 2)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3 or ids.dtype.is_floating_point:
            raise TypeError(f"ids must be an integer tensor [B, h, w], got {ids.dtype} {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.config.codebook_size}) (codebook ids)")
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(self.embed(ids).to(self.post_quant_conv.weight.dtype)))
        for block in d.mid:
            h = block(h)
        for level in d.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return d.conv_out(F.silu(d.norm_out(h)))


def _config(base: VQConfig, overrides) -> VQConfig:
    if overrides is None:
        return base
    if isinstance(overrides, VQConfig):
        return overrides
    if not isinstance(overrides, dict):
        raise TypeError(f"vq_model must be a VQConfig or a dict of its fields, got {type(overrides).__name__}")
    fields = {f.name for f in dataclasses.fields(VQConfig)}
    if set(overrides) - fields:
        raise ValueError(f"vq_model has unknown fields {sorted(set(overrides) - fields)}; known: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(base, **values)


def load_decoder(state_dict: dict, config: VQConfig, what: str) -> VQDecoder:
    """A VQDecoder from a state dict in LlamaGen's key names (encoder and training entries are ignored)."""
    wanted = ("decoder.", "post_quant_conv.", "quantize.embedding.")
    sd = {k: v for k, v in state_dict.items() if k.startswith(wanted)}
    with torch.device("meta"):
        decoder = VQDecoder(config)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)} != {v}" for k, v in expected.items() if k in sd and tuple(sd[k].shape) != v]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not match the VQ architecture {config}: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shapes {wrong[:4]}")
    decoder.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return decoder.eval()


def load_llamagen_vq(path, *, downsample: int, vq_model=None, codebook_size: int | None = None,
                     trust_checkpoint: bool = False) -> VQDecoder:
    """LlamaGen's ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` (``{"model": state_dict}``, or its ``*.safetensors``)
    as a VQDecoder (``trust_checkpoint``: as ``pjd.models.load_llamagen``)."""
    ckpt = load_checkpoint(path, "vq_checkpoint", trust_checkpoint=trust_checkpoint)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or "quantize.embedding.weight" not in sd:
        raise ValueError(f"vq_checkpoint {str(path)!r} is not a LlamaGen VQ checkpoint ({{'model': state_dict}} "
                         "with 'quantize.embedding.weight')")
    if vq_model is None and downsample not in LLAMAGEN_VQ:
        raise ValueError(f"LlamaGen's VQs downsample by {sorted(LLAMAGEN_VQ)}, got downsample={downsample}; "
                         "pass vq_model= for another architecture")
    rows, dim = sd["quantize.embedding.weight"].shape
    config = _config(dataclasses.replace(LLAMAGEN_VQ.get(downsample, VQConfig()), codebook_size=rows,
                                         codebook_dim=dim), vq_model)
    if config.downsample != downsample:
        raise ValueError(f"vq_model upsamples by {config.downsample} but downsample={downsample}")
    if codebook_size is not None and rows != codebook_size:
        raise ValueError(f"vq_checkpoint has {rows} codes but the GPT's vocabulary has {codebook_size} image tokens")
    return load_decoder(sd, config, "vq_checkpoint")


def taming_to_llamagen_keys(state_dict: dict, num_levels: int) -> dict:
    """taming-transformers decoder names (Chameleon's ``vqgan.ckpt``) -> VQDecoder's: ``mid.block_1 /
    attn_1 / block_2`` -> ``mid.0/1/2``; ``up.{level}`` (level 0 = highest resolution) ->
    ``conv_blocks.{num_levels - 1 - level}``, ``block`` -> ``res``."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("decoder.mid.block_1.", "decoder.mid.0.").replace("decoder.mid.attn_1.", "decoder.mid.1.")
        key = key.replace("decoder.mid.block_2.", "decoder.mid.2.")
        m = re.match(r"decoder\.up\.(\d+)\.(block|attn|upsample)(.*)", key)
        if m:
            part = "res" if m.group(2) == "block" else m.group(2)
            key = f"decoder.conv_blocks.{num_levels - 1 - int(m.group(1))}.{part}{m.group(3)}"
        out[key] = value
    return out


def chameleon_vq_config(vq_config) -> VQConfig:
    """VQConfig of a Chameleon VQGAN from transformers' ``ChameleonVQVAEConfig`` (the model's ``config.vq_config``):
    attention on the up levels whose resolution is in ``attn_resolutions``, as taming's decoder places it."""
    mult = tuple(vq_config.channel_multiplier)
    lowest = vq_config.resolution // 2 ** (len(mult) - 1)
    attn = tuple(i for i in range(len(mult)) if lowest * 2 ** i in (vq_config.attn_resolutions or []))
    return VQConfig(codebook_size=vq_config.num_embeddings, codebook_dim=vq_config.embed_dim,
                    z_channels=vq_config.latent_channels, ch=vq_config.base_channels, ch_mult=mult,
                    num_res_blocks=vq_config.num_res_blocks, attn_levels=attn, out_channels=vq_config.in_channels,
                    l2_norm=False)


def read_chameleon_vqgan(path, *, trust_checkpoint: bool = False) -> dict:
    """The state dict of Meta's Chameleon ``vqgan.ckpt`` (a Lightning checkpoint, ``{"state_dict": ...}``;
    ``trust_checkpoint``: as ``pjd.models.load_llamagen``)."""
    ckpt = load_checkpoint(path, "vqgan_checkpoint", trust_checkpoint=trust_checkpoint)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or "quantize.embedding.weight" not in sd:
        raise ValueError(f"vqgan_checkpoint {str(path)!r} is not a Chameleon VQGAN checkpoint ({{'state_dict': ...}} "
                         "with 'quantize.embedding.weight')")
    return sd


def chameleon_vqgan_decoder(state_dict: dict, vq_config) -> VQDecoder:
    """A VQDecoder from a Chameleon VQGAN state dict (taming names) and transformers' ``ChameleonVQVAEConfig``."""
    config = chameleon_vq_config(vq_config)
    return load_decoder(taming_to_llamagen_keys(state_dict, len(config.ch_mult)), config, "vqgan_checkpoint")


def load_chameleon_vqgan(path, vq_config, *, trust_checkpoint: bool = False) -> VQDecoder:
    """Meta's Chameleon ``vqgan.ckpt`` as a VQDecoder (``vq_config``: the model's ``config.vq_config``)."""
    return chameleon_vqgan_decoder(read_chameleon_vqgan(path, trust_checkpoint=trust_checkpoint), vq_config)


__all__ = ["VQConfig", "VQDecoder", "LLAMAGEN_VQ", "load_decoder", "load_llamagen_vq", "load_chameleon_vqgan",
           "read_chameleon_vqgan", "chameleon_vqgan_decoder", "chameleon_vq_config", "taming_to_llamagen_keys"]
