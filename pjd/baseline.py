"""The external baselines pjd's wall-clock figures are compared against (benchmarks/e2e.py, ``pjd demo``).

**LlamaGen's own sampler** (``OfficialLlamaGen``): what a user of a LlamaGen checkpoint runs instead
of pjd. It imports ``Transformer`` and ``generate()`` from the user's checkout of the official
repository (github.com/FoundationVision/LlamaGen, ``autoregressive/models/{gpt,generate}.py``;
``repo=`` or ``$PJD_LLAMAGEN_REPO``: nothing of it ships with pjd, nothing here downloads it),
builds their model with the checkpoint's config, loads the checkpoint (their format) into it and
runs their ``generate()``: CFG as one doubled batch, their static KV cache, their sampling
(CFG combine -> temperature -> top-k -> top-p, ``torch.multinomial`` from the global generator,
seeded by ``seed``). ``compiled=True`` is what their sample scripts' ``--compile`` does:
``torch.compile(model, mode="reduce-overhead", fullgraph=True)`` (on a CPU "reduce-overhead" has no
CUDA graphs to add and compiles as inductor's default), their Python decode loop around it.

**transformers' own ``model.generate``** (``hf_generate``) decoding the same images as pjd. The target
distribution is pjd's (docs/design.md §1): CFG combine -> image tokens only -> temperature -> top-k ->
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

import importlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from pjd.sampling import sample_inverse_cdf, target_probs

CFG_MODES = ("guidance", "batched")
LLAMAGEN_REPO_ENV = "PJD_LLAMAGEN_REPO"
LLAMAGEN_COMPILE = dict(mode="reduce-overhead", fullgraph=True)  # autoregressive/sample/sample_c2i.py --compile


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


def llamagen_repo(repo=None) -> Path:
    """The user's checkout of the official LlamaGen: ``repo``, else ``$PJD_LLAMAGEN_REPO``.

    Raises ``FileNotFoundError`` naming both when neither gives a directory holding
    ``autoregressive/models/gpt.py`` and ``generate.py``.
    """
    given = repo if repo is not None else os.environ.get(LLAMAGEN_REPO_ENV)
    how = (f"get it with `git clone https://github.com/FoundationVision/LlamaGen` and pass its path as repo= "
           f"(benchmarks: --llamagen-repo) or set ${LLAMAGEN_REPO_ENV}")
    if not given:
        raise FileNotFoundError(f"the official LlamaGen checkout is not given: {how}")
    path = Path(given).expanduser().resolve()
    missing = [f for f in ("autoregressive/models/gpt.py", "autoregressive/models/generate.py")
               if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{given} is not a checkout of FoundationVision/LlamaGen (no {', '.join(missing)}); "
                                f"{how}")
    return path


def _import_llamagen(repo: Path):
    """Their ``autoregressive.models.gpt`` and ``.generate`` modules, imported from ``repo`` (its root on
    sys.path while importing: their modules import ``utils.drop_path`` and the like from there)."""
    names = ("autoregressive.models.gpt", "autoregressive.models.generate")
    sys.path.insert(0, str(repo))
    try:
        gpt, generate = (importlib.import_module(n) for n in names)
    finally:
        sys.path.remove(str(repo))
    for module in (gpt, generate):
        if not Path(module.__file__).resolve().is_relative_to(repo):
            raise ImportError(f"{module.__name__} was already imported from {module.__file__}, not from {repo}")
    return gpt, generate


class OfficialLlamaGen:
    """LlamaGen's own ``Transformer`` holding a c2i checkpoint, decoded by its own ``generate()``.

    Args:
        gpt_checkpoint: a LlamaGen c2i GPT file in the release layout (``pjd.models.load_llamagen`` reads
            the same files; the embedded default model's ``gpt.pt`` is one: ``OfficialLlamaGen.default()``).
        gpt_model, image_size, downsample, trust_checkpoint: as ``pjd.models.load_llamagen`` (the
            architecture, the token grid, how the file is unpickled); codebook size and number of classes
            come from the checkpoint's shapes.
        repo: the official checkout (see ``llamagen_repo``).
        device, dtype: where their model runs (their sample script defaults to bf16 on CUDA; pjd's default
            model runs fp32).
    """

    def __init__(self, gpt_checkpoint, *, gpt_model, image_size: int, downsample: int = 16, repo=None,
                 device="cpu", dtype: torch.dtype = torch.float32, trust_checkpoint: bool = False):
        from pjd.models.base import load_checkpoint
        from pjd.models.llamagen import _arch, _check_weights, _release_state_dict

        arch = _arch(gpt_model)
        self.repo = llamagen_repo(repo)
        sd = _release_state_dict(load_checkpoint(gpt_checkpoint, "gpt_checkpoint",
                                                  trust_checkpoint=trust_checkpoint))
        codebook_size, num_classes = _check_weights(sd, arch, gpt_model)
        self.grid = image_size // downsample
        gpt, self._generate = _import_llamagen(self.repo)
        config = gpt.ModelArgs(n_layer=arch.n_layer, n_head=arch.n_head, dim=arch.dim, n_kv_head=arch.n_kv_head,
                               multiple_of=arch.multiple_of, ffn_dim_multiplier=arch.ffn_dim_multiplier,
                               rope_base=arch.rope_base, norm_eps=arch.norm_eps, vocab_size=codebook_size,
                               block_size=self.grid ** 2, num_classes=num_classes, cls_token_num=1, model_type="c2i")
        self.model = gpt.Transformer(config)
        self.model.load_state_dict({k: v for k, v in sd.items() if k != "freqs_cis"}, strict=True)
        self.model.to(device=device, dtype=dtype).eval()
        self.num_classes = num_classes
        self._compiled = None

    @classmethod
    def default(cls, repo=None, device="cpu", dtype: torch.dtype = torch.float32) -> "OfficialLlamaGen":
        """The embedded default model's checkpoint (pjd/fashion/assets/gpt.pt) in the official ``Transformer``."""
        from pjd.fashion.assets import ASSETS, GPT_FILE, read_meta

        gpt = read_meta(ASSETS)["gpt"]
        return cls(ASSETS / GPT_FILE, gpt_model=gpt["arch"], image_size=gpt["image_size"],
                   downsample=gpt["downsample"], repo=repo, device=device, dtype=dtype)

    def compiled_model(self):
        """``torch.compile`` of their model as their sample scripts' ``--compile`` (built once, compiled on first call)."""
        if self._compiled is None:
            self._compiled = torch.compile(self.model, **LLAMAGEN_COMPILE)
        return self._compiled

    def generate(self, labels, *, cfg_scale: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 temperature: float = 1.0, seed: int = 0, compiled: bool = False):
        """Their ``generate()`` for class ids ``labels`` ``[B]``.

        Returns ``(tokens [B, grid, grid] int64, wall seconds of the generate call)``. ``cfg_scale`` > 1
        runs their CFG (one doubled batch with the null class); they apply none at or below 1, so values
        below 1 are refused. The first call with ``compiled=True`` compiles (time it apart).
        """
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() == 0:
            raise ValueError(f"labels must be integer class ids, got {labels.dtype} with {labels.numel()} entries")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
        if not float(cfg_scale) >= 1.0:
            raise ValueError(f"cfg_scale must be >= 1 (LlamaGen's generate applies CFG above 1 only), got {cfg_scale}")
        model = self.compiled_model() if compiled else self.model
        device = next(self.model.parameters()).device
        torch.manual_seed(int(seed))  # their torch.multinomial draws from the global generator
        with warnings.catch_warnings():  # their decode loop enters the deprecated torch.backends.cuda.sdp_kernel
            warnings.filterwarnings("ignore", message=".*sdp_kernel.*", category=FutureWarning)
            t0 = time.perf_counter()
            seq = self._generate.generate(model, labels.long().to(device), self.grid ** 2, cfg_scale=float(cfg_scale),
                                          temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                          sample_logits=True)
            seconds = time.perf_counter() - t0
        return seq.long().view(-1, self.grid, self.grid), seconds


__all__ = ["hf_generate", "CFG_MODES", "OfficialLlamaGen", "llamagen_repo", "LLAMAGEN_REPO_ENV"]
