"""LlamaGen class-conditional models (FoundationVision/LlamaGen), natively.

``load_llamagen(gpt_checkpoint, gpt_model="GPT-XL", image_size=384)`` reads a release ``c2i_*.pt``
unchanged and returns a ``LlamaGenForCausalLM``: transformers' ``LlamaForCausalLM`` with LlamaGen's
2-D RoPE, so ``pjd.generate`` and ``pjd.fast`` (pjd's attention op) serve it like any Llama.

Custom sizes (models trained in LlamaGen's format, e.g. a tiny one): pass ``gpt_model`` as a
``LlamaGenArch`` or a dict of its fields, e.g. ``{"n_layer": 4, "n_head": 4, "dim": 128}``; the
codebook size and the number of classes are read from the checkpoint's shapes and the token grid is
``image_size // downsample``. To train such a model from scratch:
``LlamaGenForCausalLM(llamagen_config(arch, codebook_size=K, num_classes=C, grid_size=G))``, then
``torch.save({"model": llamagen_state_dict(model)}, path)`` writes LlamaGen's on-disk format.

How LlamaGen's GPT maps onto ``LlamaForCausalLM`` (``autoregressive/models/gpt.py`` of the release):

- vocabulary ``[0, K)`` image tokens (``tok_embeddings``), ``K + c`` class c, ``K + num_classes``
  the null class (CFG): ``cls_embedding.embedding_table`` appended to ``embed_tokens``. The output
  head keeps LlamaGen's width K (logits over image tokens only).
- position ids are 0 for the class token and ``1 + r * G + c`` for image token (r, c) (what pjd's
  engine and HF's default positions give); they index a precomputed table. Table row 0 is zero
  (cos = sin = 0: LlamaGen zeroes the class token's q and k); row ``1 + r * G + c`` rotates the
  first half of each head's frequency pairs by r and the second half by c, with frequencies
  ``rope_base ** (-4 j / head_dim)``.
- LlamaGen rotates interleaved pairs (2i, 2i+1); transformers rotates (i, i + head_dim/2). The
  loader permutes each head's q and k rows so pair i lands on (i, i + head_dim/2): scores unchanged.
- fused ``wqkv`` is split into q/k/v; ``w1/w3/w2`` are gate/up/down; RMSNorm eps 1e-5.

Vocabulary layout (also for ``llamagen_prompt`` without a model):

    [0, codebook_size)                               image tokens (VQ codebook ids, unchanged)
    codebook_size + c, c in [0, num_classes)         class c
    codebook_size + num_classes                      the null class (CFG's unconditional prompt)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from pjd._checks import check_device
from pjd.ops._checks import integer

from .base import CausalLMAdapter, check_codebook_ids, check_grid_size, engine_kwargs, load_checkpoint, to_pil


@dataclass(frozen=True)
class LlamaGenArch:
    """LlamaGen's GPT dimensions (its ``ModelArgs``): the FFN width is LlamaGen's rule, see ``ffn_dim``."""
    n_layer: int
    n_head: int
    dim: int
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        """SwiGLU width: int(2/3 * 4 dim), times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


# LlamaGen's GPT_models (c2i releases: B, L, XL, XXL, 3B; XXXL has no released c2i weights).
GPT_MODELS = {
    "GPT-B": LlamaGenArch(n_layer=12, n_head=12, dim=768),
    "GPT-L": LlamaGenArch(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": LlamaGenArch(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": LlamaGenArch(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": LlamaGenArch(n_layer=48, n_head=40, dim=2560),
    "GPT-3B": LlamaGenArch(n_layer=24, n_head=32, dim=3200),   # head dim 100
}


def _arch(gpt_model) -> LlamaGenArch:
    if isinstance(gpt_model, LlamaGenArch):
        arch = gpt_model
    elif isinstance(gpt_model, str):
        if gpt_model not in GPT_MODELS:
            raise ValueError(f"gpt_model must be one of {sorted(GPT_MODELS)}, a LlamaGenArch or a dict of its "
                             f"fields, got {gpt_model!r}")
        arch = GPT_MODELS[gpt_model]
    elif isinstance(gpt_model, dict):
        fields = {f.name for f in dataclasses.fields(LlamaGenArch)}
        if set(gpt_model) - fields or not {"n_layer", "n_head", "dim"} <= set(gpt_model):
            raise ValueError(f"gpt_model as a dict needs n_layer, n_head, dim and may hold {sorted(fields)}; "
                             f"got {sorted(gpt_model)}")
        arch = LlamaGenArch(**gpt_model)
    else:
        raise TypeError(f"gpt_model must be a name, a LlamaGenArch or a dict, got {type(gpt_model).__name__}")
    if arch.dim % arch.n_head or arch.head_dim % 4:
        raise ValueError(f"gpt_model: dim / n_head must be a multiple of 4 (LlamaGen's 2-D RoPE splits each head "
                         f"into row and column pairs), got dim={arch.dim}, n_head={arch.n_head}")
    return arch


def llamagen_config(gpt_model, *, codebook_size: int, num_classes: int, grid_size: int) -> LlamaConfig:
    """The LlamaConfig of a LlamaGen c2i model (extra fields: codebook_size, num_classes, grid_size)."""
    arch = _arch(gpt_model)
    return LlamaConfig(
        vocab_size=codebook_size + num_classes + 1, hidden_size=arch.dim, intermediate_size=arch.ffn_dim,
        num_hidden_layers=arch.n_layer, num_attention_heads=arch.n_head,
        num_key_value_heads=arch.n_kv_head or arch.n_head, head_dim=arch.head_dim,
        max_position_embeddings=1 + grid_size * grid_size, rms_norm_eps=arch.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rope_base)},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size)


def rope_2d_table(grid_size: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp32 ``[1 + grid_size**2, head_dim]`` in transformers' half-rotation layout (see module doc)."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) * 4 / head_dim)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # [G*G, head_dim/2]
    angles = torch.cat([angles, angles], dim=1)
    zero = torch.zeros(1, head_dim, dtype=torch.float64)
    return torch.cat([zero, angles.cos()]).float(), torch.cat([zero, angles.sin()]).float()


class LlamaGenRotaryEmbedding(nn.Module):
    """Drop-in for ``LlamaRotaryEmbedding``: looks (cos, sin) up by position id in ``rope_2d_table``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        cos, sin = rope_2d_table(config.grid_size, config.head_dim, config.rope_parameters["rope_theta"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        # No range check here (it would sync the GPU every layer call): the engine refuses grids past
        # max_position_embeddings (= the table's rows) before decoding.
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


class LlamaGenForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with LlamaGen's 2-D RoPE and an output head over the codebook only.

    ``image_decoder`` is what ``pjd.models.decode_images`` uses: None, a ``pjd.models.vq.VQDecoder``
    (``load_llamagen(vq_checkpoint=...)``), or any module whose ``decode(ids int64 [B, h, w])`` returns
    pixels ``[B, 3, H, W]`` in [-1, 1].
    """

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.codebook_size, bias=False)
        self.model.rotary_emb = LlamaGenRotaryEmbedding(config)
        self.image_decoder = None
        self.post_init()

    def loss_function(self, logits, labels, vocab_size, **kwargs):
        """transformers' causal-LM loss, over the head's width (the codebook) instead of config.vocab_size:
        ``model(input_ids=[class, image...], labels=[-100, image...]).loss`` is LlamaGen's training loss."""
        return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], **kwargs)


def _half_rotation_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that takes each head's interleaved pairs (2i, 2i+1) to (i, i + head_dim/2)."""
    per_head = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + per_head).reshape(-1)


def _release_state_dict(ckpt) -> dict:
    """The GPT weights of a LlamaGen checkpoint, in the layouts its sample script reads."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"gpt_checkpoint must hold a state dict, got a {type(ckpt).__name__}")
    for key in ("model", "module", "state_dict"):  # DDP release, DeepSpeed, Lightning-style
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if "tok_embeddings.weight" in ckpt:  # FSDP releases (XXL, 3B): a bare state dict
        return ckpt
    raise ValueError("gpt_checkpoint is not a LlamaGen GPT checkpoint: no 'model'/'module'/'state_dict' entry and "
                     f"no 'tok_embeddings.weight'; top-level keys: {sorted(ckpt)[:8]}")


def _to_hf(sd: dict, config: LlamaConfig) -> dict:
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_rows, k_rows = _half_rotation_rows(H, D), _half_rotation_rows(Hkv, D)
    out = {"model.embed_tokens.weight": torch.cat([sd["tok_embeddings.weight"],
                                                   sd["cls_embedding.embedding_table.weight"]]),
           "model.norm.weight": sd["norm.weight"], "lm_head.weight": sd["output.weight"]}
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attention.wqkv.weight"].split([H * D, Hkv * D, Hkv * D])
        out.update({dst + "self_attn.q_proj.weight": q[q_rows], dst + "self_attn.k_proj.weight": k[k_rows],
                    dst + "self_attn.v_proj.weight": v,
                    dst + "self_attn.o_proj.weight": sd[src + "attention.wo.weight"],
                    dst + "mlp.gate_proj.weight": sd[src + "feed_forward.w1.weight"],
                    dst + "mlp.up_proj.weight": sd[src + "feed_forward.w3.weight"],
                    dst + "mlp.down_proj.weight": sd[src + "feed_forward.w2.weight"],
                    dst + "input_layernorm.weight": sd[src + "attention_norm.weight"],
                    dst + "post_attention_layernorm.weight": sd[src + "ffn_norm.weight"]})
    return out


def llamagen_state_dict(model: LlamaGenForCausalLM) -> dict:
    """The inverse of the loader's conversion: LlamaGen's key names and layout (``{"model": ...}`` content)."""
    config = model.config
    H, Hkv, D, K = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.codebook_size
    q_back, k_back = _half_rotation_rows(H, D).argsort(), _half_rotation_rows(Hkv, D).argsort()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    embed = sd["model.embed_tokens.weight"]
    out = {"tok_embeddings.weight": embed[:K], "cls_embedding.embedding_table.weight": embed[K:],
           "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attention.wqkv.weight"] = torch.cat([sd[src + "self_attn.q_proj.weight"][q_back],
                                                        sd[src + "self_attn.k_proj.weight"][k_back],
                                                        sd[src + "self_attn.v_proj.weight"]])
        out.update({dst + "attention.wo.weight": sd[src + "self_attn.o_proj.weight"],
                    dst + "feed_forward.w1.weight": sd[src + "mlp.gate_proj.weight"],
                    dst + "feed_forward.w3.weight": sd[src + "mlp.up_proj.weight"],
                    dst + "feed_forward.w2.weight": sd[src + "mlp.down_proj.weight"],
                    dst + "attention_norm.weight": sd[src + "input_layernorm.weight"],
                    dst + "ffn_norm.weight": sd[src + "post_attention_layernorm.weight"]})
    return {k: v.contiguous() for k, v in out.items()}


def _expected_shapes(arch: LlamaGenArch, codebook_size: int, num_classes: int) -> dict:
    H, Hkv, D = arch.n_head, arch.n_kv_head or arch.n_head, arch.head_dim
    shapes = {"tok_embeddings.weight": (codebook_size, arch.dim), "norm.weight": (arch.dim,),
              "cls_embedding.embedding_table.weight": (num_classes + 1, arch.dim),
              "output.weight": (codebook_size, arch.dim)}
    for i in range(arch.n_layer):
        p = f"layers.{i}."
        shapes.update({p + "attention.wqkv.weight": ((H + 2 * Hkv) * D, arch.dim), p + "attention.wo.weight":
                       (arch.dim, arch.dim), p + "feed_forward.w1.weight": (arch.ffn_dim, arch.dim),
                       p + "feed_forward.w3.weight": (arch.ffn_dim, arch.dim),
                       p + "feed_forward.w2.weight": (arch.dim, arch.ffn_dim),
                       p + "attention_norm.weight": (arch.dim,), p + "ffn_norm.weight": (arch.dim,)})
    return shapes


def _check_weights(sd: dict, arch: LlamaGenArch, name) -> tuple[int, int]:
    """(codebook_size, num_classes) from the checkpoint; raises naming what does not match ``gpt_model``."""
    for key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight"):
        if key not in sd:
            raise ValueError(f"gpt_checkpoint has no {key!r}: not a LlamaGen class-conditional (c2i) GPT")
    codebook_size = sd["tok_embeddings.weight"].shape[0]
    num_classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1  # the last row is the null class
    expected = _expected_shapes(arch, codebook_size, num_classes)
    missing = sorted(set(expected) - set(sd))
    # LlamaGen's sample script loads with strict=False; "freqs_cis" (the RoPE table) is the known extra.
    unexpected = sorted(set(sd) - set(expected) - {"freqs_cis"})
    wrong = [f"{k}: {tuple(sd[k].shape)} != {v}" for k, v in expected.items() if k in sd and tuple(sd[k].shape) != v]
    if missing or unexpected or wrong:
        raise ValueError(f"gpt_checkpoint does not match gpt_model={name!r} ({arch}): missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}")
    return codebook_size, num_classes


def load_llamagen(gpt_checkpoint, *, gpt_model, image_size: int, downsample: int = 16, vq_checkpoint=None,
                  vq_model=None, device="cpu", dtype: torch.dtype = torch.float32,
                  trust_checkpoint: bool = False) -> LlamaGenForCausalLM:
    """A LlamaGen c2i release checkpoint as a ``LlamaGenForCausalLM`` (eval mode) for ``pjd.generate``.

    Args:
        gpt_checkpoint: path of a ``c2i_*.pt`` (a torch pickle: ``{"model": state_dict}`` for B/L/XL,
            the bare state dict for the FSDP-trained XXL/3B; ``"module"``/``"state_dict"`` also read),
            or a ``*.safetensors`` of the same state dict (LlamaGen's ``push_to_hub`` layout).
        gpt_model: ``"GPT-B" | "GPT-L" | "GPT-XL" | "GPT-XXL" | "GPT-XXXL" | "GPT-3B"``, or a
            ``LlamaGenArch`` / dict of its fields for custom sizes.
        image_size, downsample: pixels and the VQ's downsampling; the token grid is their quotient
            (c2i_XL_384.pt: 384 / 16 = 24 x 24).
        vq_checkpoint: optional ``vq_ds16_c2i.pt`` (``{"model": ...}``): attaches the VQ decoder that
            ``pjd.models.decode_images`` uses.
        vq_model: the VQ architecture (``pjd.models.vq.VQConfig`` or dict of its fields); default
            LlamaGen's VQ-16 / VQ-8 by ``downsample``, codebook size and dim from the checkpoint.
        device, dtype: where the weights go (the 2-D RoPE table is built in fp32 and cast per call).
        trust_checkpoint: ``False`` (default) reads torch pickles with the weights-only unpickler (tensors,
            containers, numbers and the trainer's ``argparse.Namespace``: all the official files hold) and
            refuses any other object; ``True`` allows the full unpickler, which can run code from the
            file: only for files you trust.
    Returns:
        LlamaGenForCausalLM; prompts from ``llamagen_prompt(labels, model=model, cfg_scale=...)``.
    """
    arch = _arch(gpt_model)
    check_device(device)
    for name, v in (("image_size", image_size), ("downsample", downsample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if image_size % downsample:
        raise ValueError(f"image_size={image_size} must be a multiple of downsample={downsample}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    sd = _release_state_dict(load_checkpoint(gpt_checkpoint, "gpt_checkpoint", trust_checkpoint=trust_checkpoint))
    codebook_size, num_classes = _check_weights(sd, arch, gpt_model)
    config = llamagen_config(arch, codebook_size=codebook_size, num_classes=num_classes,
                             grid_size=image_size // downsample)
    with torch.device("meta"):
        model = LlamaGenForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in _to_hf(sd, config).items()}, strict=True, assign=True)
    model.model.rotary_emb = LlamaGenRotaryEmbedding(config)  # its buffers were built on "meta"
    model.to(device)
    if vq_checkpoint is not None:
        from .vq import load_llamagen_vq

        # fp32 whatever the GPT's dtype, as LlamaGen's sample script runs its VQ.
        model.image_decoder = load_llamagen_vq(vq_checkpoint, downsample=downsample, vq_model=vq_model,
                                               codebook_size=codebook_size,
                                               trust_checkpoint=trust_checkpoint).to(device)
    return model.eval()


def llamagen_prompt(labels, *, model=None, codebook_size: int | None = None, num_classes: int | None = None,
                    height: int | None = None, width: int | None = None, cfg_scale: float = 1.0,
                    cls_token_num: int = 1, device=None) -> dict:
    """Engine kwargs (``pjd.generate(model, **prompt, method=...)``) for class-conditional images.

    Args:
        labels: class ids, an int, a list of ints or an int tensor ``[B]`` in ``[0, num_classes)``.
        model: a ``LlamaGenForCausalLM`` (``load_llamagen``): codebook size, classes, grid and device
            come from it (height defaults to, and may be less than, its grid; width must equal it, since
            the 2-D RoPE table is laid out by the grid's rows).
        codebook_size, num_classes, height, width: the layout above, without a model.
        cfg_scale: != 1 adds the null-class prompt as the unconditional row (LlamaGen's CFG).
        cls_token_num: class-token copies before the image (1 for LlamaGen's c2i models).
    """
    if model is not None:
        config = model.config
        if not isinstance(model, LlamaGenForCausalLM):
            raise TypeError(f"model must be a LlamaGenForCausalLM (pjd.models.load_llamagen), "
                            f"got {type(model).__name__}")
        for name, given, own in (("codebook_size", codebook_size, config.codebook_size),
                                 ("num_classes", num_classes, config.num_classes), ("width", width, config.grid_size)):
            if given is not None and given != own:
                raise ValueError(f"{name}={given} does not match the model's {own}")
        if cls_token_num != 1:
            raise ValueError(f"LlamaGen c2i models take one class token, got cls_token_num={cls_token_num}")
        codebook_size, num_classes, width = config.codebook_size, config.num_classes, config.grid_size
        height = config.grid_size if height is None else height
        if isinstance(height, int) and height > config.grid_size:
            raise ValueError(f"height={height} is more rows than the model's {config.grid_size}-row grid")
        device = model.device if device is None else device
    elif codebook_size is None or num_classes is None:
        raise ValueError("llamagen_prompt needs model= or both codebook_size= and num_classes=")
    check_grid_size(height, width)
    for name, value in (("codebook_size", codebook_size), ("num_classes", num_classes),
                        ("cls_token_num", cls_token_num)):
        integer(name, value, low=1)
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() == 0:
        raise TypeError(f"labels must be integer class ids, got {labels.dtype} with {labels.numel()} entries")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got {labels.tolist()}")
    ids = (codebook_size + labels.long())[:, None].repeat(1, cls_token_num).to(device)
    uncond = torch.full_like(ids, codebook_size + num_classes)
    mask = torch.ones_like(ids)
    return engine_kwargs(ids=ids, mask=mask, uncond_ids=uncond, uncond_mask=mask, cfg_scale=cfg_scale,
                         height=height, width=width, image_token_range=(0, codebook_size))


class LlamaGenAdapter(CausalLMAdapter):
    """A LlamaGen model decodes the grid its 2-D RoPE table was built for (pjd._checks.check_positions)."""

    @property
    def grid(self) -> tuple[int, int]:
        return self.model.config.grid_size, self.model.config.grid_size


ADAPTER = LlamaGenAdapter


def decode_images(model, tokens: torch.Tensor) -> list:
    """PIL images of a ``[B, h, w]`` grid of codebook ids through the attached VQ decoder."""
    if getattr(model, "image_decoder", None) is None:
        raise TypeError("this LlamaGen model has no VQ decoder: load it with load_llamagen(..., vq_checkpoint=...)")
    decoder = model.image_decoder
    check_codebook_ids(tokens, model.config.codebook_size)
    with torch.no_grad():
        return to_pil(decoder.decode(tokens.to(next(decoder.parameters()).device)))


__all__ = ["LlamaGenArch", "GPT_MODELS", "LlamaGenForCausalLM", "LlamaGenRotaryEmbedding", "llamagen_config",
           "llamagen_state_dict", "load_llamagen", "llamagen_prompt", "rope_2d_table", "decode_images"]
