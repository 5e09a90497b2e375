"""The decoding engine: ar, sjd, sjd++, pjd and zipar as one Jacobi iteration loop.

    prefill the prompt
    until every lane of every image is complete:
        lanes  = schedule()          which lanes are fed, how many drafts each, lane rules
        step   = pack(lanes)         packed inputs + row-causal metadata (leading/scaffold tokens)
        logits = forward(step)       the model, attention through pjd.ops.draft_attention
        result = verify(logits)      pjd.ops.speculative_verify: accept, resample, next drafts
        commit(result)               tokens, cache states, lane frontiers

State lives on the model's device. Two step shapes (docs/design.md §1.3):
- dynamic (the CPU eager default): the packed input width N and the cache length follow the step;
  each step reads them back, one host read per step;
- fixed (CUDA, and any compiled step): N is a bucket chosen up front (``DecodePlan.max_fed_inputs``,
  the most inputs a step can feed; the compiled CPU step of pjd / zipar also has a one-lane bucket,
  picked per step: ``pjd.compiler.buckets``), attention runs over the whole preallocated cache with the
  metadata hiding what is not there, every buffer is preallocated and updated in place, and the
  step number of the draws is a device tensor: a step reads nothing back. Completion, undefined
  targets and the progress bar are read together every few steps (``_Watch``).
Randomness is counter-based per image (pjd.rng): image i's
draws are a function of (seed, image_index[i], step, lane, slot) computed with int64 tensor ops on
the device, so an image's tokens do not depend on its batch, the device, backend or cache layout.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch

from pjd import _checks, compiler
from pjd.cache import HIDDEN_POS, ActiveStep, AppendCache, SlotCache, StepInputs
from pjd.models.base import adapter_for
from pjd.ops._backend import resolve_backend, triton_unsupported
from pjd.ops.speculative_verify import PREFIX, TOP, VerifyResult, speculative_verify
from pjd.plan import DecodePlan, make_plan
from pjd.rng import DrawStream
from pjd.sampling import sample_inverse_cdf, target_probs

BIG = 1 << 30
CHECK_EVERY = 10  # fixed-shape loop: steps between host reads while completion is not yet possible


@dataclass(repr=False)
class GenerationResult:
    """What ``pjd.generate`` returns.

    ``tokens``: int64 ``[B, height, width]`` image tokens (ids in ``image_token_range``; EOL tokens
    excluded), for ``pjd.models.decode_images``. ``steps``: forward passes after the prefill (the
    batch's; ``height * width`` for ``ar``); ``steps_per_image``: the step at which each image was
    complete (step compression of image b = ``height * width / steps_per_image[b]``). ``accepted``:
    per step, the image tokens committed per image ``[B]``. ``wall_seconds`` (prefill included) and
    ``forward_seconds`` (inside the model's forward passes) time this call, first-call costs included:
    time a second call (pjd.timing.WarmUp) for figures. ``method``: the method that produced it.
    ``compile_seconds``: compiling / capturing the step in this call (``generate(compile=...)``; 0 when
    an earlier call with the same model, weights and settings compiled it: pjd.compiler keeps it),
    never counted in ``wall_seconds`` nor ``forward_seconds``; ``compiled``: "inductor",
    "cuda-graph" or "" (eager). With a compiled step ``forward_seconds`` times whole steps.
    """

    tokens: torch.Tensor            # int64 [B, height, width] image tokens (EOL excluded)
    steps: int                      # forward passes after the prefill
    accepted: list[torch.Tensor] = field(default_factory=list)  # per step: image tokens committed per image [B]
    steps_per_image: torch.Tensor | None = None  # int64 [B]: step at which each image was complete
    wall_seconds: float = 0.0       # whole call, prefill included (compile_seconds excluded)
    forward_seconds: float = 0.0    # time inside the model forward passes (compiled: whole steps)
    method: str = ""
    compile_seconds: float = 0.0    # compiling / capturing the step in this call (0 when cached)
    compiled: str = ""              # "inductor", "cuda-graph" or "" (eager); see generate(compile=)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens[0].numel() / max(self.steps, 1)

    def __repr__(self) -> str:  # a summary: the tensors and the per-step list run to hundreds of lines
        b, h, w = self.tokens.shape
        return (f"GenerationResult(method={self.method!r}, tokens=[{b}, {h}, {w}], steps={self.steps}, "
                f"tokens_per_step={self.tokens_per_step:.2f}, wall_seconds={self.wall_seconds:.3f})")


@dataclass
class Lanes:
    """The schedule of one step, all [B, L]."""

    fed: torch.Tensor       # bool: the lane gets inputs this step
    drafts: torch.Tensor    # int64: m, drafts fed after the lane's last committed token
    rule: torch.Tensor      # int32: TOP or PREFIX
    room: torch.Tensor      # int64: slots left in the lane
    flush: torch.Tensor     # bool: a complete lane fed its last token only to cache its key


@dataclass
class Packed:
    """One step's packed inputs: what the forward, the verification and the commit share."""

    inputs: StepInputs           # row-causal metadata read by the attention hook and the cache
    tokens: torch.Tensor         # int64 [Bx, N] input ids
    rope: torch.Tensor           # int64 [Bx, N] position ids
    lane_start: torch.Tensor | None = None        # [B, L] index of each lane's first input (-1: not fed)
    dest: torch.Tensor | None = None              # [B, L*(W+1)] packed index of each grid entry (N: none)
    writes_committed: torch.Tensor | None = None  # [B, L, W+1] leading inputs that write their key
    fed_lanes: int = 0                            # most lanes fed in one image (host int)


def generate(model, input_ids, *, height, width, method="pjd", window=None, context=None, top_k=0,
             top_p=1.0, temperature=1.0, cfg_scale=1.0, uncond_input_ids=None, attention_mask=None,
             uncond_attention_mask=None, image_token_range=None, eol_token_id=None, draft_init="random",
             reuse_threshold="auto", cache="slot", backend="auto", generator=None, seed=None, progress=False,
             row_causal=True, row0_first="auto", row_lead="row_end", image_index=None, coupled_draws=False,
             continuation=False, compile=False, fixed_shapes=None) -> GenerationResult:
    """Generate a height x width grid of image tokens per prompt.

    Args:
        model: a transformers causal LM whose image tokens are vocabulary ids (or a pjd adapter).
        input_ids: int ``[B, P]`` conditioning prefix; left padding allowed through
            ``attention_mask`` ``[B, P]`` (1 = real token). Image token (r, c) takes the position
            ``P_real + r * row_slots + c`` exactly as in plain AR generation.
        method: "ar" | "sjd" | "sjd++" | "pjd" | "zipar". window: drafts per lane (sjd 15, pjd 7).
        context: committed tokens of row r that activate row r+1 (pjd: default round(width/8),
            zipar: round(width/4); at least 1).
        row0_first: True decodes row 0 completely before row 1 activates (pjd/zipar; "auto": True
            without EOL, where every fresh row then has a complete row to lead from, False with EOL).
        row_lead: without EOL, what a fresh row leads with while the row above is unfinished (a
            scaffold, taken at activation and kept): "row_end" the last token of the lowest complete
            row (default), "above" the row above's last committed token, "two_above" row r-2's
            (official ZipAR); with no complete row (row 1 without row0_first), the row above's.
        top_k (0 = off, 1 = greedy), top_p, temperature: the target distribution.
        cfg_scale: != 1 needs ``uncond_input_ids``; combined logits ``uncond + s * (cond - uncond)``.
        image_token_range: ``(lo, hi)`` image token ids (default: whole vocabulary).
        eol_token_id: forced end-of-line token after every row (row_slots = width + 1).
        draft_init: "random" | "repeat_left" (methods with drafts). reuse_threshold: pjd / sjd++
            draft reuse ("auto": 0.5; None: off); other methods take only "auto" or None.
        cache: "slot" | "append" (the KV-cache layout: same tokens in fp32; see docs/design.md for
            half precision). backend: attention and verification: "auto" (the Triton kernels on CUDA,
            "sdpa" on a CPU or where the kernels cannot serve the model), "torch" (the pure-torch
            reference), "sdpa" (torch SDPA over the cache in place), "triton".
        seed: non-negative int below 2**64 (default 0). Image b draws its random numbers from its own
            stream keyed by ``(seed, image_index[b])`` (pjd.rng), so its tokens are the same whatever
            batch, batch position, rank or device decodes it.
        image_index: int ``[B]`` (list or tensor) global index of each image in the run (default
            ``arange(B)``); pass the indices of the images a batch holds when splitting a run.
        generator: deprecated (DeprecationWarning); a seed is drawn from this CPU torch.Generator.
        row_causal: False lets drafts see other rows' drafts (the paper's ablation; pjd only).
        coupled_draws: SCD's coupled draws (sjd, pjd): a fresh draft of image slot s is the
            exponential race on noise keyed by (seed, image, s), the same at every step, so a slot
            redrawn from a similar distribution repeats its draft. Exact (docs/design.md §1.4).
        continuation: SJD-PAC's adaptive continuation (sjd, pjd): drafts after the first rejection
            keep being verified against this step's (stale) targets; a passing draft stays, a
            failing one is replaced by a residual sample. Commits are unchanged. Exact.
            Both replace pjd's draft reuse (its reuse_threshold becomes None).
        fixed_shapes: the step's shapes fixed for the whole decode (inputs padded to a bucket,
            attention over the whole preallocated cache) and nothing read back from the device but
            a few flags every few steps; False: each step packs exactly its inputs and reads its
            shapes back. None (default): fixed on CUDA and whenever the step is compiled, dynamic
            on a CPU eager (faster there: no padding to compute; docs/performance.md). Same tokens.
        compile: False (default, eager) | True | "auto": the step (schedule, pack, forward,
            verification, commit) compiled whole with fixed shapes: on CUDA captured once as a CUDA
            graph and replayed, on a CPU through torch.compile (inductor; pjd and zipar there get a
            second, one-lane input bucket, i.e. two compiles). Paid once per model, weights and
            settings: the compiled step and its buffers are kept for the next such call (at most
            ``pjd.compiler.KEEP`` per model, freed with the model or by ``pjd.compiler.clear()``);
            ``GenerationResult.compile_seconds`` reports it apart from the wall time. Tokens equal
            eager's. True raises where it cannot run; "auto" compiles wherever it can and otherwise
            runs eager with a one-time warning saying why.

    Every argument is checked before any decoding work (TypeError / ValueError naming it); the call
    runs under ``torch.no_grad()``. A model emitting NaN / +inf logits, or -inf for every image
    token, raises ValueError naming the step and the image (pjd.ops.speculative_verify's rule).
    """
    adapter = adapter_for(model)
    _checks.check_settings(method=method, height=height, width=width, window=window, context=context, top_k=top_k,
                           top_p=top_p, temperature=temperature, cfg_scale=cfg_scale,
                           image_token_range=image_token_range, eol_token_id=eol_token_id, draft_init=draft_init,
                           reuse_threshold=reuse_threshold, generator=generator, seed=seed, progress=progress,
                           row_causal=row_causal, coupled_draws=coupled_draws, continuation=continuation)
    prompt_len = _checks.check_prompts(adapter, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask,
                                       cfg_scale)
    _checks.check_positions(adapter, prompt_len, height, width, eol_token_id)
    plan = make_plan(method=method, height=height, width=width, window=window, context=context,
                     top_k=top_k, top_p=top_p, temperature=temperature, cfg_scale=cfg_scale,
                     image_token_range=image_token_range, eol_token_id=eol_token_id, draft_init=draft_init,
                     reuse_threshold=reuse_threshold, cache=cache, vocab_size=adapter.vocab_size,
                     row_causal=row_causal, row0_first=row0_first, row_lead=row_lead, coupled_draws=coupled_draws,
                     continuation=continuation)
    # Fail before any work if the backend cannot run here; auto leaves the kernels for shapes they cannot serve.
    backend = resolve_backend(backend, adapter.device, lambda: triton_unsupported(
        ("draft_attention", adapter.head_dim, adapter.dtype), ("speculative_verify", plan.window, adapter.dtype)))
    compiled = compiler.mode(compile, adapter, backend)
    if fixed_shapes is None:
        fixed_shapes = adapter.device.type == "cuda" or bool(compiled)
    elif not isinstance(fixed_shapes, bool):
        raise TypeError(f"fixed_shapes must be True, False or None, got {fixed_shapes!r}")
    elif compiled and not fixed_shapes:
        raise ValueError("compile needs fixed shapes: pass fixed_shapes=None or True with compile")
    image_index = _image_index(image_index, input_ids.shape[0], adapter.device)
    if generator is not None:
        warnings.warn("generate(generator=...) is deprecated: pass seed= (per-image streams, pjd.rng)",
                      DeprecationWarning, stacklevel=2)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
    seed = 0 if seed is None else int(seed)  # checked by _checks.check_settings (pjd.rng.check_seed)
    with torch.no_grad():  # as transformers' generate: no autograd graph of the whole decode
        prompt, mask = _prompts(input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, cfg_scale)
        settings = (plan, input_ids.shape[0], *prompt.shape, float(cfg_scale), int(top_k), float(top_p),
                    float(temperature), draft_init, cache, backend, fixed_shapes, compiler.buckets(plan, compiled))
        # A compiled step is kept with its decoder's buffers (what a CUDA graph records) for the next call.
        key = compiler.key(adapter, compiled, settings) if compiled else None
        decoder = compiler.checkout(model, key) if compiled else None
        if decoder is None:
            decoder = _Decoder(adapter, *settings)
        decoder.adapter = adapter
        decoder.reset(prompt, mask, seed, image_index)
        result = decoder.run(progress, compiled)
        if compiled:
            compiler.checkin(model, key, decoder)
        return result


def _image_index(image_index, B: int, device) -> torch.Tensor:
    """int64 [B] on ``device``: the images' global indices (default 0..B-1), checked."""
    if image_index is None:
        return torch.arange(B, device=device)
    index = torch.as_tensor(image_index)
    if index.ndim != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"image_index: expected integer [B], got {index.dtype} {tuple(index.shape)}")
    if index.shape[0] != B:
        raise ValueError(f"image_index: expected {B} indices (one per prompt), got {index.shape[0]}")
    if index.numel() and int(index.min()) < 0:
        raise ValueError("image_index: expected non-negative indices")
    return index.long().to(device)


def _prompts(input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, cfg_scale):
    """(ids, mask) of every batch row: cond, then uncond with CFG (checked by pjd._checks)."""
    mask = _mask(attention_mask, input_ids)
    if cfg_scale == 1.0:
        return input_ids.long(), mask
    umask = _mask(uncond_attention_mask, uncond_input_ids)
    P = max(input_ids.shape[1], uncond_input_ids.shape[1])  # left-pad both to one length

    def pad(ids, m):
        extra = P - ids.shape[1]
        return (torch.nn.functional.pad(ids.long(), (extra, 0)),
                torch.nn.functional.pad(m, (extra, 0), value=False))

    (c, cm), (u, um) = pad(input_ids, mask), pad(uncond_input_ids, umask)
    return torch.cat([c, u]), torch.cat([cm, um])


def _mask(mask, ids):
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def _above(x: torch.Tensor, first) -> torch.Tensor:
    """``[B, L]``: each lane's value of ``x`` in the lane above (row r - 1), ``first`` for lane 0.
    Booleans are shifted as integers: inductor (torch 2.13) generates C++ that does not compile for a
    padded boolean computed from int64 values in its vectorised CPU kernels (batch 2, pjd)."""
    if x.dtype == torch.bool:
        return torch.nn.functional.pad(x[:, :-1].to(torch.uint8), (1, 0), value=int(first)).bool()
    return torch.nn.functional.pad(x[:, :-1], (1, 0), value=first)


class _Decoder:
    """The decode's state, preallocated on the model's device, and the step over it (``step``)."""

    def __init__(self, adapter, plan: DecodePlan, B: int, Bx: int, P: int, cfg_scale: float, top_k: int,
                 top_p: float, temperature: float, draft_init: str, cache: str, backend: str, fixed_shapes=False,
                 buckets: tuple[int, ...] | None = None):
        """Allocates the state of a decode of B images in Bx batch rows (2B with CFG) after prompts of
        P tokens; ``reset`` fills it for a call (a compiled step keeps its decoder: pjd.compiler)."""
        self.adapter, self.plan, self.backend, self.fixed = adapter, plan, backend, fixed_shapes
        self.sampling = dict(top_k=top_k, top_p=top_p, temperature=temperature)
        self.cfg_scale = cfg_scale
        device = self.device = adapter.device
        self.B, self.Bx, self.P = B, Bx, P
        total = P + plan.image_slots
        L, W = plan.num_lanes, max(plan.window, 1)  # ar/zipar store one (never fed) draft per lane
        self.L, self.W = L, W
        # Fixed shapes: a step packs at most N inputs (padding sees nothing and writes nowhere), as many
        # as its bucket says (pjd.compiler.buckets: one, N, but for a compiled CPU step), picked by the host
        # from the next step's inputs, which the step computes at its end.
        self.N = plan.max_fed_inputs
        self.buckets = buckets or (self.N,)
        self.bucket = self.buckets[-1]
        self.next_inputs = torch.zeros((), dtype=torch.long, device=device)
        # Raster buffers: prompt then image slots. Image slots are shared by cond/uncond rows.
        self.dump = total  # a last column that absorbs writes that do not apply
        self.tokens = torch.zeros(Bx, total + 1, dtype=torch.long, device=device)
        self.real = torch.ones(Bx, total + 1, dtype=torch.bool, device=device)
        self.rope = torch.zeros(Bx, total + 1, dtype=torch.long, device=device)  # position ids
        self.kv_ready = torch.zeros(B, total + 1, dtype=torch.bool, device=device)
        self.lane_base = torch.tensor(plan.lane_base, device=device)
        self.lane_len = torch.tensor(plan.lane_len, device=device)
        self.n = torch.zeros(B, L, dtype=torch.long, device=device)
        self.draws = DrawStream(0, torch.zeros(B, dtype=torch.long, device=device), L, W, (plan.lo, plan.hi))
        self.draft_tokens = torch.zeros(B, L, W, dtype=torch.long, device=device)
        self.draft_q = torch.zeros(B, L, W, plan.hi - plan.lo, device=device)
        self.scaffold_token = torch.full((B, L), -1, dtype=torch.long, device=device)  # -1: not taken yet
        if cache == "slot":
            self.cache = SlotCache(Bx, total, L, device)
        else:
            self.cache = AppendCache(Bx, total + L * (W + 1), device, staging=self.N if self.fixed else None)
        self.lane_id = torch.arange(L, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)  # decoding steps run (draws of step t)
        # Every step commits a token in each unfinished image's top lane, and a lane is flushed once.
        self.max_steps = plan.image_slots + L
        self.accepted_log = torch.zeros(self.max_steps + 1, B, dtype=torch.long, device=device)  # [step, image]
        self.finished_at = torch.full((B,), -1, dtype=torch.long, device=device)  # step each image completed
        # Per image, the first step whose target was undefined (-1: none); read at host reads.
        self.bad_step = torch.full((B,), -1, dtype=torch.long, device=device)
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)  # a step fed more lanes than its bucket
        self.compiled_step = None  # the compiled step over these buffers (run(), pjd.compiler)
        # The verification's settings, fixed for the decode (planned once, run every step with the
        # lanes' tensors: FlashInfer's plan / run split).
        self.verify_plan = dict(image_token_range=(plan.lo, plan.hi), cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                                temperature=temperature, reuse_threshold=plan.reuse_threshold, draft_init=draft_init,
                                eol_token_id=plan.eol_token_id, row_slots=plan.row_slots, width=plan.width,
                                continuation=plan.continuation, backend=backend, validate=False)

    def reset(self, prompt: torch.Tensor, mask: torch.Tensor, seed: int, image_index: torch.Tensor) -> None:
        """The state of a fresh decode, in place: ``prompt`` int ``[Bx, P]`` with its mask (bool), the
        draws of ``(seed, image_index)``."""
        plan, P = self.plan, self.P
        self.tokens.zero_()
        self.tokens[:, :P] = prompt
        if plan.eol_token_id is not None:
            eol_slots = torch.arange(plan.width, plan.image_slots, plan.row_slots, device=self.device)
            self.tokens[:, P + eol_slots] = plan.eol_token_id
        self.real.fill_(True)
        self.real[:, :P] = mask
        self.rope.copy_((self.real.long().cumsum(1) - 1).clamp(min=0))  # as HF derives position ids
        self.kv_ready.zero_()
        self.n.zero_()
        self.draws.reseed(seed, image_index)
        self.draft_tokens.copy_(self.draws.step(0)[2])
        self.draft_q.copy_(torch.nn.functional.one_hot(self.draft_tokens - plan.lo, plan.hi - plan.lo))
        self.scaffold_token.fill_(-1)
        self.cache.reset()
        self.t.zero_()
        self.accepted_log.zero_()
        self.finished_at.fill_(-1)
        self.bad_step.fill_(-1)
        self.overflow.zero_()
        self.clock = _Clock(self.device)
        self.guards_checked: set[int] = set()  # buckets whose guards the compiled CPU step checked in full
        self.compile_seconds = 0.0  # compiling / capturing in this call (pjd.compiler)

    # ------------------------------------------------------------------ the loop
    def run(self, progress: bool, compiled: str = "") -> GenerationResult:
        t0 = time.perf_counter()
        result = GenerationResult(tokens=None, steps=0, method=self.plan.method, compiled=compiled)
        bar = _progress(progress, self.B * self.plan.height * self.plan.width, self.plan.method)
        with self.adapter.decoding():
            self.prefill()
            if self.fixed:
                self._count_next_inputs()
                if compiled:
                    # The first step eager: it allocates the cache's K/V (first layer call) before the step
                    # is compiled, and leaves the Python state the compiled step was traced with (the
                    # append cache's tail without a prefill), so a kept step (pjd.compiler) serves as is.
                    self._pick_bucket()
                    self.step()
                    if self.compiled_step is None:  # compiled once per decoder, which pjd.compiler keeps
                        self.compiled_step = compiler.compiled_step(self, compiled)
                self.run_fixed(self.compiled_step if compiled else self.step, bar)
            elif self.backend == "sdpa" and self.plan.method == "ar" and isinstance(self.cache, SlotCache):
                self.run_ar(result, bar)
            else:
                while self.step():
                    if progress:
                        bar.update(int(self.accepted_log[int(self.t)].sum()))
        bar.close()
        self._check_targets(*self._first_undefined().tolist())
        plan = self.plan
        image = self.tokens[:self.B, self.P:self.dump].view(self.B, plan.height, plan.row_slots)[:, :, :plan.width]
        result.tokens = image.clone()
        result.steps_per_image = self.finished_at.clone()  # the buffers may serve the next call
        result.steps = int(self.finished_at.max())
        if not result.accepted:
            result.accepted = list(self.accepted_log[1:result.steps + 1].clone().unbind(0))
        result.forward_seconds = self.clock.seconds()
        result.compile_seconds = self.compile_seconds
        result.wall_seconds = time.perf_counter() - t0 - result.compile_seconds
        return result

    def run_fixed(self, step, bar) -> None:
        """Steps until every image is complete, reading the device only through ``_Watch``: every
        CHECK_EVERY steps while ``status()``'s lower bound says completion cannot come sooner, then as
        that bound allows (so never a step too late but the lag's one on CUDA). A step after completion
        feeds nothing and changes nothing."""
        plan = self.plan
        fewest = -(-min(plan.lane_len) // (plan.window + 1)) + plan.num_lanes - 1  # status()'s bound at step 0
        self.watch = watch = _Watch(self.device)
        t, due, pushed = 0, max(1, min(fewest, CHECK_EVERY)), None
        while True:
            self._pick_bucket()
            step()
            t += 1
            if t > self.max_steps:
                raise RuntimeError(f"pjd internal error: the decode did not complete in {self.max_steps} steps")
            if pushed is None and t >= due:
                watch.push(self.status(), t)
                pushed = t
            # On CUDA the flags of step t are waited for after step t + 1 was queued: the GPU never idles.
            if pushed is not None and (not watch.lag or pushed < t):
                done, bad_image, bad_step, overflow, committed, left = watch.wait()
                self._check_targets(bad_image, bad_step)
                if overflow:
                    raise RuntimeError(f"pjd internal error: a step fed more than the {plan.max_fed_lanes} lanes or "
                                       f"{self.N} inputs of the fixed-shape bucket (DecodePlan.max_fed_lanes, "
                                       "max_fed_inputs)")
                bar.update(committed - bar.n)
                if done:
                    return
                due, pushed = pushed + min(max(left, 1), CHECK_EVERY), None

    def status(self) -> torch.Tensor:
        """int64 [6], what ``run_fixed`` reads: (all images complete, first image with an undefined target
        and its step (-1, -1: none), bucket overflow, image tokens committed, a lower bound on the steps
        still needed). The bound: lane l commits at most window + 1 tokens a step, and row lanes complete
        one at a time in order (a lower row stays behind the one above), so the last lane completes at
        least ``ceil(left_l / (window + 1)) + open lanes below l`` steps from now, for every open lane l."""
        left = (self.lane_len - self.n).clamp(min=0)
        open_ = left > 0
        per_step = self.plan.window + 1
        steps = (left + per_step - 1) // per_step + open_.flip(1).cumsum(1).flip(1) - open_.long()
        return torch.cat([torch.stack([(~open_).all().long(), *self._first_undefined()]),
                          torch.stack([self.overflow.long(), self.accepted_log.sum(), steps.max()])])

    def run_ar(self, result, bar) -> None:
        """method="ar" on the sdpa path: step t feeds raster position P - 1 + t, writes its key there as
        committed and samples image slot t, all known on the host. So a step packs nothing, runs no
        verification (there are no drafts: it is the top lane's bonus sample of speculative_verify
        with m = 0, from the same draws) and never synchronises; its inputs live in preallocated
        buffers updated in place. Its kv_len grows by one per step: the fixed-shape loop (CUDA, compiled)
        runs ar through the general step instead, with the same tokens."""
        plan, B, Bx, P, device = self.plan, self.B, self.Bx, self.P, self.device
        off = self.cache_offset()
        pos = torch.empty(Bx, 1, dtype=torch.int32, device=device)
        slot = torch.empty(Bx, 1, dtype=torch.long, device=device)
        inputs = StepInputs(q_pos=pos, q_group=torch.zeros_like(pos), key_pos=pos,
                            key_group=torch.full_like(pos, -1), slot=slot, kv_len=0)
        counts = {True: torch.zeros(B, dtype=torch.long, device=device),  # image tokens committed per step
                  False: torch.ones(B, dtype=torch.long, device=device)}
        tokens = self.tokens.view(Bx // B, B, -1)  # cond and uncond rows share the image tokens
        undefined = torch.zeros(plan.lane_len[0], B, dtype=torch.bool, device=device)  # [step, image]
        # Every step's one uniform at once (counter-based, so known upfront): loop step t is step t + 1
        # of the general loop's numbering, and slot n + 0's sampling uniform there.
        uniforms = self.draws.sample_uniform(torch.arange(1, plan.lane_len[0] + 1, device=device))  # [T, B, 1]
        for t in range(plan.lane_len[0]):
            raster = P - 1 + t
            pos.fill_(raster)
            slot.fill_(off + raster)
            inputs.kv_len = off + raster + 1
            with self.clock():
                logits = self.forward(Packed(inputs, self.tokens[:, raster:raster + 1],
                                             self.rope[:, raster:raster + 1]))
            # No cache.end(): begin() already wrote the key as committed, and it stays so.
            forced = plan.eol_token_id is not None and t % plan.row_slots == plan.width
            if forced:
                tokens[:, :, raster + 1] = plan.eol_token_id
            else:
                u = uniforms[t]  # [B, 1]
                p = target_probs(logits, num_images=B, cfg_scale=self.cfg_scale,
                                 image_token_range=(plan.lo, plan.hi), **self.sampling)
                # p is NaN exactly where the target is undefined (pjd.sampling.undefined_rows).
                undefined[t] = torch.isnan(p).any((1, 2))
                tokens[:, :, raster + 1:raster + 2] = sample_inverse_cdf(p, u) + plan.lo
            result.accepted.append(counts[forced])
            bar.update(0 if forced else B)
        self.n.fill_(plan.lane_len[0])
        self.bad_step = torch.where(undefined.any(0), undefined.int().argmax(0) + 1, -1)
        self.finished_at.fill_(plan.lane_len[0])

    def prefill(self):
        """Every prompt token but the last (which is re-fed by the first step) writes its KV."""
        n = self.P - 1
        if n == 0:
            return
        pos = torch.arange(n, dtype=torch.int32, device=self.device).expand(self.Bx, n)
        real = self.real[:, :n]
        inputs = StepInputs(
            q_pos=torch.where(real, pos, -1).int(),
            q_group=torch.full_like(pos, -1),
            key_pos=pos.clone(),
            key_group=torch.where(real, -1, -2).int(),
            slot=(self.cache_offset() + pos).long(),
            kv_len=self.cache_offset() + n,
        )
        with self.clock():
            self.forward(Packed(inputs, self.tokens[:, :n], self.rope[:, :n]), logits=False)
        self.cache.end(real)
        self.kv_ready[:, :n] = real[:self.B]

    def cache_offset(self) -> int:
        return self.cache.num_scratch if isinstance(self.cache, SlotCache) else 0

    def schedule(self) -> Lanes:
        """Which lanes are fed this step and with how many drafts (docs/design.md §1.1)."""
        plan, n = self.plan, self.n
        left = self.lane_len - n
        done = left <= 0
        top = (~done).long().argmax(1, keepdim=True)  # lanes complete in order: the first open one
        is_top = (self.lane_id == top) & ~done
        if plan.row_lanes:
            above_n = _above(n, BIG)
            above_done = _above(done, True)
            activated = above_n >= plan.context
            if plan.row0_first:
                activated = activated & ((self.lane_id != 1) | above_done)
            # Row r may draft column j only once row r-1 has committed column j+1.
            room_above = torch.where(above_done, BIG, above_n - n - 1)
        else:
            activated = torch.ones_like(done)
            room_above = torch.full_like(n, BIG)
        drafts = torch.minimum(left, torch.where(is_top, BIG, room_above)).clamp(min=0, max=plan.window)
        fed = ~done & activated & (is_top | (room_above >= 1))
        # A lane that completed with a sampled (never fed) last token is fed it once more so that
        # its key exists for the rows below; it commits nothing. The last lane needs no flush.
        last_slot = self.P + self.lane_base + self.lane_len - 1
        flush = done & ~self.kv_ready.gather(1, last_slot.expand_as(n)) & (self.lane_id < self.L - 1)
        rule = TOP if plan.method == "zipar" else PREFIX
        rule = torch.where(is_top, TOP, rule)
        rule = torch.where(flush, PREFIX, rule).int()
        return Lanes(fed=fed | flush, drafts=torch.where(fed, drafts, 0), rule=rule, room=left.clamp(min=0),
                     flush=flush)

    def pack(self, lanes: Lanes) -> Packed | None:
        """Lay out this step's inputs: per fed lane, top to bottom, its leading input then its drafts."""
        plan, B, L, W, P = self.plan, self.B, self.L, self.W, self.P
        k = torch.arange(W + 1, device=self.device)
        count = self._count(lanes)
        start = count.cumsum(1) - count
        valid = lanes.fed[..., None] & (k <= lanes.drafts[..., None])          # [B, L, W+1]
        image_slot = (self.lane_base + self.n - 1)[..., None] + k              # -1: the last prompt token
        raster = P + image_slot
        off = self.cache_offset()
        if self.fixed:  # the bucket: no host read (an overflow is read with the flags, run_fixed)
            N, kv_len, fed_lanes = self.bucket, self.cache.size, self.plan.max_fed_lanes
            self.overflow |= (lanes.fed.sum(1).max() > fed_lanes) | (count.sum(1).max() > N)
        else:
            # The step's one host synchronisation: shapes (inputs, cache length, lanes fed) and whether
            # a previous step's target was undefined (checked here rather than by a sync of its own).
            N, max_raster, fed_lanes, bad_image, bad_step = torch.cat([torch.stack([
                count.sum(1).max(), torch.where(valid, raster, 0).max(), lanes.fed.sum(1).max()]),
                self._first_undefined()]).tolist()
            self._check_targets(bad_image, bad_step)
            if N == 0:
                return None
            kv_len = off + max_raster + 1

        # Tokens: the lane's last committed token (or leading token), then its drafts (EOL where forced).
        tokens = torch.cat([self.tokens[:B].gather(1, raster[..., 0])[..., None], self.draft_tokens], -1)
        if plan.eol_token_id is not None:
            forced = (image_slot >= 0) & (image_slot % plan.row_slots == plan.width)
            tokens = torch.where(forced, plan.eol_token_id, tokens)
        scaffold = self._scaffold(lanes)
        lead = k == 0
        if scaffold is not None:
            # Taken once, at the row's first step, then fixed: a leading token that moved with the
            # row above would move the first draft's target every step (docs/design.md §1.1).
            take = scaffold & (self.scaffold_token < 0)
            self.scaffold_token.copy_(torch.where(take, self._lead_token(), self.scaffold_token))
            tokens[..., 0] = torch.where(scaffold, self.scaffold_token, tokens[..., 0])
            scaffold = scaffold[..., None] & lead
        else:
            scaffold = torch.zeros_like(valid)
        # Keys: a leading input whose key is not cached yet writes it as committed; otherwise its key
        # is discarded. Drafts write their own slot as drafts of their lane; scaffolds go to scratch.
        ready = self.kv_ready.gather(1, raster[..., 0])
        if plan.row_lanes and plan.eol_token_id is None:
            # A fresh row leads with the last token of the row above: do not write it twice.
            flush_above = _above(lanes.flush, False)
            ready = ready | (flush_above & (self.n == 0))
        ready = ready[..., None]
        writes_committed = valid & lead & ~ready & ~scaffold
        lane = self.lane_id[:, None].expand(L, W + 1)
        draft_group = lane if plan.row_causal else torch.full_like(lane, -1)
        key_group = torch.where(lead, torch.where(writes_committed, -1, -2), draft_group)
        key_group = torch.where(scaffold, lane, key_group)
        slot = torch.where(writes_committed | ~lead, off + raster, L)  # L: the discard slot
        slot = torch.where(scaffold, lane, slot)

        # Scatter the [B, L, W+1] grid into packed [B, N] (padding: sees nothing, writes nowhere).
        dest = torch.where(valid, start[..., None] + k, N).view(B, -1)

        def packed(grid, fill):
            out = torch.full((B, N + 1), fill, dtype=grid.dtype, device=self.device)
            return out.scatter_(1, dest, grid.reshape(B, -1))[:, :N]

        q_pos = packed(raster, -1)
        inputs = StepInputs(
            q_pos=self._rows(q_pos).int(),
            q_group=self._rows(packed(lane.expand(B, L, W + 1), -1)).int(),
            key_pos=self._rows(torch.where(q_pos >= 0, q_pos, HIDDEN_POS)).int(),
            key_group=self._rows(packed(key_group, -2)).int(),
            slot=self._rows(packed(slot, L)).long(),
            kv_len=kv_len,
        )
        raster_rows = self._rows(packed(raster, 0))
        # The first leading token is the last prompt token, which differs between cond/uncond rows.
        step_tokens = torch.where(raster_rows < P, self.tokens.gather(1, raster_rows), self._rows(packed(tokens, 0)))
        return Packed(inputs, step_tokens, self.rope.gather(1, raster_rows),
                      lane_start=torch.where(lanes.fed, start, -1), dest=dest, writes_committed=writes_committed,
                      fed_lanes=fed_lanes)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image [B, ...] -> per batch row [Bx, ...] (cond and uncond rows share image metadata)."""
        return x if self.Bx == self.B else torch.cat([x, x])

    def _scaffold(self, lanes: Lanes) -> torch.Tensor | None:
        """[B, L]: lanes whose leading token is a scaffold (no EOL, fresh row, row above unfinished)."""
        plan = self.plan
        if not plan.row_lanes or plan.eol_token_id is not None:
            return None
        above_open = _above(self.n < self.lane_len, False)
        return lanes.fed & (self.n == 0) & above_open

    def _lead_token(self) -> torch.Tensor:
        """[B, L]: each lane's scaffold token, the last committed token of the row plan.row_lead names
        (docs/design.md §1.1). Rows complete in order, so the lowest complete row is the top open one's
        predecessor; where the named row does not exist (-1), the row above leads."""
        plan, lane = self.plan, self.lane_id
        if plan.row_lead == "row_end":
            top = (self.n < self.lane_len).long().argmax(1, keepdim=True)  # the top open row
            source = (top - 1).expand(-1, self.L)
        else:
            source = (lane - (1 if plan.row_lead == "above" else 2)).expand(self.B, -1)
        source = torch.where(source >= 0, source, lane - 1).clamp(min=0)
        n_source = self.n.gather(1, source)
        return self.tokens[:self.B].gather(1, self.P + self.lane_base[source] + (n_source - 1).clamp(min=0))

    def forward(self, step: Packed, logits: bool = True) -> torch.Tensor | None:
        self.cache.begin(step.inputs)
        with ActiveStep(self.cache, step.inputs, self.backend):
            # The prefill only writes keys: no output head over the prompt (logits=False).
            return self.adapter.forward(step.tokens, step.rope, **({} if logits else {"logits": False}))

    def step(self, timed: bool = True) -> bool:
        """One decoding step: schedule, pack, forward, verify, commit, over the state in place. With
        fixed shapes it reads nothing back from the device and returns True; with dynamic shapes it
        returns False, doing nothing, once no lane is left to feed. ``timed``: the forward's time
        goes to ``clock`` (a compiled step is timed whole by its caller)."""
        lanes = self.schedule()
        packed = self.pack(lanes)
        if packed is None:
            return False
        if timed:
            with self.clock():
                logits = self.forward(packed)
        else:
            logits = self.forward(packed)
        self.t += 1
        self.commit(self.verify(logits, lanes, packed, self.draws.step(self.t)), packed)
        self._count_next_inputs()
        return True

    def _count_next_inputs(self) -> None:
        """With several buckets: the most inputs an image feeds at the next step, what the host reads to
        pick that step's bucket (``_pick_bucket``)."""
        if len(self.buckets) > 1:
            self.next_inputs.copy_(self._count(self.schedule()).sum(1).max())

    @staticmethod
    def _count(lanes: Lanes) -> torch.Tensor:
        """int64 [B, L]: inputs each lane is fed (its last committed or leading token, then its drafts)."""
        return torch.where(lanes.fed, 1 + lanes.drafts, 0)

    def _pick_bucket(self) -> None:
        """With several buckets (a compiled CPU step): the smallest that holds the next step's inputs,
        a host read of a value the previous step computed (a memory load on a CPU, no synchronisation).
        A step's overflow check (``status``) catches a bucket too small."""
        if len(self.buckets) > 1:
            need = int(self.next_inputs)
            self.bucket = next((b for b in self.buckets if b >= need), self.buckets[-1])

    def _first_undefined(self) -> torch.Tensor:
        """int64 [2]: (image, step) of the first image whose target was undefined; (-1, -1) if none."""
        bad = self.bad_step >= 0
        image = torch.where(bad.any(), bad.int().argmax(), -1)
        return torch.stack([image, self.bad_step.gather(0, image.clamp(min=0).view(1)).squeeze(0)])

    @staticmethod
    def _check_targets(image: int, step: int) -> None:
        if image >= 0:
            raise ValueError(f"the model's logits define no distribution for image {image} at decoding step {step}: "
                             "a NaN or +inf, or -inf for every image token, in the CFG-combined image-token logits "
                             "/ temperature; pjd cannot sample from them")

    def verify(self, logits: torch.Tensor, lanes: Lanes, step: Packed, draws):
        """speculative_verify of the step with its per-image ``draws`` (DrawStream.step, all [B, L, ...]).
        Lanes are independent in it, so the sdpa path verifies only the lanes fed this step (gathered to
        the front with their draws, results scattered back): its work follows the active rows, not the
        grid height. A lane sees the same draws on both paths, so tokens agree."""
        plan, B, L, W = self.plan, self.B, self.L, self.W
        lane = [step.lane_start.int(), lanes.drafts.int(), lanes.rule, (self.lane_base + self.n).int(),
                lanes.room.int(), self.draft_tokens, self.draft_q, *draws]
        compact = self.backend == "sdpa" and step.fed_lanes < L
        if compact:
            # The fed lanes of each image first (stable), then enough unfed ones to fill A columns.
            order = torch.sort(lanes.fed.to(torch.uint8), dim=1, descending=True, stable=True).indices
            order = order[:, :step.fed_lanes]
            lane = [x.gather(1, order.view(B, -1, *(1,) * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
                    for x in lane]
        # Coupled draws: noise of the slots n .. n+W of the lanes verified, keyed by slot (pjd.rng).
        noise = self.draws.coupled(lane[3], W + 1) if plan.coupled_draws else None
        verdict = speculative_verify(logits, *lane, coupled_noise=noise, **self.verify_plan)
        if not compact:
            return verdict

        def scatter(full, part):
            return full.scatter(1, order.view(B, -1, *(1,) * (part.dim() - 2)).expand_as(part), part)

        zeros = torch.zeros(B, L, dtype=verdict.num_commit.dtype, device=self.device)
        return VerifyResult(scatter(zeros, verdict.num_accepted), scatter(zeros, verdict.num_commit),
                            scatter(self.draft_tokens.new_zeros(B, L, W + 1), verdict.commit_tokens),
                            scatter(self.draft_tokens, verdict.next_tokens), scatter(self.draft_q, verdict.next_q),
                            scatter(torch.zeros_like(self.n, dtype=torch.bool), verdict.invalid))

    def commit(self, verdict, step: Packed) -> None:
        """Write committed tokens, flip cache states, advance frontiers, log image tokens per image, in place."""
        plan, B, W = self.plan, self.B, self.W
        k = torch.arange(W + 1, device=self.device)
        # Keys kept: leading inputs that wrote theirs, and every accepted draft.
        accepted = (k < verdict.num_accepted[..., None])
        keep_grid = step.writes_committed | ((k >= 1) & (k <= verdict.num_accepted[..., None]))
        keep = torch.zeros(B, step.tokens.shape[1] + 1, dtype=torch.bool, device=self.device)
        keep.scatter_(1, step.dest, keep_grid.view(B, -1))
        self.cache.end(self._rows(keep[:, :-1]))
        # Lane offsets n + k as raster positions; writes that do not apply go to the dump column.
        slots = (self.P + self.lane_base + self.n)[..., None] + k             # [B, L, W+1]
        committed = k < verdict.num_commit[..., None]
        dump = self.dump
        target = torch.where(committed, slots, dump).view(B, -1)
        self.tokens.scatter_(1, self._rows(target), self._rows(verdict.commit_tokens.view(B, -1)))
        self.kv_ready.scatter_(1, torch.where(accepted, slots, dump).view(B, -1), True)
        self.kv_ready.scatter_(1, torch.where(step.writes_committed[..., 0], slots[..., 0] - 1, dump), True)
        self.n += verdict.num_commit.long()
        self.draft_tokens.copy_(verdict.next_tokens)
        self.draft_q.copy_(verdict.next_q)
        self.bad_step.copy_(torch.where((self.bad_step < 0) & verdict.invalid.any(1), self.t, self.bad_step))
        done = self.n.ge(self.lane_len).all(1)
        self.finished_at.copy_(torch.where(done & (self.finished_at < 0), self.t, self.finished_at))
        is_image = (slots - self.P) % plan.row_slots < plan.width
        accepted = (committed & is_image).sum((1, 2))
        self.accepted_log.index_copy_(0, self.t.clamp(max=self.max_steps).view(1), accepted[None])


class _Clock:
    """Seconds spent in timed sections: ``perf_counter`` on a CPU; on CUDA a pair of events per
    section, read at the end of the decode (no synchronisation in the loop)."""

    def __init__(self, device: torch.device):
        self.cuda, self.total, self.pairs = device.type == "cuda", 0.0, []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.total += time.perf_counter() - t0

    def seconds(self) -> float:
        if self.pairs:
            self.pairs[-1][1].synchronize()
            self.total += sum(start.elapsed_time(end) for start, end in self.pairs) / 1e3
            self.pairs = []
        return self.total


class _Watch:
    """The fixed-shape loop's host reads: a small int64 tensor of flags copied to the host. On CUDA
    the copy goes to a pinned buffer without blocking and is waited for one step later (``lag``), so
    the GPU always has the next step queued; elsewhere it is a plain read."""

    def __init__(self, device: torch.device):
        self.lag = device.type == "cuda"
        self.host = torch.empty(6, dtype=torch.long, pin_memory=self.lag)
        self.event = torch.cuda.Event() if self.lag else None
        self.log: list[tuple[int, list[int]]] = []  # (step, flags) of every read (tests check the schedule)
        self._step = 0

    def push(self, flags: torch.Tensor, step: int) -> None:
        self.host.copy_(flags, non_blocking=self.lag)
        self._step = step
        if self.lag:
            self.event.record()

    def wait(self) -> list[int]:
        if self.lag:
            self.event.synchronize()
        self.log.append((self._step, self.host.tolist()))
        return self.log[-1][1]


class _NoBar:
    n = 0


    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok")
